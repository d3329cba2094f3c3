"""The MiniCPM-o 2.6 LLM: a Qwen2 decoder (`llm.*` keys minus the prefix).

`forward` returns post-norm hidden states, because the engine needs them twice: the `<|spk|>` state conditions the
TTS, and only the rows it samples from need logits. `compute_logits` is separate so the body can be captured alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omnivox.config import LLMConfig
from omnivox.models.kv_cache import KVRows, KVView
from omnivox.models.layers import DecoderStack, Segments


class Qwen2Model(DecoderStack):
    """`model.*`: token embedding + the shared decoder stack (q/k/v biases, as in Qwen2)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_norm_eps,
            max_positions=cfg.max_position_embeddings,
            qkv_bias=True,
        )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class Qwen2LM(nn.Module):
    """`model.*` and `lm_head` (absent when the config ties it to `model.embed_tokens`)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: long [B, T] -> [B, T, C]."""
        return self.model.embed_tokens(ids)

    def forward(
        self,
        ids: torch.Tensor | None,
        positions: torch.Tensor,
        cache: KVView | KVRows | Segments | None,
        mask: torch.Tensor | None = None,
        embeds: torch.Tensor | None = None,
        compiled: bool = False,
    ) -> torch.Tensor:
        """ids: long [B, T] (or `embeds` [B, T, C] instead); positions: long [T] or [B, T].
        Returns post-norm hidden [B, T, C]. `compiled`: see `DecoderStack.forward`."""
        x = self.embed(ids) if embeds is None else embeds
        return self.model(x, positions, cache, mask, compiled)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [..., C] -> float32 logits [..., V] (head in model dtype, then upcast, as transformers does)."""
        weight = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(hidden, weight).float()
