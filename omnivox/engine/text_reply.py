"""Text-only replies: the LLM alone, for a chat turn that asks for no audio (`modalities: ["text"]`).

Contract (what `Engine.chat_text` promises):
- The prompt is the one `Engine.stream` builds (default-voice system prompt, history, user turn), so the multi-turn
  rules are the same; the reply header is the plain assistant turn, without the speaker and `<|tts_bos|>` tokens
  that start a spoken reply.
- It runs in the engine loop as a request with an LLM side and no TTS row: `text_llm` asks for one `LLMDecode` per
  token (batched with the other requests' decode steps; no 3-token calls, no TTS waits for them), sampled with the
  request's SamplingParams; the repetition window is the reply header and the reply so far.
- The reply ends at a terminator (`<|im_end|>`, `<|endoftext|>`: finish_reason "eos", never shown) or after
  `sampling.max_new_tokens` tokens ("length"). `<|tts_eos|>` is not shown either.
- With `forced_ids` (random weights), those tokens replace the sampled ones, then `<|im_end|>` ends the reply.
- The SpeechStream's chunks carry the text deltas in `text` and no audio (`pcm` empty); the last chunk is empty with
  `is_last`. Deltas are UTF-8 safe (a token that ends mid-character is held back) and keep every token: unlike the
  spoken path's LLMTextDecoder, which drops id 0 as the official streaming code does ("!" in Qwen2's vocabulary).
  `close()` cancels at the current step; `metrics` has prompt_tokens, llm_tokens, reply_text, finish_reason.
- After the reply, a session's next turn starts with `<|im_end|>`: the terminator (or the cut) is closed there.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from omnivox.engine.request import LLMChunk, Piece
from omnivox.engine.session import Session
from omnivox.engine.text import REPLACEMENT_CHAR
from omnivox.engine.types import RequestMetrics, SamplingParams
from omnivox.engine.work import NEXT_CHUNK, LLMDecode

TEXT_ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"
TTS_EOS = "<|tts_eos|>"

Coroutine = Generator[object, object, None]


def text_llm(tokenizer: Any, session: Session, sampling: SamplingParams, metrics: RequestMetrics,
             forced_ids: list[int] | None = None) -> Coroutine:
    """The LLM side: yields LLMDecode work (sent back (token, hidden)) and one LLMChunk per new piece of text."""
    special = tokenizer.special
    terminators = (special.im_end, special.endoftext)
    if forced_ids is not None:
        forced_ids = [*forced_ids, special.im_end]
    feed = tokenizer.encode(TEXT_ASSISTANT_HEADER)
    window, reply_ids, shown = list(feed), [], ""
    session.last_reply_terminated = True  # text mode: nothing but <|im_end|> is ever left open
    metrics.finish_reason = ""
    for n in range(sampling.max_new_tokens):
        token, _ = yield LLMDecode(feed, list(window))
        if forced_ids is not None:
            token = forced_ids[min(n, len(forced_ids) - 1)]
        metrics.llm_tokens += 1
        if token in terminators:
            metrics.finish_reason = "eos"
            yield LLMChunk("", num_tokens=1, session_length=session.length, ended=True)
            return
        window.append(token)
        reply_ids.append(token)
        feed = [token]
        text = tokenizer.decode(reply_ids).replace(TTS_EOS, "")
        if text.endswith(REPLACEMENT_CHAR) or len(text) <= len(shown):
            continue  # a character split across tokens: wait for its last byte
        delta, shown = text[len(shown):], text
        metrics.reply_text = shown
        yield LLMChunk(delta, num_tokens=1, session_length=session.length)
    metrics.finish_reason = "length"


def text_speech() -> Coroutine:
    """The speech side of a text reply: each LLM chunk's text as a Piece without audio, then the last Piece."""
    empty = np.zeros(0, dtype=np.float32)
    while True:
        chunk = yield NEXT_CHUNK
        if chunk is None:
            break
        if chunk.text:
            yield Piece(empty, chunk.text)
    yield Piece(empty, "", final=True)
