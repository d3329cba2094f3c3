"""Multi-token LLM forwards (prompt prefills, the 9-token assistant header) padded to a few lengths, one CUDA graph
per length.

Why: run eagerly, each such forward is ~1400 small kernel launches, 15-30 ms on an H100, while reading the weights
once takes ~5 ms; a new conversation pays for three of them (system prompt, user prompt, header) before its first
audio. Their lengths change with every prompt, so a graph per exact length would be captured anew for most
requests. Instead a forward of T tokens at positions start..start+T-1 runs over `Tb` tokens, the smallest of
`PREFILL_BUCKETS` that holds T, and one graph is kept per (slot, Tb, key bucket). On a CPU, or with graphs off, the
same padded function runs eagerly, so the CPU tests exercise the padding, the positions and the mask.

What padding does, and why it is harmless:

* Inputs live in a slot's device buffer (`[start, ids..., last id repeated]`); positions = start + arange(Tb) and
  the causal mask (key <= query position, keys read through a `CacheWindow` of the key-length bucket, as the
  decode step does) are computed on the device, so one graph serves every start.
* Real rows never see a padded row: the query at start+i attends keys <= start+i, padded rows sit at >= start+T.
* Padded rows write junk K/V at start+T..start+Tb-1. No later step reads a slot before the real token at that
  position has overwritten it: positions are written in order, every query at p masks keys > p, and the token at p
  writes its own slot (in each layer, before attention reads it). Truncating a session zeroes past its length.
* The padded call runs only when start + Tb <= capacity (otherwise the caller runs the forward eagerly), so the
  rows' positions are distinct and inside the cache. With clamping alone the overflowing rows would all write slot
  capacity-1: junk past the real tokens, or, when that slot is the last real one, a copy of its row (same id,
  position and mask row: equal up to rounding), several rows writing one slot in one `index_put_`, in no defined
  order on CUDA. Rather than rely on that, such calls run eagerly (rare: a session within 256 positions of its
  capacity). The clamp in the body only guarantees that no replay ever writes out of bounds.
* Padding changes the matmuls' row count (M = Tb instead of T), so the hidden states equal the eager forward's
  within rounding, not necessarily bit for bit.

Buckets: the standard workload's prompts are 22 tokens (system prompt of a new conversation), 8-10 (user turn)
and 9 (header), so two graphs per slot (16 and 32 rows, key bucket 512) cover it; 64..256 cover longer prompts at
most 2x padding. Longer prompts stay eager (their launch overhead is small next to their compute).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from omnivox.engine.graphs import CacheWindow, Slot, StepGraph, bucket

PREFILL_BUCKETS = (16, 32, 64, 128, 256)
WARM_UP_TOKENS = 32  # warm_up captures these buckets: the standard prompts (8-22 tokens) and the header (9)
BUFFER = "prefill"  # the slot's io entry: [start, ids of the largest bucket]


class PrefillGraphs:
    """Padded multi-token forwards over the static caches of an LLM slot pool (see the module docstring).

    `decoder(embeds [1, T, C], positions [T], cache, mask) -> post-norm hidden [1, T, C]` and `embed(ids [1, T])`
    are the model's (the runner's decode forward and `llm.embed`). `key_bucket`: attention reads the cache in
    multiples of this many positions. `pool`: the graph memory pool the runner's LLM graphs share, and `stream`
    the stream they all replay on (the caller runs `run` on it; replays are serialised with theirs, and each call's
    rows are copied out before it returns)."""

    def __init__(
        self,
        decoder: Callable[..., torch.Tensor],
        embed: Callable[[torch.Tensor], torch.Tensor],
        capacity: int,
        key_bucket: int,
        device: torch.device,
        pool: Any = None,
        stream: torch.cuda.Stream | None = None,
        use_graphs: bool = False,
        buckets: tuple[int, ...] = PREFILL_BUCKETS,
    ):
        self.decoder, self.embed = decoder, embed
        self.capacity, self.key_bucket = capacity, key_bucket
        self.device, self.pool, self.stream, self.use_graphs = device, pool, stream, use_graphs
        self.buckets = tuple(sorted(buckets))
        self.keys = torch.arange(max(capacity, self.buckets[-1]), device=device)
        self.pin = device.type == "cuda"

    def padded_length(self, start: int, n: int) -> int | None:
        """Tb for `n` tokens at `start`, or None: the forward must run eagerly (too long, or too near the end)."""
        tb = next((b for b in self.buckets if b >= n), None)
        if n < 1 or tb is None or start + tb > self.capacity:
            return None
        return tb

    def key_length(self, start: int, tb: int) -> int:
        return bucket(start + tb, self.key_bucket, self.capacity)

    def _buffer(self, slot: Slot) -> torch.Tensor:
        buf = slot.io.get(BUFFER)
        if buf is None:
            buf = slot.io[BUFFER] = torch.zeros(1 + self.buckets[-1], dtype=torch.long, device=self.device)
        return buf

    def forward(self, slot: Slot, tb: int, length: int) -> torch.Tensor:
        """The padded forward (captured as is): reads the slot's buffer -> hidden [Tb, C] (rows >= T are junk)."""
        buf = slot.io[BUFFER]
        positions = (buf[0:1] + self.keys[:tb]).clamp(max=self.capacity - 1)  # bounds guard only, see above
        mask = (self.keys[:length] <= positions[:, None])[None, None]  # [1, 1, Tb, length]
        ids = buf[1 : 1 + tb].view(1, tb)
        return self.decoder(self.embed(ids), positions, CacheWindow(slot.cache, length), mask)[0]

    def graph(self, slot: Slot, tb: int, length: int) -> StepGraph:
        """The slot's graph for (Tb, key length), captured on first use. Capturing runs the forward once for real
        on whatever the buffer holds (its K/V writes are redone identically by the replay that follows)."""
        key = ("prefill", tb, length)
        graph = slot.graphs.get(key)
        if graph is None:
            self._buffer(slot)
            graph = slot.graphs[key] = StepGraph(partial(self.forward, slot, tb, length), self.pool, self.stream)
        return graph

    def run(self, slot: Slot, start: int, ids: list[int]) -> torch.Tensor:
        """`ids` at positions start.. of the slot's cache -> hidden [T, C] (a copy: the graph's output is reused).
        The caller checks `padded_length` first and picks the SDPA backends."""
        n = len(ids)
        tb = self.padded_length(start, n)
        if tb is None:
            raise ValueError(f"{n} tokens at {start} need an eager forward (buckets {self.buckets}, capacity "
                             f"{self.capacity})")  # fmt: skip
        length = self.key_length(start, tb)
        # a fresh pinned tensor per call: the caching host allocator keeps it until the async copy has run
        stage = torch.tensor([start, *ids, *[ids[-1]] * (tb - n)], dtype=torch.long, pin_memory=self.pin)
        buf = self._buffer(slot)
        buf[: 1 + tb].copy_(stage, non_blocking=self.pin)
        hidden = self.graph(slot, tb, length).replay() if self.use_graphs else self.forward(slot, tb, length)
        return hidden[:n].clone()

    def warm_up(self, slot: Slot, max_positions: int, max_tokens: int = WARM_UP_TOKENS) -> None:
        """Capture on `slot` the graphs of every bucket up to `max_tokens` rows and every key bucket up to
        `max_positions`. Writes junk into its cache: the caller resets it."""
        if not self.use_graphs:
            return
        buf = self._buffer(slot)
        for tb in (b for b in self.buckets if b <= max_tokens):
            for length in range(self.key_bucket, min(max_positions, self.capacity) + 1, self.key_bucket):
                if length >= tb:
                    buf.zero_()
                    buf[0] = max(0, length - tb)  # a start whose key bucket is `length`
                    self.graph(slot, tb, length)
