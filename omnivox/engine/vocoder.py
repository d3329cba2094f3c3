"""The vocoder executor: DVAE + Vocos over windows of audio tokens, windows of one length batched together.

Windows of different lengths are not padded into one batch: both decoders look ahead (non-causal convolutions),
so padding would change the last samples of the shorter windows. Windows are nearly all one length (25 new
tokens + 4 of context, or 25 for a segment's first), so grouping by length keeps the batches large, and those two
lengths replay as CUDA graphs per batch size (padding rows are whole extra windows, dropped after). Every other
length up to 29 (a reply's last window, a call cut short by EOS) replays as graphs of up to 8 windows: run eagerly,
such a window cost the loop several milliseconds of kernel launches.

On a CPU windows are decoded one at a time: batching buys little there, and batched convolutions sum in another
order than single ones, so a window's PCM would change in its last bits with its batch-mates. One at a time, a
request's audio is bit-identical alone or among others (its codes always are; on a GPU the PCM may differ in the
last bits).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch

from omnivox.engine.graphs import GraphCache, Pending, batch_bucket, batch_buckets

GRAPHED_WINDOWS = (25, 29)  # a segment's first call; every later call (25 new tokens + 4 of context)
LONGEST_WINDOW = max(GRAPHED_WINDOWS)  # a window is at most a call's 25 new tokens + 4 of context
SHORT_WINDOW_BATCH = 8  # windows of the other lengths replay in graphs of at most this many


class VocoderExecutor:
    def __init__(self, model, graphs: GraphCache | None = None, max_batch: int = 1, batched: bool | None = None,
                 stream: torch.cuda.Stream | None = None):
        self.dvae, self.vocos, self.device = model.dvae, model.vocos, model.device
        self.num_vq = model.config.tts.num_vq
        self.batched = self.device.type == "cuda" if batched is None else batched
        self.graphs = graphs
        self.max_batch = max_batch
        self.stream = stream  # its own stream: windows decode beside the TTS step (they share no tensors)

    def _on_stream(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        mel = self.dvae.decode(codes)  # model dtype
        return self.vocos.decode(mel.float())  # Vocos in float32

    @torch.inference_mode()
    def decode(self, windows: list[np.ndarray]) -> Pending:
        """windows: codes [T_i, num_vq] -> float32 PCM [T_i * 512] each, in order, on its way to the host."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            groups[len(w) if self.batched else -1 - i].append(i)

        def in_order(*pcms: np.ndarray) -> list[np.ndarray]:
            out: list[np.ndarray | None] = [None] * len(windows)
            for indices, pcm in zip(groups.values(), pcms, strict=True):
                for j, i in enumerate(indices):
                    out[i] = pcm[j]
            return out

        with self._on_stream():
            parts = [self._group([windows[i] for i in indices]) for indices in groups.values()]
            stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
            return Pending(tuple(parts), in_order, stream)

    def _group(self, windows: list[np.ndarray]) -> torch.Tensor:
        length = len(windows[0])
        if self.graphs is None or not self.graphs.enabled or length > LONGEST_WINDOW:
            return self._decode(torch.from_numpy(np.stack(windows)).to(self.device))
        limit = self._graph_batch(length)
        if len(windows) > limit:  # each part copied out before the next replay of the same graph overwrites it
            parts = []
            for i in range(0, len(windows), limit):
                part = self._group(windows[i:i + limit])
                parts.append(part if i + limit >= len(windows) else part.clone())
            return torch.cat(parts)
        batch = batch_bucket(len(windows), limit)
        codes = np.zeros((batch, length, self.num_vq), np.int64)
        codes[: len(windows)] = np.stack(windows)
        pcm = self.graphs.run(("vocoder", batch, length), lambda codes: self._decode(codes), {"codes": codes})
        return pcm[: len(windows)]  # the graph's output: copied to the host before the next replay

    def _graph_batch(self, length: int) -> int:
        """The most windows of `length` one graph decodes."""
        return self.max_batch if length in GRAPHED_WINDOWS else min(SHORT_WINDOW_BATCH, self.max_batch)

    def warm_up(self) -> None:
        """Captures the vocoder graphs: the two usual window lengths at every batch size, the others up to
        SHORT_WINDOW_BATCH windows."""
        if self.graphs is None or not self.graphs.enabled:
            return
        with self._on_stream():
            for length in range(1, LONGEST_WINDOW + 1):
                for batch in batch_buckets(self._graph_batch(length)):
                    self._group([np.zeros((length, self.num_vq), np.int64)] * batch).cpu()
