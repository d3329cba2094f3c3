"""CUDA graphs of fixed-shape steps, one per shape key, replayed with fresh inputs.

A step function reads only its input tensors and buffers that outlive the graph (the KV pools, the weights), so
`run` copies the inputs into the graph's own input buffers and replays. Every graph is captured and replayed on the
one stream the engine loop runs on, and they share one memory pool, as nano-vllm's `capture_cudagraph` does: the
engine consumes each output (copies it to the host) before the next replay. With graphs off (always on a CPU) `run`
calls the function.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch

Step = Callable[..., torch.Tensor]


class GraphCache:
    def __init__(self, device: torch.device, enabled: bool, stream: torch.cuda.Stream | None = None):
        self.enabled = enabled and device.type == "cuda"
        self.stream = stream
        self.pool = torch.cuda.graph_pool_handle() if self.enabled else None
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], Any]] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: Hashable, fn: Step, inputs: dict[str, torch.Tensor]) -> Any:
        if not self.enabled:
            return fn(**inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(fn, inputs)
        graph, static, output = entry
        for name, value in inputs.items():
            static[name].copy_(value, non_blocking=True)
        graph.replay()
        return output

    def _capture(self, fn: Step, inputs: dict[str, torch.Tensor]):
        static = {name: value.clone() for name, value in inputs.items()}
        fn(**static)  # warm-up: lazy initialisation and the stream's cuBLAS workspace, outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn(**static)
        return graph, static, output


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512)


def batch_bucket(rows: int, limit: int) -> int:
    """The captured batch size that holds `rows` rows (at most `limit`, the pool's size)."""
    for size in BATCH_BUCKETS:
        if size >= rows:
            return min(size, limit)
    return limit


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
