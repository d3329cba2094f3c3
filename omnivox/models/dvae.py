"""ChatTTS DVAE, decode path only: grouped residual FSQ codes -> ConvNeXt decoder -> log-mel.

MiniCPM-o 2.6 ships the whole ChatTTS DVAE under `tts.dvae.`, but speech synthesis only ever decodes. Each audio
token carries 4 codes: codebook q belongs to FSQ group g = q // R at residual level r = q % R (G = R = 2). A code id
is 4 base-5 digits, each mapped to an FSQ value in {-1, -1/2, 0, 1/2, 1}; residual level r is scaled by
(levels - 1) ** -r (the scale of vector-quantize-pytorch 1.18.5, the version the official run pins). The two levels
are summed and projected 4 -> 512 per group. The two group vectors of one token become two consecutive mel frames
(group 0 first), which is the DVAE's x2 upsampling; the decoder then maps them to a 100-bin log-mel.

Attribute names equal the official keys minus `tts.dvae.`. The encoder side (`downsample_conv`, `encoder`,
`project_in`) is not built; `encoder_key_shapes` lists it so a synthetic checkpoint can reproduce the full layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.config import DVAEConfig

LAYER_NORM_EPS = 1e-6  # ChatTTS ConvNeXtBlock's LayerNorm


def _intermediate_dim(cfg: DVAEConfig) -> int:
    """ChatTTS hard-codes the ConvNeXt MLP width as 4x the hidden size."""
    return 4 * cfg.hidden


class DVAEConvNeXtBlock(nn.Module):
    """ConvNeXt block with a dilated depthwise conv; the layer scale is called `coef` in the checkpoint."""

    def __init__(self, dim: int, intermediate_dim: int, kernel_size: int, dilation: int):
        super().__init__()
        padding = dilation * (kernel_size // 2)
        self.dwconv = nn.Conv1d(dim, dim, kernel_size, padding=padding, dilation=dilation, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.coef = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, N]
        y = self.dwconv(x).transpose(1, 2)  # [B, N, C]
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (y * self.coef).transpose(1, 2)


class DVAEDecoder(nn.Module):
    """conv_in (conv, GELU, conv) -> ConvNeXt stack -> 1x1 conv_out; channels-first throughout."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.conv_in = nn.Sequential(
            nn.Conv1d(cfg.idim, cfg.bn_dim, 3, padding=1),
            nn.GELU(),
            nn.Conv1d(cfg.bn_dim, cfg.hidden, 3, padding=1),
        )
        self.decoder_block = nn.ModuleList(
            DVAEConvNeXtBlock(cfg.hidden, _intermediate_dim(cfg), cfg.kernel_size, cfg.dilation)
            for _ in range(cfg.num_layers)
        )
        self.conv_out = nn.Conv1d(cfg.hidden, cfg.odim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, idim, N] -> [B, odim, N]
        x = self.conv_in(x)
        for block in self.decoder_block:
            x = block(x)
        return self.conv_out(x)


class ResidualFSQProjection(nn.Module):
    """One FSQ group's output projection (codebook dim -> group dim); its `project_in` is encode-only."""

    def __init__(self, codebook_dim: int, group_dim: int):
        super().__init__()
        self.project_out = nn.Linear(codebook_dim, group_dim)


