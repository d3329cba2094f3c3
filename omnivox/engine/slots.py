"""Slot tables: which row of a cache pool each holder owns, with the rows in use kept at the front.

A batched step over every live row runs on rows 0..B-1 of a pool (a view, no gather: omnivox/models/kv_cache.py), so
the rows that take part must be contiguous (prefills of a few rows gather theirs instead: `KVRows`). The table keeps
them so: rows are ordered [active | idle | free]; a holder that becomes active or idle is swapped to the edge of its
region (the pool swaps the two rows' caches); a holder that gives its row back has the holders at those edges moved
into the gap (one-way copies: the row given back holds nothing worth keeping). Holders keep a handle whose `row`
follows these moves. Moves happen when a request starts or ends, possibly while a step is in flight: they are queued
after it on the pool's stream, and the step's results go by the rows it was launched with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False)
class SlotHandle:
    row: int
    active: bool = False


class SlotTable:
    def __init__(self, size: int, swap: Callable[[int, int], None], move: Callable[[int, int], None]):
        self.size = size
        self._swap_rows = swap
        self._move_row = move  # (src, dst): dst takes src's cache
        self._holders: list[SlotHandle | None] = [None] * size
        self.num_active = 0
        self.num_used = 0

    @property
    def num_free(self) -> int:
        return self.size - self.num_used

    def acquire(self, active: bool = False) -> SlotHandle | None:
        """A free row (None when there is none), idle unless `active`."""
        if self.num_used == self.size:
            return None
        handle = SlotHandle(self.num_used)
        self._holders[handle.row] = handle
        self.num_used += 1
        if active:
            self.activate(handle)
        return handle

    def activate(self, handle: SlotHandle) -> None:
        if not handle.active:
            self._move(handle, self.num_active)
            handle.active = True
            self.num_active += 1

    def deactivate(self, handle: SlotHandle) -> None:
        if handle.active:
            self._move(handle, self.num_active - 1)
            handle.active = False
            self.num_active -= 1

    def release(self, handle: SlotHandle) -> None:
        if self._holders[handle.row] is not handle:
            return  # released twice: harmless
        if handle.active:
            self._vacate(handle, self.num_active - 1)
            handle.active = False
            self.num_active -= 1
        self._vacate(handle, self.num_used - 1)
        self._holders[handle.row] = None
        self.num_used -= 1

    def _vacate(self, handle: SlotHandle, row: int) -> None:
        """`handle` (whose cache is given up) goes to `row`, an edge of the rows in use; `row`'s holder moves into
        its place."""
        if handle.row == row:
            return
        other = self._holders[row]
        self._move_row(row, handle.row)
        other.row = handle.row
        self._holders[handle.row], self._holders[row] = other, handle
        handle.row = row

    def _move(self, handle: SlotHandle, row: int) -> None:
        """Swap `handle`'s row with `row` (and whoever holds it)."""
        if handle.row == row:
            return
        other = self._holders[row]
        self._swap_rows(handle.row, row)
        self._holders[handle.row], self._holders[row] = other, handle
        if other is not None:
            other.row = handle.row
        handle.row = row
