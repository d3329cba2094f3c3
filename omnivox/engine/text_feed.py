"""Incremental read-aloud: text that arrives piece by piece (a voice agent's own LLM, token by token) is spoken as it
comes, through the same 10-token text chunks the spoken-reply path feeds the TTS from our LLM.

Contract (what `Engine.read_aloud_feed` promises):
- The producer (any thread) calls `feed.append(text)` for each piece and `feed.done()` once; `append` after `done`
  is an InvalidRequest.
- The pieces reach the request in the engine loop as LLM chunks, one per word, in place of an LLM side: the speech
  side is `Reply.speech` with the default speaker, so the TTS runs exactly as for an LLM reply: its first 10 BERT
  text tokens are prefilled and the first 25-token call made as soon as they are there, one more 10-token text chunk
  per call after that, and `done()` flushes the rest (calls until EOS). Long texts restart in a new segment at a
  sentence end, as replies do. While no text is there, the request waits (its TTS row idle).
- `feed.sufficient_at` is the `time.monotonic()` of the append that first gave the TTS enough text for its first
  call (None until then): first audio minus it is the latency the text producer sees.
- `close()` on the stream cancels at the current step and frees its rows, whatever the feed's state.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from omnivox.engine.request import TTS_EOS, LLMChunk, Reply
from omnivox.engine.text import detect_language, normalize_for_tts
from omnivox.engine.types import AUDIO_TOKENS_PER_SECOND
from omnivox.errors import InvalidRequest

UNLIMITED_AUDIO_TOKENS = 1 << 30  # forced runs: no forced end of speech before the text is complete


class AwaitText:
    """What the stand-in LLM side waits on: never answered; the feed puts chunks in the request itself."""


AWAIT_TEXT = AwaitText()


def awaiting_text() -> Generator[object, object, None]:
    yield AWAIT_TEXT


class TextFeed:
    """Thread-safe text source: `append` pieces, then `done`; the engine loop `take`s them when told to."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[str] = []
        self._last_append: float | None = None
        self._done = False
        self._on_input: Callable[[], None] | None = None
        self.text = ""  # everything appended so far
        self.sufficient_at: float | None = None

    def attach(self, on_input: Callable[[], None]) -> None:
        """Called (on the producer's thread) after each append and after done; the engine queues a take."""
        with self._lock:
            self._on_input = on_input
        on_input()  # what came before the request started

    def append(self, text: str) -> None:
        with self._lock:
            if self._done:
                raise InvalidRequest("the input is already done: start a new read-aloud to speak more text")
            if not text:
                return
            self._pending.append(text)
            self.text += text
            self._last_append = time.monotonic()
            notify = self._on_input
        if notify is not None:
            notify()

    def done(self) -> None:
        with self._lock:
            self._done = True
            notify = self._on_input
        if notify is not None:
            notify()

    @property
    def is_done(self) -> bool:
        return self._done

    def take(self) -> tuple[str, bool, float | None]:
        """(the text appended since the last take, whether the input is done, the time of its last append)."""
        with self._lock:
            text, self._pending = "".join(self._pending), []
            return text, self._done, self._last_append


class FeedReader:
    """Moves the feed's text into a live request as word-sized LLM chunks (runs on the engine loop's thread)."""

    def __init__(self, feed: TextFeed, reply: Reply, tts_tokenizer: Any, forced_words_per_second: float | None):
        self.feed = feed
        self.reply = reply
        self.tts_tokenizer = tts_tokenizer
        self.forced_words_per_second = forced_words_per_second
        self.seen = ""
        self.ended = False

    def pump(self, live: Any) -> None:
        if self.ended:
            return
        text, done, appended_at = self.feed.take()
        for word in re.findall(r"\s*\S+\s*|\s+", text):
            self.seen += word
            if self.feed.sufficient_at is None:
                normalized = normalize_for_tts(self.seen.split(TTS_EOS)[0], detect_language(self.seen))
                if len(self.tts_tokenizer.encode(normalized)) >= self.reply.text_chunk:
                    self.feed.sufficient_at = appended_at
            live.chunks.append(LLMChunk(word))
        if done:
            self.ended = True
            if self.forced_words_per_second is not None and self.reply.forcing is not None:
                seconds = max(len(self.seen.split()), 1) / self.forced_words_per_second
                self.reply.forcing.audio_tokens = round(seconds * AUDIO_TOKENS_PER_SECOND)
            live.llm.done = True  # the speech takes the chunks left, then gets None: the end of the text
