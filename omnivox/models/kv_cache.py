"""Key/value caches handed to the models' forward: the protocol and the one implementation.

The protocol is one method, `update(layer, positions, k, v) -> (keys, values)`: attention writes the new keys and
values where `positions` says and gets back every key it may attend to. The engine owns the memory; models only
call `update`.

`KVPool` holds one buffer per layer shaped [slots, kv_heads, capacity, head_dim], allocated once. A forward sees it
through a `KVView`: a contiguous range of slots (the batch rows) and a key width (the first `key_len` positions),
so a batched step over rows 0..B-1 needs no gather and keeps static shapes for CUDA graphs. Per-layer buffers,
rather than one tensor, keep each layer's in-place write a write of that layer only.

`update(..., compiled=True)` (the engine's compiled layers) writes K and V with one compiled kernel
(`compiled_write_kv`) instead of two eager ones; the cache holds the same values either way.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as shape_config


def write_kv(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None, positions: torch.Tensor,
             k: torch.Tensor, v: torch.Tensor) -> None:
    """keys[rows[b], :, positions[b, t]] = k[b, :, t], and values from v. keys, values: [slots, kv_heads, capacity,
    head_dim]; rows: long [batch] (None: the buffers are the batch's rows, in order); positions: long [batch, T] or
    [T]; k, v: [batch, kv_heads, T, head_dim]. Two in-place index_puts; compiled (`compiled_write_kv`) one kernel."""
    if positions.dim() == 1:
        positions = positions.expand(k.shape[0], -1)
    if rows is None:
        rows = torch.arange(k.shape[0], device=k.device)
    rows = rows[:, None].expand_as(positions)
    keys[rows, :, positions] = k.transpose(1, 2)  # indexed dims first: [batch, T, kv_heads, head_dim]
    values[rows, :, positions] = v.transpose(1, 2)


def _write_view(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    write_kv(keys, values, None, positions, k, v)


def _write_rows(keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor) -> None:
    write_kv(keys, values, rows, positions, k, v)


WRITE_RECOMPILE_LIMIT = 32  # compiles of each compiled write (torch's default is 8, then an error with fullgraph)


@functools.cache
def compiled_write_kv(*, rows: bool) -> Callable[..., None]:
    """`write_kv` compiled: `rows` False for a `KVView` (its slice of the pool, no rows argument), True for `KVRows`.

    Why: a decode step is launch-bound, and eagerly the write is a kernel for K and one for V (as scatters they
    took ~7 us each on an H200, ~10 % of a TTS step). Compiled, the two index_puts have the same iteration space
    and fuse into one kernel that stores both, in place into the pool's buffers (no copy of them, no host sync: it
    captures in CUDA graphs). A write copies values, so the cache is bit-identical to the eager write's.

    Dynamic shapes without duck sizing: sizes that happen to be equal on a first call (a batch of 4 and 4 kv heads)
    would be assumed equal, and every such coincidence would cost a compile. So a compile is made per kind of call
    (one step or several, [T] or [B, T] positions, the dtype, the layout k and v come in), whatever the batch, length,
    heads or pool; the kinds are few, but the two writes get a recompile limit of their own above torch's 8, where a
    fullgraph compile fails."""
    compiled = torch.compile(_write_rows if rows else _write_view, dynamic=True, fullgraph=True)

    def write(*args: torch.Tensor | None) -> None:
        # both settings are read when a compile starts; set and restored by hand (`config.patch` costs ~70 us a call,
        # which a layer without CUDA graphs would pay at every step). Process-wide settings: safe because an
        # engine's model work runs on its one loop thread
        saved = shape_config.use_duck_shape, dynamo_config.recompile_limit
        shape_config.use_duck_shape, dynamo_config.recompile_limit = False, WRITE_RECOMPILE_LIMIT
        try:
            compiled(*args)
        finally:
            shape_config.use_duck_shape, dynamo_config.recompile_limit = saved

    return write


class KVView:
    """Rows [row, row + batch) of a pool, keys [0, key_len). `positions` [batch, T] say where each row writes."""

    def __init__(self, pool: KVPool, row: int, batch: int, key_len: int):
        if row < 0 or row + batch > pool.slots:
            raise ValueError(f"rows {row}..{row + batch - 1} are outside a pool of {pool.slots} slots")
        if not 0 < key_len <= pool.capacity:
            raise ValueError(f"key_len {key_len} must be within 1..{pool.capacity}")
        self.pool, self.rows, self.key_len = pool, slice(row, row + batch), key_len

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compiled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, kv_heads, T, head_dim]; positions: long [batch, T] or [T] (the same for every row).
        `compiled`: one compiled kernel writes K and V (`compiled_write_kv`) instead of two index writes."""
        keys, values = self.pool.k[layer][self.rows], self.pool.v[layer][self.rows]
        if compiled:
            compiled_write_kv(rows=False)(keys, values, positions, k, v)
        else:
            write_kv(keys, values, None, positions, k, v)
        return keys[:, :, : self.key_len], values[:, :, : self.key_len]


