"""The system prompt (voice style) presets: the official text-to-speech-reply prompt exists in two revisions that
differ only in the English suffix, and the official code also allows a conversation with no system prompt.

The default is `assistant-voice`: the revision the fact sheet (section 3.2) records for `get_sys_prompt`'s
`audio_assistant` mode and the one every equivalence test and benchmark of this project was made with.
"""

from __future__ import annotations

VOICE = "Use the <reserved_53> voice."  # the built-in default voice (no reference audio)
SYSTEM_PROMPTS = {
    "assistant-voice": VOICE + "As an assistant, you will speak using this voice style.",
    "helpful-assistant": VOICE + "You are a helpful assistant with the above voice style.",
    "none": "",  # no system turn at all
}
DEFAULT_PRESET = "assistant-voice"


def resolve_system_prompt(value: str) -> str:
    """A preset name -> its text; anything else is taken as the system prompt's own text (operator-written, so
    special tokens in it, like `<reserved_53>`, are real tokens)."""
    return SYSTEM_PROMPTS.get(value, value)
