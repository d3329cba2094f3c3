"""Text handling between the LLM and the TTS, reproducing the official rules (fact sheet 4.2, 4.3, 4.13).

The LLM's token chunks are decoded with a UTF-8 hold-back; the text for the TTS has digits spelled one by one and
`*` removed (except in the first chunk), and is re-tokenised whole with the ChatTTS BERT tokenizer each time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

REPLACEMENT_CHAR = "\ufffd"
SENTENCE_ENDS = (".", "。", "!", "?", "！", "？")
DIGIT_WORDS = {
    "english": "zero one two three four five six seven eight nine".split(),
    "chinese": list("零一二三四五六七八九"),
}


def sentence_end(text: str) -> str:
    """First sentence-end mark (in the fixed order above) present in `text`; a '.' right after a digit is skipped."""
    for mark in SENTENCE_ENDS:
        if mark in text:
            idx = text.find(mark)
            if mark == "." and idx > 0 and text[idx - 1].isdigit():
                continue
            return mark
    return ""


def detect_language(text: str) -> str:
    cjk = len(re.findall(r"[\u4e00-\u9fff]", text))
    latin = len(re.findall(r"[a-zA-Z]", text))
    return "chinese" if cjk >= latin else "english"


def spell_digits(text: str, language: str) -> str:
    """Replace every digit run by its digits spoken one by one ("23" -> "two three"; zh "二三").

    Each run replaces the first remaining occurrence of its digits, in order, as the official converter does.
    """
    words = DIGIT_WORDS[language]
    sep = " " if language == "english" else ""
    for run in re.findall(r"\d+", text):
        text = text.replace(run, sep.join(words[int(d)] for d in run), 1)
    return text


def normalize_for_tts(chunk_text: str, language: str) -> str:
    return spell_digits(chunk_text, language).replace("*", "")


@dataclass(frozen=True)
class TTSPrompt:
    """The TTS condition for the current text, as ids, and the text's token count L (capped at the reserved 300)."""

    ids: list[int]
    num_text_tokens: int


def build_tts_prompt(text: str, tts_tokenizer, reserved_len: int = 300) -> TTSPrompt:
    """The official condition string `[Stts][spk_emb]` + text + `[Etts]` + `[PAD]` x (reserved - 1 - L) + `[Ptts]`,
    tokenized. The tokenizer splits special tokens off before it tokenizes the text between them, so these are the
    text's ids with the special ids around them: the padded string (~300 tokens, rebuilt for every LLM chunk) is
    never tokenized. Text longer than the reserve is cut there, decoded and the string re-tokenized, as officially
    (with no `[Etts]`)."""
    special = tts_tokenizer.special
    ids = tts_tokenizer.encode(text)
    if len(ids) < reserved_len:
        pads = [special.pad] * (reserved_len - len(ids) - 1)
        return TTSPrompt([special.stts, special.spk_emb, *ids, special.etts, *pads, special.ptts], len(ids))
    ids = ids[:reserved_len]
    return TTSPrompt(tts_tokenizer.encode(f"[Stts][spk_emb]{tts_tokenizer.decode(ids)}[Ptts]"), len(ids))


class LLMTextDecoder:
    """Turns each LLM chunk's ids into text: holds back ids that end in a partial UTF-8 character, drops every id 0,
    a leading BOS and one trailing terminator, and keeps special tokens (so `<|tts_eos|>` can be split off)."""

    def __init__(self, tokenizer, bos_id: int, terminator_ids: tuple[int, ...]):
        self.tokenizer = tokenizer
        self.bos_id = bos_id
        self.terminator_ids = terminator_ids
        self.held: list[int] = []

    def _complete_prefix_len(self, ids: list[int]) -> int:
        end = len(ids)
        text = self.tokenizer.decode(ids)
        while text and text[-1] == REPLACEMENT_CHAR:
            end -= 1
            if end == 0:
                break
            text = self.tokenizer.decode(ids[:end])
        return end

    def push(self, chunk_ids: list[int]) -> str:
        ids = self.held + chunk_ids
        end = self._complete_prefix_len(ids)
        self.held = ids[end:]
        ids = [i for i in ids[:end] if i != 0]
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        if ids and ids[-1] in self.terminator_ids:
            ids = ids[:-1]
        return self.tokenizer.decode(ids) if ids else ""


def split_for_tts(text: str, tts_tokenizer, max_tokens: int) -> list[str]:
    """Split text read aloud into parts of at most `max_tokens` BERT tokens, at sentence ends where possible."""
    sentences = [s for s in re.split(r"(?<=[.。!?！？])\s*", text) if s.strip()]
    parts: list[str] = []
    current = ""
    for sentence in sentences:
        candidate = f"{current} {sentence}".strip() if current else sentence
        if len(tts_tokenizer.encode(candidate)) <= max_tokens:
            current = candidate
            continue
        if current:
            parts.append(current)
        current = ""
        for word in sentence.split():
            candidate = f"{current} {word}".strip()
            if current and len(tts_tokenizer.encode(candidate)) > max_tokens:
                parts.append(current)
                candidate = word
            current = candidate
    if current:
        parts.append(current)
    return parts