class KVPool:
    """`slots` caches of `capacity` positions for a decoder of `num_layers` layers."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        slots: int = 1,
    ):
        shape = (slots, num_kv_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots, self.capacity = slots, capacity
        self._buffers = (*self.k, *self.v)
        self._spare = [torch.empty_like(buf[0]) for buf in self._buffers]  # one slot more, for swaps

    def view(self, row: int = 0, batch: int = 1, key_len: int | None = None) -> KVView:
        return KVView(self, row, batch, self.capacity if key_len is None else key_len)

    # Bulk work on slots goes through `torch._foreach_*`, one call over every layer's K and V: whole slots (swaps,
    # moves) are dense blocks, which run as a few multi-tensor kernels on a GPU; a range of positions (zeroing, the
    # shared prompt's copy) runs a kernel per buffer, launched from one C++ loop. Launched from Python one by one, a
    # swap's kernels cost the engine loop ~2 ms of host time on a GPU (with cProfile on; RESULTS 18 D).

    def zero_slot(self, slot: int, length: int | None = None) -> None:
        """Zeroes slot `slot`'s first `length` positions (all by default)."""
        end = self.capacity if length is None else length
        torch._foreach_zero_([buf[slot, :, :end] for buf in self._buffers])

    def swap_slots(self, a: int, b: int) -> None:
        rows_a, rows_b = self._slot(a), self._slot(b)
        torch._foreach_copy_(self._spare, rows_a)
        torch._foreach_copy_(rows_a, rows_b)
        torch._foreach_copy_(rows_b, self._spare)

    def move_slot(self, src: int, dst: int) -> None:
        """Slot `dst` takes slot `src`'s cache (whatever `dst` held is given up: a released slot's)."""
        torch._foreach_copy_(self._slot(dst), self._slot(src))

    def copy_prefix(self, source: KVPool, src: int, dst: int, length: int) -> None:
        """Slot `dst` starts with another pool's slot `src`, positions [0, length) (a shared prompt's cache)."""
        torch._foreach_copy_([buf[dst, :, :length] for buf in self._buffers],
                             [buf[src, :, :length] for buf in source._buffers])

    def _slot(self, slot: int) -> list[torch.Tensor]:
        return [buf[slot] for buf in self._buffers]

    @property
    def nbytes(self) -> int:
        """Bytes allocated, the swap's spare slot included."""
        return (self.slots + 1) * self.slot_bytes

    @property
    def slot_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._spare)


class KVRows:
    """Rows `rows` of a pool (a long tensor [batch], any rows in any order), keys [0, key_len): for prefills of a
    few rows spread over the pool (LLM prompts, also riding along with a decode step; TTS text). Writes go straight
    into the pool; the keys returned are a gathered copy."""

    def __init__(self, pool: KVPool, rows: torch.Tensor, key_len: int):
        self.pool, self.rows, self.key_len = pool, rows, key_len

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, compiled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, kv_heads, T, head_dim]; positions: long [batch, T] or [T] (the same for every row).
        `compiled`: K and V written by one compiled kernel (`compiled_write_kv`)."""
        keys, values = self.pool.k[layer], self.pool.v[layer]
        write = compiled_write_kv(rows=True) if compiled else write_kv
        write(keys, values, self.rows, positions, k, v)
        return keys[self.rows, :, : self.key_len], values[self.rows, :, : self.key_len]
