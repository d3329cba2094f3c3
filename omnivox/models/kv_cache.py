"""Key/value caches handed to the models' forward: the protocol and the one implementation.

The protocol is one method, `update(layer, positions, k, v) -> (keys, values)`: attention writes the new keys and
values where `positions` says and gets back every key it may attend to. The engine owns the memory; models only
call `update`.

`KVPool` holds one buffer per layer shaped [slots, kv_heads, capacity, head_dim], allocated once. A forward sees it
through a `KVView`: a contiguous range of slots (the batch rows) and a key width (the first `key_len` positions),
so a batched step over rows 0..B-1 needs no gather and keeps static shapes for CUDA graphs. Per-layer buffers,
rather than one tensor, keep each layer's in-place write a write of that layer only.
"""

from __future__ import annotations

import torch


class KVView:
    """Rows [row, row + batch) of a pool, keys [0, key_len). `positions` [batch, T] say where each row writes."""

    def __init__(self, pool: KVPool, row: int, batch: int, key_len: int):
        if row < 0 or row + batch > pool.slots:
            raise ValueError(f"rows {row}..{row + batch - 1} are outside a pool of {pool.slots} slots")
        if not 0 < key_len <= pool.capacity:
            raise ValueError(f"key_len {key_len} must be within 1..{pool.capacity}")
        self.pool, self.rows, self.key_len = pool, slice(row, row + batch), key_len

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, kv_heads, T, head_dim]; positions: long [batch, T] or [T] (the same for every row)."""
        keys, values = self.pool.k[layer][self.rows], self.pool.v[layer][self.rows]
        batch, heads, steps, dim = k.shape
        if positions.dim() == 1:
            positions = positions.expand(batch, steps)
        index = positions[:, None, :, None].expand(batch, heads, steps, dim)
        keys.scatter_(2, index, k)
        values.scatter_(2, index, v)
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

    def view(self, row: int = 0, batch: int = 1, key_len: int | None = None) -> KVView:
        return KVView(self, row, batch, self.capacity if key_len is None else key_len)

    def zero_slot(self, slot: int, length: int | None = None) -> None:
        """Zeroes slot `slot`'s first `length` positions (all by default)."""
        end = self.capacity if length is None else length
        for buf in (*self.k, *self.v):
            buf[slot, :, :end].zero_()

    def swap_slots(self, a: int, b: int) -> None:
        for buf in (*self.k, *self.v):
            tmp = buf[a].clone()
            buf[a] = buf[b]
            buf[b] = tmp

    def copy_prefix(self, source: KVPool, src: int, dst: int, length: int) -> None:
        """Slot `dst` starts with another pool's slot `src`, positions [0, length) (a shared prompt's cache)."""
        for mine, theirs in zip((*self.k, *self.v), (*source.k, *source.v), strict=True):
            mine[dst, :, :length] = theirs[src, :, :length]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def slot_bytes(self) -> int:
        return self.nbytes // self.slots


class KVRows:
    """Rows `rows` of a pool (a long tensor [batch], any rows in any order), keys [0, key_len): for prefills of a
    few rows spread over the pool. Writes go straight into the pool; the keys returned are a gathered copy."""

    def __init__(self, pool: KVPool, rows: torch.Tensor, key_len: int):
        self.pool, self.rows, self.key_len = pool, rows, key_len

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [batch, kv_heads, T, head_dim]; positions: long [batch, T] or [T] (the same for every row)."""
        keys, values = self.pool.k[layer], self.pool.v[layer]
        if positions.dim() == 1:
            positions = positions.expand(k.shape[0], -1)
        rows = self.rows[:, None].expand_as(positions)
        keys[rows, :, positions] = k.transpose(1, 2)  # indexed dims first: [batch, T, kv_heads, head_dim]
        values[rows, :, positions] = v.transpose(1, 2)
        return keys[self.rows, :, : self.key_len], values[self.rows, :, : self.key_len]
