"""Text-only replies: the LLM alone, for a chat turn that asks for no audio (`modalities: ["text"]`).

Contract (what `Engine.chat_text` promises, whatever runner sits below):
- The prompt is the one `Engine.stream` builds (default-voice system prompt, history, user turn), so the multi-turn
  rules are the same; the reply header is the plain assistant turn, without the speaker and `<|tts_bos|>` tokens
  that start a spoken reply.
- Tokens are generated one `runner.llm_step` at a time (no 3-token calls: no TTS waits for them), sampled with the
  request's SamplingParams; the repetition penalty sees the reply header and the reply so far.
- The reply ends at a terminator (`<|im_end|>`, `<|endoftext|>`: finish_reason "eos", never shown) or after
  `sampling.max_new_tokens` tokens ("length"). `<|tts_eos|>` is not shown either.
- With `forced_ids` (random weights), those tokens replace the sampled ones, then `<|im_end|>` ends the reply.
- Iterating yields text deltas (UTF-8 safe: a token that ends mid-character is held back until complete). Unlike
  the spoken path's LLMTextDecoder, which drops id 0 as the official streaming code does, every token is kept:
  in Qwen2's vocabulary id 0 is "!";
  `close()` cancels at the current token and frees the request's caches; `metrics` is a RequestMetrics with
  prompt_tokens, llm_tokens, reply_text, finish_reason, total_s, stages["llm"], and ttfb_s = first text delta.
- After the reply, a session's next turn starts with `<|im_end|>`: the terminator (or the cut) is closed there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from omnivox.engine.profiler import StageTimer
from omnivox.engine.session import Session
from omnivox.engine.text import REPLACEMENT_CHAR
from omnivox.engine.types import SamplingParams

TEXT_ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"
TTS_EOS = "<|tts_eos|>"


def text_reply(runner: Any, session: Session, sampling: SamplingParams, generator: torch.Generator | None,
               timer: StageTimer, tokenizer: Any, forced_ids: list[int] | None = None) -> Iterator[str]:
    """The reply to a prefilled user turn, as text deltas; fills `timer.metrics` as it goes."""
    special = tokenizer.special
    terminators = (special.im_end, special.endoftext)
    if forced_ids is not None:
        forced_ids = [*forced_ids, special.im_end]
    metrics = timer.metrics
    feed = tokenizer.encode(TEXT_ASSISTANT_HEADER)
    window, reply_ids, shown = list(feed), [], ""
    session.last_reply_terminated = True  # text mode: nothing but <|im_end|> is ever left open
    metrics.finish_reason = "length"
    for n in range(sampling.max_new_tokens):
        with timer.stage("llm"):
            token, _ = runner.llm_step(session, feed, window, sampling, generator)
        if forced_ids is not None:
            token = forced_ids[min(n, len(forced_ids) - 1)]
        metrics.llm_tokens += 1
        if token in terminators:
            metrics.finish_reason = "eos"
            break
        window.append(token)
        reply_ids.append(token)
        feed = [token]
        text = tokenizer.decode(reply_ids).replace(TTS_EOS, "")
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(shown):
            continue  # a character split across tokens: wait for its last byte
        delta, shown = text[len(shown):], text
        if metrics.ttfb_s != metrics.ttfb_s:  # NaN: this is the first text
            metrics.ttfb_s = timer.elapsed()
        metrics.reply_text = shown
        yield delta


class TextStream:
    """Iterator of text deltas for one request; `close()` cancels it and frees its caches at once."""

    def __init__(self, engine: Any, deltas: Iterator[str], timer: StageTimer, session: Session,
                 owned_session: bool):
        self.engine = engine
        self.metrics = timer.metrics
        self._deltas = deltas
        self._timer = timer
        self._session = session
        self._owned_session = owned_session
        self._done = False

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._deltas)
        except StopIteration:
            self._finish("")
            raise
        except BaseException:
            self._finish("error")
            raise

    @property
    def cache_bytes(self) -> int:
        return self._session.cache_bytes if self._owned_session and not self._done else 0

    def close(self) -> None:
        if not self._done:
            self._finish("cancelled")

    def _finish(self, reason: str) -> None:
        if self._done:
            return
        self._done = True
        self._deltas.close()
        if self._owned_session:
            self.engine.close_session(self._session)
        self.metrics.total_s = self._timer.elapsed()
        if reason:
            self.metrics.finish_reason = reason
        self.engine._release(self)

    def __del__(self) -> None:
        if not getattr(self, "_done", True):
            self.close()
