"""Joining the overlapping decode windows into one waveform (fact sheet 4.12).

Each DVAE/Vocos window after the first re-decodes 4 already-decoded audio tokens (2048 samples). The last 2048
samples of the pending audio are blended with the first 2048 of the new window with the official triangular
weights: out_i = ((2048 - i) * old_i + (i + 1) * new_i) / 2049.

`official` framing holds a whole window back and releases it when the next one arrives (first audio after two TTS
calls). `early` framing releases everything except the 2048-sample tail as soon as it is final (first audio after
one call). Both produce the same concatenated waveform; only the chunk boundaries differ.
"""

from __future__ import annotations

import functools

import numpy as np

OVERLAP = 2048


@functools.cache
def _weights(n: int) -> tuple[np.ndarray, np.ndarray]:
    """The old and new windows' weights before the division: n - i and i + 1 (float32)."""
    i = np.arange(n, dtype=np.float32)
    return n - i, i + 1


def blend(old_tail: np.ndarray, new_head: np.ndarray) -> np.ndarray:
    n = len(old_tail)
    old_w, new_w = _weights(n)
    return ((old_w * old_tail + new_w * new_head) / np.float32(n + 1)).astype(np.float32)


class Framer:
    """Consumes decode windows, returns the PCM pieces that may be released now."""

    def __init__(self, early: bool = True, overlap: int = OVERLAP):
        self.early = early
        self.overlap = overlap
        self.pending: np.ndarray | None = None  # audio decoded but not yet released

    def push(self, window: np.ndarray) -> np.ndarray | None:
        n = self.overlap
        if self.pending is None:
            joined = window
        else:
            joined = np.concatenate([self.pending[:-n], blend(self.pending[-n:], window[:n]), window[n:]])
            if not self.early:
                released, self.pending = joined[: len(self.pending)], joined[len(self.pending) :]
                return released
        if not self.early:
            self.pending = joined
            return None
        released, self.pending = joined[:-n], joined[-n:]
        return released

    def flush(self) -> np.ndarray | None:
        """The held-back tail, unsmoothed (the official last chunk)."""
        tail, self.pending = self.pending, None
        return tail