class GroupedResidualFSQProjections(nn.Module):
    """Holds `rvqs.{g}` so the keys read `vq_layer.quantizer.rvqs.{g}.project_out.*` as in the checkpoint."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        group_dim = cfg.gfsq_dim // cfg.num_groups
        self.rvqs = nn.ModuleList(ResidualFSQProjection(len(cfg.levels), group_dim) for _ in range(cfg.num_groups))


class GFSQ(nn.Module):
    """Code ids -> per-group vectors. The FSQ tables are non-persistent buffers derived from the config."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        self.num_groups = cfg.num_groups
        self.num_residual = cfg.num_residual
        self.levels_list = tuple(cfg.levels)
        self.quantizer = GroupedResidualFSQProjections(cfg)
        self.init_buffers()

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build the FSQ tables; call after building on `meta` and loading weights with `assign=True`."""
        if device is None:
            device = self.quantizer.rvqs[0].project_out.weight.device
        levels = torch.tensor(self.levels_list, dtype=torch.long, device=device)  # [D]
        # Mixed-radix digit weights: digit j of an id is (id // basis[j]) % levels[j].
        basis = torch.cumprod(torch.cat([levels.new_ones(1), levels[:-1]]), dim=0)  # [D]
        # Codebook q sits at residual level q % R; level r is scaled by (levels - 1) ** -r.
        scale_rows = [
            [(level - 1.0) ** -(q % self.num_residual) for level in self.levels_list]
            for q in range(self.num_groups * self.num_residual)
        ]
        scales = torch.tensor(scale_rows, dtype=torch.float32, device=device)  # [Q, D]
        self.register_buffer("levels", levels, persistent=False)
        self.register_buffer("digit_basis", basis, persistent=False)
        self.register_buffer("half_widths", levels // 2, persistent=False)
        self.register_buffer("residual_scales", scales, persistent=False)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, G*R] long -> [B, T, G, group_dim] in the projection dtype."""
        batch, length, _ = codes.shape
        digits = (codes.unsqueeze(-1) // self.digit_basis) % self.levels  # [B, T, Q, D]
        # (d - L//2) / (L//2): exact in fp32 and bf16 for these small levels.
        values = (digits - self.half_widths).float() / self.half_widths.float()
        values = values * self.residual_scales  # [B, T, Q, D]
        per_group = values.view(batch, length, self.num_groups, self.num_residual, -1).sum(dim=3)  # [B, T, G, D]
        dtype = self.quantizer.rvqs[0].project_out.weight.dtype
        per_group = per_group.to(dtype)
        vectors = [rvq.project_out(per_group[:, :, g]) for g, rvq in enumerate(self.quantizer.rvqs)]
        return torch.stack(vectors, dim=2)


class DVAE(nn.Module):
    """ChatTTS DVAE decode path: `decode(codes [B, T, 4]) -> log-mel [B, 100, 2T]` in the module dtype."""

    def __init__(self, cfg: DVAEConfig):
        super().__init__()
        if cfg.gfsq_dim // cfg.num_groups != cfg.idim:
            raise ValueError(f"DVAE: group dim {cfg.gfsq_dim // cfg.num_groups} must equal decoder idim {cfg.idim}")
        self.cfg = cfg
        self.coef = nn.Parameter(torch.rand(1, cfg.num_mel_bins, 1))
        self.decoder = DVAEDecoder(cfg)
        self.out_conv = nn.Conv1d(cfg.odim, cfg.num_mel_bins, 3, padding=1, bias=False)
        self.vq_layer = GFSQ(cfg)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Rebuild the non-persistent FSQ tables (needed after a `meta` build)."""
        self.vq_layer.init_buffers(device)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, T, 4] long -> log-mel [B, num_mel_bins, num_groups * T]."""
        vectors = self.vq_layer(codes)  # [B, T, G, idim]
        batch, length, groups, channels = vectors.shape
        # Token t's group g vector becomes mel frame G*t + g (ChatTTS: view(B, G, C, T).permute(0, 2, 3, 1)).
        frames = vectors.reshape(batch, length * groups, channels).transpose(1, 2)  # [B, idim, G*T]
        mel = self.out_conv(self.decoder(frames))  # [B, num_mel_bins, G*T]
        return mel * self.coef

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(codes)


def encoder_key_shapes(cfg: DVAEConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the encode-only keys of the official DVAE (no `tts.dvae.` prefix), in checkpoint module order.

    We never build or load these; the synthetic-checkpoint writer uses them to write the official layout.
    `downsample_conv` is Conv1d(mels -> idim, k3), GELU, Conv1d(idim -> idim, k4 stride 2), GELU; `encoder` is a
    decoder-shaped stack with output width `encoder_odim`; `project_in` maps a group (idim) to the codebook dim.
    """
    shapes: dict[str, tuple[int, ...]] = {
        "downsample_conv.0.weight": (cfg.idim, cfg.num_mel_bins, 3),
        "downsample_conv.0.bias": (cfg.idim,),
        "downsample_conv.2.weight": (cfg.idim, cfg.idim, 4),
        "downsample_conv.2.bias": (cfg.idim,),
        "encoder.conv_in.0.weight": (cfg.bn_dim, cfg.idim, 3),
        "encoder.conv_in.0.bias": (cfg.bn_dim,),
        "encoder.conv_in.2.weight": (cfg.hidden, cfg.bn_dim, 3),
        "encoder.conv_in.2.bias": (cfg.hidden,),
    }
    intermediate = _intermediate_dim(cfg)
    for i in range(cfg.num_layers):
        prefix = f"encoder.decoder_block.{i}"
        shapes[f"{prefix}.dwconv.weight"] = (cfg.hidden, 1, cfg.kernel_size)
        shapes[f"{prefix}.dwconv.bias"] = (cfg.hidden,)
        shapes[f"{prefix}.norm.weight"] = (cfg.hidden,)
        shapes[f"{prefix}.norm.bias"] = (cfg.hidden,)
        shapes[f"{prefix}.pwconv1.weight"] = (intermediate, cfg.hidden)
        shapes[f"{prefix}.pwconv1.bias"] = (intermediate,)
        shapes[f"{prefix}.pwconv2.weight"] = (cfg.hidden, intermediate)
        shapes[f"{prefix}.pwconv2.bias"] = (cfg.hidden,)
        shapes[f"{prefix}.coef"] = (cfg.hidden,)
    shapes["encoder.conv_out.weight"] = (cfg.encoder_odim, cfg.hidden, 1)
    group_dim = cfg.gfsq_dim // cfg.num_groups
    for g in range(cfg.num_groups):
        shapes[f"vq_layer.quantizer.rvqs.{g}.project_in.weight"] = (len(cfg.levels), group_dim)
        shapes[f"vq_layer.quantizer.rvqs.{g}.project_in.bias"] = (len(cfg.levels),)
    return shapes
