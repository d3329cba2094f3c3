"""Key/value caches owned by the engine and handed to the models' forward.

Two implementations of one small contract, `update(layer, positions, k, v) -> (keys, values)`:

* `StaticKVCache`: buffers allocated once at full capacity; writes land at the device tensor `positions`; the
  whole buffer is returned, so shapes never change (what CUDA graphs need). Masks cover the full capacity.
* `GrowingKVCache`: the reference path's cache; grows by concatenation like Hugging Face's DynamicCache, so it
  costs what the original implementation costs. Its write cursor is a host int (`seek`), so it never syncs.

Attention slices the caller's mask to the returned key length, so the engine may always build masks at the
cache's capacity. Shapes: keys/values are [batch, kv_heads, length, head_dim].
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Preallocated [layers, batch, kv_heads, capacity, head_dim] buffers, written in place."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        batch: int = 1,
    ):
        shape = (num_layers, batch, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def seek(self, start: int) -> None:
        """Static caches write where `positions` says; kept so drivers can treat both caches alike."""

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer], self.v[layer]

    def key_len(self, write_end: int) -> int:
        """Width of the keys attention will see after a write ending at `write_end` (masks are built this wide)."""
        return self.capacity

    def reset(self) -> None:
        self.k.zero_()
        self.v.zero_()

    def truncate_(self, length: int) -> None:
        """Forget positions >= length (zero them, so a later read sees what a fresh cache would hold)."""
        self.k[:, :, :, length:].zero_()
        self.v[:, :, :, length:].zero_()

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class GrowingKVCache:
    """Concatenating cache (the reference path). Optionally starts with `prefix_len` zero slots, as the official
    TTS cache does for its 302 condition slots, so text can be written in place before audio is appended."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        prefix_len: int = 0,
        batch: int = 1,
    ):
        shape = (batch, num_kv_heads, prefix_len, head_dim)
        self.num_layers = num_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.cursor = prefix_len

    def __len__(self) -> int:
        return self.k[0].shape[2]

    def seek(self, start: int) -> None:
        """Next forward writes from `start` (in place below the current length, appended at it)."""
        if start > len(self):
            raise ValueError(f"cannot write at {start}: cache holds {len(self)} positions")
        self.cursor = start

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start, n = self.cursor, k.shape[2]
        length = len(self) if layer == 0 else self.k[layer].shape[2]
        if start == length:
            self.k[layer] = torch.cat([self.k[layer], k], dim=2)
            self.v[layer] = torch.cat([self.v[layer], v], dim=2)
        elif start + n <= length:
            self.k[layer][:, :, start : start + n] = k
            self.v[layer][:, :, start : start + n] = v
        else:
            raise ValueError(f"write of {n} at {start} straddles the cache end {length}")
        if layer == self.num_layers - 1:
            self.cursor = start + n
        return self.k[layer], self.v[layer]

    def key_len(self, write_end: int) -> int:
        return max(len(self), write_end)

    def reset(self) -> None:
        for i in range(self.num_layers):
            self.k[i] = self.k[i][:, :, :0]
            self.v[i] = self.v[i][:, :, :0]
        self.cursor = 0

    def truncate_(self, length: int) -> None:
        for i in range(self.num_layers):
            self.k[i] = self.k[i][:, :, :length]
            self.v[i] = self.v[i][:, :, :length]
        self.cursor = min(self.cursor, length)

    @property
    def nbytes(self) -> int:
        return sum(2 * t.numel() * t.element_size() for t in self.k)


KVCache = StaticKVCache | GrowingKVCache
