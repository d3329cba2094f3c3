"""The MiniCPM-o 2.6 TTS: ConditionalChatTTS (`tts.*` keys minus the prefix).

A 20-layer Llama (no biases, rope theta 10000) reads text embeddings, one projected speaker vector, then audio
frames embedded as the sum of 4 codebook embeddings; 4 heads predict the next frame's codes. The heads are weight
normalised in the checkpoint (g, v); the loader folds them once with `fold_weight_norm` into plain Linear weights,
which is the same tensor the official code recomputes every step. The checkpoint's `tts.model.embed_tokens` is never
used, so there is no module for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.config import TTSConfig
from omnivox.models.kv_cache import KVRows, KVView
from omnivox.models.layers import DecoderStack


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weight = g * v / ||v|| over dim 0 (g: [626, 1], v: [626, hidden]); call it in the module dtype.

    Same kernel as torch.nn.utils.parametrizations.weight_norm, so the folded weight is bit-identical to the one
    the official code evaluates each step.
    """
    return torch._weight_norm(v, g, 0)


class SpeakerProjector(nn.Module):
    """`projector.linear1/linear2`: LLM hidden -> TTS hidden (Linear, ReLU, Linear)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.relu(self.linear1(x)))


class ConditionalChatTTS(nn.Module):
    """Embeddings, projector, Llama backbone (`model.*`) and code heads; no cache, mask logic or sampling."""

    def __init__(self, cfg: TTSConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.hidden_size
        self.projector = SpeakerProjector(cfg.llm_dim, hidden)
        self.emb_text = nn.Embedding(cfg.num_text_tokens, hidden)
        self.emb_code = nn.ModuleList(nn.Embedding(cfg.num_audio_tokens, hidden) for _ in range(cfg.num_vq))
        self.head_code = nn.ModuleList(nn.Linear(hidden, cfg.num_audio_tokens, bias=False) for _ in range(cfg.num_vq))
        self.model = DecoderStack(
            hidden_size=hidden,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_attention_heads,
            rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_norm_eps,
            max_positions=cfg.max_position_embeddings,
            qkv_bias=False,
        )

    def project_speaker(self, h: torch.Tensor) -> torch.Tensor:
        """h: LLM hidden at `<|spk|>` [B, llm_dim] (any dtype) -> unit-norm speaker vector [B, C]."""
        h = h.to(self.projector.linear1.weight.dtype)
        return F.normalize(self.projector(h), p=2, dim=-1)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: long [B, T] ChatTTS BERT ids -> [B, T, C]."""
        return self.emb_text(ids)

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: long [B, T, num_vq] -> [B, T, C], summed like the official stack(...).sum (one rounding)."""
        per_codebook = [emb(codes[..., q]) for q, emb in enumerate(self.emb_code)]  # num_vq x [B, T, C]
        return torch.stack(per_codebook, dim=-1).sum(-1)

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVView | KVRows | None,
        mask: torch.Tensor | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """embeds: [B, T, C]; positions: long [T] or [B, T] (slot index). Returns post-norm hidden [B, T, C].
        `compiled`: see `DecoderStack.forward`."""
        return self.model(embeds, positions, cache, mask, compiled)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, C] -> float32 [B, T, num_vq, num_audio_tokens]; each head runs in the model dtype."""
        return torch.stack([head(hidden).float() for head in self.head_code], dim=-2)
