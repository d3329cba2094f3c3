"""Per-conversation and per-segment state. Everything carried between steps lives here, nothing in the modules."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from omnivox.engine.kv_cache import GrowingKVCache, StaticKVCache

_session_ids = itertools.count()


@dataclass
class Session:
    """One conversation: the LLM cache (kept between turns) and how the next user turn must start."""

    cache: GrowingKVCache | StaticKVCache | None  # None once the session is closed
    capacity: int  # positions the session may use in total (prompt + replies)
    length: int = 0  # positions already in the cache (host mirror; never read back from the GPU)
    system_prompted: bool = False
    last_reply_terminated: bool = True
    turns: int = 0
    id: str = field(default_factory=lambda: f"s{next(_session_ids)}")

    def reset(self) -> None:
        self.cache.reset()
        self.length = 0
        self.system_prompted = False
        self.last_reply_terminated = True
        self.turns = 0

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0


@dataclass
class TTSState:
    """One TTS segment: its cache (302 condition slots, then audio) and the audio tokens decoded so far."""

    cache: GrowingKVCache | StaticKVCache
    codes: list[torch.Tensor] = field(default_factory=list)  # each [num_vq] long; EOS row excluded
    num_decoded: int = 0  # codes already turned into audio (the next window re-decodes 4 of them as context)
    finished: bool = False

    @property
    def num_codes(self) -> int:
        return len(self.codes)

    def codes_tensor(self, start: int = 0) -> torch.Tensor:
        return torch.stack(self.codes[start:])  # [T, num_vq]
