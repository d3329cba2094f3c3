"""Plain data passed between the engine and its callers (CLI, bench, server)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SAMPLE_RATE = 24000
SAMPLES_PER_AUDIO_TOKEN = 512  # 2 mel frames x 256-sample hop
AUDIO_TOKENS_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_AUDIO_TOKEN  # 46.875


@dataclass(frozen=True)
class SamplingParams:
    """Official streaming defaults (fact sheet 4.14). `greedy` takes argmax everywhere and turns penalties off."""

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 100
    repetition_penalty: float = 1.05
    tts_temperature: tuple[float, float, float, float] = (0.1, 0.3, 0.1, 0.3)
    tts_top_p: float = 0.7
    tts_top_k: int = 20
    tts_repetition_penalty: float = 1.0
    max_new_tokens: int = 512
    greedy: bool = False


@dataclass
class AudioChunk:
    """One piece of the spoken reply: float32 mono PCM at 24 kHz and the text it speaks."""

    pcm: np.ndarray  # float32 [num_samples]
    text: str  # text delta first spoken in this chunk ("" when the chunk only continues earlier text)
    index: int  # 0, 1, 2 ... within the request
    audio_start_s: float  # where this chunk starts on the reply's audio timeline
    ready_s: float  # seconds from request start until the chunk was available to the caller
    is_last: bool = False
    sample_rate: int = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / self.sample_rate


STAGES = ("model_load", "tts_init", "prefill", "llm", "tts", "audio")


FIRST_AUDIO_MILESTONES = (
    "admitted",  # the engine loop took the request
    "decoding",  # the prompt is prefilled and the LLM's first decode step is launched
    "text",  # the first chunk of reply text is ready for the speech
    "speaking",  # the first TTS step is launched (after the TTS text prefill)
    "audio",  # the first audio is delivered
)


@dataclass
class RequestMetrics:
    """Per-request timing. Stage times are seconds; on a GPU they are device-synchronised at stage boundaries."""

    request_id: str = ""
    ttfb_s: float = float("nan")  # request start -> first audio sample available to the caller
    # when the official framing (first chunk held until the second TTS call) would have released its first audio;
    # equals ttfb_s with --no-early-first-chunk
    ttfb_official_s: float = float("nan")
    # where the time to first audio went: seconds from request start to each step on the way that this request
    # took (FIRST_AUDIO_MILESTONES; read-aloud has no LLM steps)
    first_audio_milestones: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0  # request start -> last chunk available
    audio_s: float = 0.0  # seconds of audio produced
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    llm_tokens: int = 0  # decode steps of the LLM (prompt prefill excluded)
    tts_steps: int = 0  # audio tokens decoded by the TTS (EOS step included)
    tts_calls: int = 0
    prompt_tokens: int = 0
    reply_text: str = ""
    finish_reason: str = ""  # "eos" | "length" | "cancelled" | "error"

    @property
    def rtf(self) -> float:
        return self.total_s / self.audio_s if self.audio_s > 0 else float("inf")

    @property
    def generation_s(self) -> float:
        return self.stages["llm"] + self.stages["tts"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rtf"] = self.rtf
        d["generation_s"] = self.generation_s
        return d
