"""What random weights are made to say: scripted replies and lengths for `Engine.stream` / `Engine.read_aloud`.

Random weights never produce a real reply or a reliable end of speech, so a server running them forces both, the
way the benchmarks do (shared/workloads/README.md): a request may carry its own reply and length; otherwise a
prompt of the standard workload gets that workload's reply and length, any other prompt `DUMMY_REPLY`, and
read-aloud text is spoken for words / 2.5 seconds (150 words per minute). The cost per step stays the real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omnivox.workload import WorkloadItem, load_workload

DUMMY_REPLY = "Hello! This reply is scripted."  # a prompt outside the workload: 5 words, 2 s
WORDS_PER_SECOND = 2.5


def speaking_seconds(text: str) -> float:
    """How long `text` takes to say at 150 words per minute (at least one word's worth)."""
    return max(len(text.split()), 1) / WORDS_PER_SECOND


class ReplyScript:
    """prompt -> forced reply and length, as keyword arguments for `Engine.stream` / `Engine.read_aloud`."""

    def __init__(self, items: Iterable[WorkloadItem] | None = None):
        self._by_prompt = {item.prompt.strip(): item for item in (load_workload() if items is None else items)}

    def chat(self, text: str, reply: str | None = None, audio_seconds: float | None = None) -> dict[str, Any]:
        """Forcing for a reply to `text`. An explicit `reply` / `audio_seconds` (sent by the client) wins; a
        reply without a length is spoken at 150 words per minute."""
        item = self._by_prompt.get(text.strip())
        if reply is None:
            reply = item.reply if item is not None else DUMMY_REPLY
            if audio_seconds is None and item is not None:
                audio_seconds = item.audio_seconds
        return {"forced_reply": reply, "forced_audio_seconds": audio_seconds or speaking_seconds(reply)}

    @staticmethod
    def read(text: str, audio_seconds: float | None = None) -> dict[str, Any]:
        """Forcing for reading `text` aloud: `audio_seconds` if given, else its speaking time."""
        return {"forced_audio_seconds": audio_seconds or speaking_seconds(text)}
