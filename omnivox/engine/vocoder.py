"""The vocoder executor: DVAE + Vocos over windows of audio tokens, windows of one length batched together.

Windows of different lengths are not padded into one batch: both decoders look ahead (non-causal convolutions),
so padding would change the last samples of the shorter windows. Windows are nearly all one length (25 new
tokens + 4 of context), so grouping by length keeps the batches large.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch


class VocoderExecutor:
    def __init__(self, model):
        self.dvae, self.vocos, self.device = model.dvae, model.vocos, model.device

    @torch.inference_mode()
    def decode(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        """windows: codes [T_i, num_vq] -> float32 PCM [T_i * 512] on the host, in order."""
        by_length: dict[int, list[int]] = defaultdict(list)
        for i, w in enumerate(windows):
            by_length[len(w)].append(i)
        out: list[np.ndarray | None] = [None] * len(windows)
        for indices in by_length.values():
            codes = torch.from_numpy(np.stack([windows[i] for i in indices])).to(self.device)
            mel = self.dvae.decode(codes)  # model dtype
            pcm = self.vocos.decode(mel.float()).cpu().numpy()  # Vocos in float32
            for j, i in enumerate(indices):
                out[i] = pcm[j]
        return out
