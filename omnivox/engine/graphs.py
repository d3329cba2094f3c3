"""CUDA-graph capture for the fast path's fixed-shape steps, plus the static caches and pools they bake in.

A captured graph replays the exact kernels it recorded on the exact buffers it recorded them on, so every buffer a
step reads or writes (KV cache, inputs, outputs, device-side counters) is allocated once and owned by a `Slot`;
a graph is captured per slot (and per sampling constant set) the first time that slot runs the step. The graphs that
replay on one stream share a memory pool (and are captured on that stream, see `StepGraph`): their replays are
serialised and each step's outputs are consumed (copied out) before the next replay, as in nano-vllm's
`capture_cudagraph`.

Random draws inside a graph use a runner-owned CUDA generator registered with every graph
(`CUDAGraph.register_generator_state`): each replay then advances that generator's Philox offset exactly as the
same ops run eagerly would. Before replays the runner copies the request's generator state into it and copies it
back afterwards, so a request draws the same numbers on either path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from omnivox.errors import EngineBusy


class StepGraph:
    """One captured call of `fn()` (which reads and writes only buffers that outlive the graph), to be replayed on
    the stream it was captured on.

    Why that stream: PyTorch gives cuBLAS one workspace per stream, and a captured product keeps the workspace of
    the stream it was captured on. Graphs captured on one stream but replayed at the same time on different
    streams share that scratch memory and can corrupt each other's results. torch.cuda.graph captures every graph
    on one shared side stream unless told otherwise; on the H200, bf16 codes with and without overlap then parted
    where the LLM began running beside the TTS (bench/RESULTS.md §7). Captured on its replay stream, a graph shares
    a workspace only with work that stream runs one item at a time anyway."""

    def __init__(
        self,
        fn: Callable[[], Any],
        pool: Any,
        stream: torch.cuda.Stream,
        generators: tuple[torch.Generator, ...] = (),
        warmup: int = 1,
        before_capture: Callable[[], None] | None = None,
    ):
        """Runs `fn` `warmup` times on `stream` (lazy init, compilation, the stream's cuBLAS workspace), calls
        `before_capture` (e.g. to restore state the warm-up advanced), then records it on `stream`, which must
        not be the legacy default stream (a capture needs another)."""
        caller = torch.cuda.current_stream()
        stream.wait_stream(caller)
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        caller.wait_stream(stream)
        if before_capture is not None:
            before_capture()
        self.graph = torch.cuda.CUDAGraph()
        for gen in generators:
            self.graph.register_generator_state(gen)
        with torch.cuda.graph(self.graph, pool=pool, stream=stream):
            self.output = fn()
        self.stream = stream

    def replay(self) -> Any:
        self.graph.replay()
        return self.output


@dataclass
class Slot:
    """One request's worth of static buffers: a KV cache, the step's device inputs/outputs, and its graphs."""

    index: int
    cache: Any  # StaticKVCache
    io: dict[str, torch.Tensor] = field(default_factory=dict)
    graphs: dict[Any, StepGraph] = field(default_factory=dict)


class SlotPool:
    """A fixed set of slots, allocated once. `acquire` hands out the most recently released slot (so a server that
    serves one request at a time keeps replaying the graphs it already captured); `EngineBusy` when none is free."""

    def __init__(self, name: str, make: Callable[[int], Slot], size: int):
        if size < 1:
            raise ValueError(f"a {name} pool needs at least one slot, got {size}")
        self.name = name
        self.slots = [make(i) for i in range(size)]
        self._free = list(reversed(range(size)))
        self._by_cache = {id(slot.cache): slot for slot in self.slots}

    @property
    def size(self) -> int:
        return len(self.slots)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def acquire(self) -> Slot:
        if not self._free:
            raise EngineBusy(
                f"all {self.size} {self.name} caches are in use (each live request or open session holds one); "
                "retry shortly or close a session",
                retry_after_s=1.0,
            )
        return self.slots[self._free.pop()]

    def slot_of(self, cache: Any) -> Slot:
        slot = self._by_cache.get(id(cache))
        if slot is None or slot.cache is not cache:
            raise ValueError(f"this cache does not belong to the {self.name} pool")
        return slot

    def release(self, cache: Any) -> None:
        slot = self.slot_of(cache)
        if slot.index in self._free:
            return  # released twice (a cancelled stream and its session): harmless
        self._free.append(slot.index)

    @property
    def nbytes(self) -> int:
        return sum(slot.cache.nbytes for slot in self.slots)


class LayerKVCache:
    """The fast path's static cache: preallocated like `StaticKVCache`, but one buffer per layer, written with
    `index_put_` (`k[:, :, positions] = ...`). Compiled bodies then update it in place; with one tensor for all
    layers, torch.compile functionalises each layer's write into a copy of the whole cache (measured on an H100:
    ~0.1 ms per copy, several per step)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype, device):
        shape = (1, num_kv_heads, capacity, head_dim)
        self.ks = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.vs = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity

    def seek(self, start: int) -> None:
        """Writes land where `positions` says (the cache contract of kv_cache.py)."""

    def key_len(self, write_end: int) -> int:
        return self.capacity

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.ks[layer], self.vs[layer]
        keys[:, :, positions] = k
        values[:, :, positions] = v
        return keys, values

    def reset(self) -> None:
        for t in (*self.ks, *self.vs):
            t.zero_()

    def truncate_(self, length: int) -> None:
        for t in (*self.ks, *self.vs):
            t[:, :, length:].zero_()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.ks, *self.vs))


class CacheWindow:
    """A static cache seen through its first `length` positions: writes land in the full buffers (at `positions`),
    attention reads keys [0, length) only."""

    def __init__(self, cache: LayerKVCache, length: int):
        self.cache, self.length = cache, length

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.cache.update(layer, positions, k, v)
        return keys[:, :, : self.length], values[:, :, : self.length]


def bucket(end: int, size: int, capacity: int) -> int:
    """Smallest multiple of `size` that is >= end (positions 0..end-1 fit), at most the capacity."""
    return min(-(-end // size) * size, capacity)
