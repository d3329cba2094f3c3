"""Overlap without changing outputs: results that may still be computing, and the LLM running ahead of the TTS.

The sequential algorithm runs LLM, TTS and vocoder one after another. On a GPU they can run at the same time on
separate CUDA streams, and the outputs stay those of the sequential algorithm because nothing one stage draws
depends on when another stage ran:

* the LLM and the TTS draw from separate random generators (engine.py), and the LLM never reads anything the TTS
  produced, so producing LLM chunks earlier gives the same chunks;
* the pipeline consumes chunks in the same order, so the TTS sees the same text at the same call;
* chunks produced ahead but never consumed (the speech ended first) are taken back: the session's cache is
  rewound to where the sequential algorithm left it (`ReplyGenerator.rewind_unconsumed`).

A runner's `tts_launch` / `decode_audio_launch` return a `Pending` result; the eager runner's are `Ready` at once,
the fast runner's (on a GPU) finish on their own stream while the host goes on queuing other work.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

import torch

T = TypeVar("T")


class Pending(Protocol[T]):
    seconds: float  # time the work took, known once `wait` returned (device time on a GPU)

    def running(self) -> bool:
        """True while the work may still be in progress (never blocks)."""
        ...

    def wait(self) -> T:
        """Blocks until the work is done; returns its result. Call it exactly once."""
        ...


class Ready(Generic[T]):
    """A result computed at once (runners without asynchronous steps)."""

    def __init__(self, compute: Callable[[], T]):
        t0 = time.perf_counter()
        self.value = compute()
        self.seconds = time.perf_counter() - t0

    def running(self) -> bool:
        return False

    def wait(self) -> T:
        return self.value


class Queued(Generic[T]):
    """Work queued on a CUDA stream between two timing events; `finish` builds the result once it is done
    (reads what the work copied to pinned host memory)."""

    def __init__(self, start: torch.cuda.Event, end: torch.cuda.Event, finish: Callable[[], T]):
        self.start, self.end, self.finish = start, end, finish
        self.seconds = float("nan")

    def running(self) -> bool:
        return not self.end.query()

    def wait(self) -> T:
        self.end.synchronize()
        self.seconds = self.start.elapsed_time(self.end) / 1000
        return self.finish()


class Lookahead(Generic[T]):
    """An iterator with a buffer that `fill_while` fills ahead of the consumer.

    Consuming it gives exactly the items of the wrapped iterator in order; only *when* each item was produced
    changes. `limit` bounds how far ahead production may go (chunks that would be wasted if the reply ends first).
    """

    def __init__(self, items: Iterator[T], limit: int):
        self._items = items
        self._buffer: deque[T] = deque()
        self._exhausted = False
        self.limit = limit

    def __iter__(self) -> Lookahead[T]:
        return self

    def __next__(self) -> T:
        if self._buffer:
            return self._buffer.popleft()
        if self._exhausted:
            raise StopIteration
        try:
            return next(self._items)
        except StopIteration:
            self._exhausted = True
            raise

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def fill_while(self, busy: Callable[[], bool]) -> int:
        """Produces items while `busy()` holds and the buffer is below `limit`; returns how many it produced."""
        produced = 0
        while not self._exhausted and len(self._buffer) < self.limit and busy():
            try:
                self._buffer.append(next(self._items))
            except StopIteration:
                self._exhausted = True
                break
            produced += 1
        return produced

    def close(self) -> None:
        self._buffer.clear()
        close = getattr(self._items, "close", None)
        if close is not None:
            close()
