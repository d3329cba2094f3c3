"""Vocos mel vocoder (`assets/Vocos.pt`): 100-bin log-mel -> 24 kHz PCM, always float32.

A ConvNeXt backbone predicts, per mel frame, 513 log-magnitudes and 513 phases; an inverse STFT with "same"
padding (the ISTFTHead default, which MiniCPM-o uses) turns them into exactly `hop_length` samples per frame.
`torch.istft` cannot do "same" padding, so the overlap-add is written out with `fold`, as Vocos does.

Attribute names equal the Vocos.pt keys. A real Vocos.pt also carries the feature extractor's two buffers, which
decoding never reads; `UNUSED_CHECKPOINT_KEYS` / `unused_checkpoint_tensors` describe and make them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.config import VocosConfig

LAYER_NORM_EPS = 1e-6  # Vocos backbone and ConvNeXt LayerNorms
MAX_MAGNITUDE = 1e2  # Vocos clips exp(log-magnitude) here

UNUSED_CHECKPOINT_KEYS = (
    "feature_extractor.mel_spec.spectrogram.window",
    "feature_extractor.mel_spec.mel_scale.fb",
)


class VocosConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise conv k7, channels-last LayerNorm and MLP, layer scale `gamma`, residual."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, F]
        y = self.dwconv(x).transpose(1, 2)  # [B, F, C]
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).transpose(1, 2)


class VocosBackbone(nn.Module):
    """embed conv -> LayerNorm -> ConvNeXt stack -> final LayerNorm; keeps the frame rate."""

    def __init__(self, cfg: VocosConfig):
        super().__init__()
        self.embed = nn.Conv1d(cfg.n_mels, cfg.dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)
        self.convnext = nn.ModuleList(
            VocosConvNeXtBlock(cfg.dim, cfg.intermediate_dim, cfg.layer_scale_init) for _ in range(cfg.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=LAYER_NORM_EPS)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        # mel: [B, n_mels, F] -> hidden [B, F, dim]
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)  # [B, dim, F]
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class ISTFT(nn.Module):
    """Inverse STFT with "same" padding: irfft, window, overlap-add, trim (win - hop) / 2 per side, normalise."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.trim = (n_fft - hop_length) // 2
        self.register_buffer("window", torch.hann_window(n_fft))  # persistent: it is a Vocos.pt key

    def _overlap_add(self, frames: torch.Tensor) -> torch.Tensor:
        """frames [N, n_fft, F] -> [N, F * hop_length]: summed at hop spacing, trimmed at both ends."""
        num_frames = frames.shape[-1]
        total = (num_frames - 1) * self.hop_length + self.n_fft
        summed = F.fold(frames, output_size=(1, total), kernel_size=(1, self.n_fft), stride=(1, self.hop_length))
        return summed[:, 0, 0, self.trim : total - self.trim]

    def forward(self, spec: torch.Tensor) -> torch.Tensor:
        # spec: complex [B, n_fft // 2 + 1, F] -> pcm [B, F * hop_length]
        num_frames = spec.shape[-1]
        frames = torch.fft.irfft(spec, n=self.n_fft, dim=1, norm="backward") * self.window[None, :, None]
        audio = self._overlap_add(frames)
        # Sum of squared windows at each output sample; with hop = n_fft / 4 it never vanishes after the trim.
        window_sq = self.window.square()[None, :, None].expand(1, self.n_fft, num_frames)
        envelope = self._overlap_add(window_sq.contiguous())  # [1, F * hop_length]
        return audio / envelope


class ISTFTHead(nn.Module):
    """Linear to (log-magnitude, phase) per bin, then the inverse STFT."""

    def __init__(self, cfg: VocosConfig):
        super().__init__()
        self.out = nn.Linear(cfg.dim, cfg.n_fft + 2)
        self.istft = ISTFT(cfg.n_fft, cfg.hop_length)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [B, F, dim] -> pcm [B, F * hop_length]
        log_magnitude, phase = self.out(hidden).transpose(1, 2).chunk(2, dim=1)  # [B, n_fft/2 + 1, F] each
        magnitude = torch.exp(log_magnitude).clamp(max=MAX_MAGNITUDE)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return self.istft(spec)


class Vocos(nn.Module):
    """Vocos backbone + ISTFT head: `decode(mel [B, 100, F]) -> pcm [B, F * 256]`, float32.

    Build and load it in float32 and never cast it; `decode` casts its input (bf16 mel from the DVAE) to float32.
    """

    def __init__(self, cfg: VocosConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = VocosBackbone(cfg)
        self.head = ISTFTHead(cfg)

    def decode(self, mel: torch.Tensor) -> torch.Tensor:
        """log-mel [B, n_mels, F] -> pcm float32 [B, F * hop_length]."""
        return self.head(self.backbone(mel.float()))

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.decode(mel)


def _hz_to_htk_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def htk_mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-mel filterbank [n_freqs, n_mels] from 0 Hz to Nyquist, unnormalised."""
    bin_freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)  # [n_freqs]
    mel_points = torch.linspace(0.0, _hz_to_htk_mel(sample_rate / 2), n_mels + 2, dtype=torch.float64)
    edge_freqs = 700.0 * (torch.pow(10.0, mel_points / 2595.0) - 1.0)  # [n_mels + 2]
    widths = edge_freqs[1:] - edge_freqs[:-1]  # [n_mels + 1]
    offsets = edge_freqs[None, :] - bin_freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def unused_checkpoint_tensors(cfg: VocosConfig) -> dict[str, torch.Tensor]:
    """The feature-extractor buffers a real Vocos.pt carries, so a synthetic Vocos.pt loads strictly.

    `decode` never reads them (the feature extractor maps audio to mel, the opposite direction). The window is
    the periodic Hann window the official file holds; the filterbank follows the HTK triangular formula but is not
    checked against torchaudio: any fixed [n_fft // 2 + 1, n_mels] matrix would serve the same purpose.
    """
    return {
        UNUSED_CHECKPOINT_KEYS[0]: torch.hann_window(cfg.n_fft),
        UNUSED_CHECKPOINT_KEYS[1]: htk_mel_filterbank(cfg.n_fft // 2 + 1, cfg.n_mels, cfg.sample_rate),
    }
