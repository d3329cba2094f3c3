"""The work a request can ask for, as plain data. A request's coroutine yields one of these and is sent its result;
the scheduler batches the same kind of work of many requests and hands it to an executor.

A request never calls a model: everything it needs from the GPU is one of the items below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LLMPrefill:
    """Run `ids` at the session's next positions. Result: None."""

    ids: list[int]


@dataclass
class LLMDecode:
    """Run `ids` (one token, or the reply header, which the engine sends with the turn's prompt before it) at the
    session's next positions, then sample one token with the repetition window `window`. Result: (token, post-norm
    hidden at `hidden_at` or None)."""

    ids: list[int]
    window: list[int]
    hidden_at: int | None = None  # index into `ids` whose hidden state is wanted (the <|spk|> of the header)


@dataclass
class ProjectSpeaker:
    """LLM hidden at <|spk|> -> TTS speaker vector. Result: tensor [C_tts] on the device."""

    hidden: torch.Tensor


@dataclass
class NewSegment:
    """Start a TTS segment (a fresh TTS cache slot; the request's previous one, if any, is given back). Result: None."""


@dataclass
class TTSPrefillText:
    """Write TTS text slots begin..begin+len(ids)-1 (the speaker vector replaces the [spk_emb] slot). Result: None."""

    ids: list[int]
    begin: int
    speaker: torch.Tensor | None = None


@dataclass
class TTSPrefillAudio:
    """Segment restart: `[Ptts]` + codes[:-1] at slots 302.. as one non-causal block. Result: None."""

    codes: np.ndarray  # [n, num_vq]
    num_text_tokens: int


@dataclass
class TTSCall:
    """Audio tokens of the current segment, one per step, until EOS or the last step (one official `generate` call
    of at most 25 tokens). Step i writes slot `position` + i and feeds the token drawn at step i - 1 (step 0 feeds
    `prev_codes`). Result: a `TTSCallResult`."""

    position: int  # TTS slot of the first step (302 + codes so far)
    prev_codes: Sequence[int] | None  # the last audio token (None: the segment's first step feeds [Ptts])
    num_text_tokens: int  # text visible to the audio mask
    ban_eos: tuple[bool, ...]  # per step: EOS may not be drawn (its length is the call's number of steps)
    force_eos: tuple[bool, ...]  # per step: EOS is drawn (random-weight runs)

    @property
    def steps(self) -> int:
        return len(self.ban_eos)


@dataclass
class TTSCallResult:
    codes: list[tuple[int, ...]]  # the audio tokens drawn before EOS (num_vq ints each)
    eos: bool  # the call ended on EOS (the segment is over)


@dataclass
class Vocode:
    """DVAE + Vocos over a window of audio tokens. Result: float32 PCM np.ndarray [T * 512]."""

    codes: np.ndarray  # [T, num_vq]


class NextChunk:
    """The speech side asks for the reply's next LLM chunk (None once the reply text is over)."""


NEXT_CHUNK = NextChunk()
