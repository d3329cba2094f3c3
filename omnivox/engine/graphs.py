"""CUDA graphs of fixed-shape steps, one per shape key, replayed with fresh inputs; results read back without
blocking the loop.

A step function reads only its input tensors and buffers that outlive the graph (the KV pools, the weights), so
`run` copies the inputs (host arrays, through pinned memory: a copy from pageable memory could wait for the work
queued on the stream) into the graph's own input buffers and replays. Each cache captures and replays on one CUDA
stream and has its own memory pool: graphs of one cache never run at the same time, graphs of two caches may (the
LLM's beside the TTS's), so they must not share intermediate memory. With graphs off (always on a CPU) `run`
calls the function.

Step bodies may call compiled layers (omnivox/models/layers.py, `compiled=True`): the compiled code is captured
inside our graphs, as gpt-fast and nano-vllm capture theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import numpy as np
import torch

Step = Callable[..., Any]


class GraphCache:
    def __init__(self, device: torch.device, enabled: bool, stream: torch.cuda.Stream | None = None):
        self.device = device
        self.enabled = enabled and device.type == "cuda"
        self.stream = stream
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], Any]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, fn: Step, inputs: dict[str, np.ndarray | torch.Tensor]) -> Any:
        """Runs `fn(**inputs)` (as the graph captured under `key`, with graphs on); inputs may be host arrays."""
        if not self.enabled:
            return fn(**{name: _on(self.device, value) for name, value in inputs.items()})
        entry = self._graphs.get(key)
        if entry is None:
            # the step runs once, eagerly (which also compiles and initialises what the capture needs), and is
            # captured for the next time without running: a step may update buffers it reads (the TTS step's drawn
            # codes), so running it twice would not give the same result as running it once
            static = {name: _on(self.device, value).clone() for name, value in inputs.items()}
            output = fn(**static)
            self._graphs[key] = self._record(fn, static)
            return output
        graph, static, output = entry
        for name, value in inputs.items():
            if isinstance(value, np.ndarray):
                value = torch.from_numpy(value)
                if self.device.type == "cuda":  # from pageable memory the copy could wait for the stream's work
                    value = value.pin_memory()
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return output

    def _record(self, fn: Step, static: dict[str, torch.Tensor]):
        """Captures `fn` on the graph's input buffers `static`; nothing runs."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn(**static)
        return graph, static, output


def _tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _on(device: torch.device, value: np.ndarray | torch.Tensor) -> torch.Tensor:
    return _tensor(value).to(device)


class Pending:
    """A result on its way back from the device: `get()` waits for it (at once on a CPU or without a stream)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], convert: Callable[..., Any],
                 stream: torch.cuda.Stream | None = None):
        self.convert = convert
        if stream is None:
            self.host, self.event = tuple(t.cpu() for t in tensors), None
            return
        with torch.cuda.stream(stream):
            self.host = tuple(t.to("cpu", non_blocking=True) for t in tensors)
            self.event = torch.cuda.Event()
            self.event.record(stream)

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def get(self) -> Any:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.convert(*(t.numpy() for t in self.host))


class Ready:
    """A result already on the host (the reference path's steps, which run one row at a time)."""

    def __init__(self, value: Any):
        self.value = value

    def ready(self) -> bool:
        return True

    def get(self) -> Any:
        return self.value


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)


def batch_bucket(rows: int, limit: int, smallest: int = 1) -> int:
    """The captured batch size that holds `rows` rows (at least `smallest`, at most `limit`, the pool's size)."""
    for size in BATCH_BUCKETS:
        if size >= max(rows, smallest):
            return min(size, limit)
    return limit


def batch_buckets(limit: int, smallest: int = 1) -> list[int]:
    """Every captured batch size a pool of `limit` rows can need."""
    return sorted({batch_bucket(n, limit, smallest) for n in range(1, limit + 1)})


def length_buckets(capacity: int, smallest: int) -> list[int]:
    """Key widths attention reads: powers of two from `smallest`, then the capacity."""
    sizes, size = [], smallest
    while size < capacity:
        sizes.append(size)
        size *= 2
    return sizes + [capacity]


def length_bucket(end: int, buckets: list[int]) -> int:
    """The smallest key width that holds positions 0..end-1."""
    return next(size for size in buckets if size >= end)
