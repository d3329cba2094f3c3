"""The shared system prompt's LLM cache, computed once and copied into each new conversation's row.

Every conversation starts with the same default-voice system prompt, so its keys and values are the same for all
of them: a new session copies them (a few MB) instead of running the prompt through 28 layers again.
"""

from __future__ import annotations

import torch

from omnivox.engine.masks import causal_mask
from omnivox.models.kv_cache import KVPool


def prompt_forward(model, pool: KVPool, start: int, ids: list[int]) -> torch.Tensor:
    """Runs `ids` at positions start.. of a one-row pool (causal); returns post-norm hidden [T, C]."""
    positions = torch.arange(start, start + len(ids), device=model.device)[None]
    ids_t = torch.tensor([ids], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        return model.llm(ids_t, positions, pool.view(0, 1), causal_mask(positions, pool.capacity))[0]


class PrefixCache:
    def __init__(self, model, ids: list[int]):
        c = model.config.llm
        self.ids = list(ids)
        self.pool = KVPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, max(len(ids), 1), model.dtype,
                           model.device)
        if ids:
            prompt_forward(model, self.pool, 0, self.ids)

    def covers(self, ids: list[int]) -> int:
        """How many leading positions of `ids` this prefix's cache holds (all of it, or 0 if `ids` do not start with
        it); a new row takes them with `KVPool.copy_prefix` from `pool`'s row 0."""
        n = len(self.ids)
        return n if n and ids[:n] == self.ids else 0
