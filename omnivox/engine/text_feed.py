"""Incremental read-aloud: text that arrives piece by piece (a voice agent's own LLM, token by token) is spoken as it
comes, through the same 10-token text chunks the spoken-reply path feeds the TTS from our LLM.

Contract (what `Engine.read_aloud_feed` promises, whatever runner sits below):
- The producer (any thread) calls `feed.append(text)` for each piece and `feed.done()` once; `append` after `done`
  is an InvalidRequest.
- The TTS side takes the pieces word by word as LLM chunks (`LLMChunk`), so `ReplyGenerator.segment` runs exactly as
  for an LLM reply: its first 10 BERT text tokens are prefilled and the first 25-token TTS call made as soon as they
  are there, one more 10-token text chunk per call after that, and `done()` flushes the rest (calls until EOS).
  Long texts restart in a new segment at a sentence end, as replies do.
- The stream never blocks waiting for text: when the feed has nothing new, `next()` returns an empty AudioChunk
  (no samples, no text, not last) at once. The caller waits for `feed.ready` (new text or done) before asking again.
- `feed.sufficient_at` is the `time.monotonic()` of the append that first gave the TTS enough text for its first
  call (None until then): first audio minus it is the latency the text producer sees.
- `close()` on the stream cancels at the current step and frees its caches, whatever the feed's state.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from omnivox.engine.pipeline import TTS_EOS, LLMChunk, Piece, ReplyGenerator
from omnivox.engine.text import detect_language, normalize_for_tts
from omnivox.engine.types import AUDIO_TOKENS_PER_SECOND
from omnivox.errors import InvalidRequest

UNLIMITED_AUDIO_TOKENS = 1 << 30  # forced runs: no forced end of speech before the text is complete


class TextFeed:
    """Thread-safe text source: `append` pieces, then `done`; the engine side `take`s them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._last_append: float | None = None
        self._done = False
        self._done_taken = False
        self.text = ""  # everything appended so far
        self.sufficient_at: float | None = None

    def append(self, text: str) -> None:
        with self._lock:
            if self._done:
                raise InvalidRequest("the input is already done: start a new read-aloud to speak more text")
            if text:
                self._pending.append(text)
                self.text += text
                self._last_append = time.monotonic()

    def done(self) -> None:
        with self._lock:
            self._done = True

    @property
    def is_done(self) -> bool:
        return self._done

    @property
    def ready(self) -> bool:
        """The TTS side would make progress: there is text it has not taken, or the end it has not seen."""
        with self._lock:
            return bool(self._pending) or (self._done and not self._done_taken)

    def take(self) -> tuple[str | None, float | None]:
        """(the text appended since the last take, "" if none yet, None once done and empty; its last append time)."""
        with self._lock:
            text, self._pending = "".join(self._pending), []
            if not text and self._done:
                self._done_taken = True
                return None, None
            return text, self._last_append


def _words(text: str) -> list[str]:
    return re.findall(r"\s*\S+\s*|\s+", text)


def feed_chunks(feed: TextFeed, tts_tokenizer: Any, text_chunk: int, reply: ReplyGenerator,
                forced_words_per_second: float | None) -> Iterator[LLMChunk]:
    """The feed as LLM chunks, one per word; a chunk with `waiting=True` when nothing new has arrived. Sets
    `feed.sufficient_at`, and with forcing the end of speech once the text is complete."""
    seen = ""
    while True:
        text, appended_at = feed.take()
        if text is None:
            if forced_words_per_second is not None and reply.forcing is not None:
                seconds = max(len(seen.split()), 1) / forced_words_per_second
                reply.forcing.audio_tokens = round(seconds * AUDIO_TOKENS_PER_SECOND)
            return
        if not text:
            yield LLMChunk("", waiting=True)
            continue
        for word in _words(text):
            seen += word
            if feed.sufficient_at is None:
                normalized = normalize_for_tts(seen.split(TTS_EOS)[0], detect_language(seen))
                if len(tts_tokenizer.encode(normalized)) >= text_chunk:
                    feed.sufficient_at = appended_at
            yield LLMChunk(word)


def read_feed(reply: ReplyGenerator, chunks: Iterator[LLMChunk], speaker: torch.Tensor) -> Iterator[Piece]:
    """`ReplyGenerator._reply` for text from a feed: the default speaker instead of the LLM's, the same segments."""
    empty = np.zeros(0, dtype=np.float32)
    first = None
    for chunk in chunks:
        if not chunk.waiting:
            first = chunk
            break
        yield Piece(empty, "")
    spoken: list[str] = []
    if first is not None:
        def counted(source: Iterator[LLMChunk]) -> Iterator[LLMChunk]:
            for item in source:
                spoken.append(item.text)
                reply.timer.metrics.reply_text = "".join(spoken)
                yield item

        spoken.append(first.text)
        gen_text, restart, final_sent = first.text, None, False
        chunks = counted(chunks)
        while True:
            for piece in reply.segment(chunks, gen_text, speaker, restart):
                final_sent = final_sent or piece.final
                yield piece
            restart = reply.last_restart
            if restart is None:
                break
            gen_text = ""
        reply.timer.metrics.reply_text = "".join(spoken)
        if final_sent:
            return
    yield Piece(empty, "", final=True)
