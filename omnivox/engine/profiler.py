"""Per-request stage timing.

On CUDA the device is synchronised when a stage starts and ends, so each stage's time is the true device time of
the work issued inside it (not the time to enqueue it); the synchronisations happen only at stage boundaries
(a handful per audio chunk). NVTX ranges name the stages for Nsight, and `torch.profiler` traces show them.
The clock is injectable so tests can check the arithmetic with a fake clock.

Inside `overlapped()` (the LLM running ahead while a TTS call computes on another stream) stages do not
synchronise the device, which would wait for the other stream's work: they are then host time between the
synchronisations the work does itself (an LLM step reads its token back). Work whose result arrives later (a TTS
call, a vocoder window) is timed by the runner and added with `add`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from omnivox.engine.types import RequestMetrics


class StageTimer:
    def __init__(self, metrics: RequestMetrics, device: torch.device, clock: Callable[[], float] = time.perf_counter):
        self.metrics = metrics
        self.clock = clock
        self.cuda = device.type == "cuda"
        self.device = device
        self.start = clock()
        self._overlapped = 0

    def _sync(self) -> None:
        if self.cuda and not self._overlapped:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def overlapped(self) -> Iterator[None]:
        """Stages opened inside do not synchronise the device (other streams are busy on purpose)."""
        self._overlapped += 1
        try:
            yield
        finally:
            self._overlapped -= 1

    def add(self, name: str, seconds: float) -> None:
        """Adds time measured elsewhere (a runner's events) to a stage."""
        self.metrics.stages[name] = self.metrics.stages.get(name, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        if self.cuda:
            torch.cuda.nvtx.range_push(name)
        t0 = self.clock()
        try:
            yield
        finally:
            self._sync()
            if self.cuda:
                torch.cuda.nvtx.range_pop()
            self.add(name, self.clock() - t0)

    def elapsed(self) -> float:
        return self.clock() - self.start

    def mark_audio_ready(self, audio_s: float) -> float:
        """Record that `audio_s` more seconds are available to the caller now; returns the time since start."""
        now = self.elapsed()
        if self.metrics.audio_s == 0.0 and audio_s > 0:
            self.metrics.ttfb_s = now
        self.metrics.audio_s += audio_s
        self.metrics.total_s = now
        return now
