"""The LLM executor: a pool of cache rows, prefills at one row, and batched decode steps over the active rows.

It knows rows, positions and sampling parameters, never requests. A decode step runs on rows 0..B-1 of the pool
(B: the captured batch size that holds the active rows, omnivox/engine/slots.py keeps them in front); rows without
a token this step write to the scratch position (the last one, never used by a session) and their output is
dropped. Masks, sampling and the counter-based random numbers all run inside the step, so it replays as one CUDA
graph per (batch size, key width).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from omnivox.engine.graphs import GraphCache, batch_bucket, length_bucket, length_buckets
from omnivox.engine.masks import causal_mask
from omnivox.engine.sampling import LLM_TOP_K_MAX, sample_llm
from omnivox.engine.slots import SlotTable
from omnivox.models.kv_cache import KVPool

WINDOW = 16  # repetition-penalty window width of a decode step (the header + a 3-token call fit)


@dataclass
class LLMSampling:
    """One row's sampling parameters and random-number key."""

    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    greedy: bool
    seed: int
    counter: int


@dataclass
class LLMRow:
    row: int
    token: int
    position: int
    window: list[int]
    sampling: LLMSampling


class LLMExecutor:
    def __init__(self, model, slots: int, capacity: int, graphs: GraphCache, one_row_at_a_time: bool = False):
        c = model.config.llm
        self.model, self.llm, self.device = model, model.llm, model.device
        self.capacity = min(capacity, c.max_position_embeddings)
        self.scratch = self.capacity - 1
        self.pool = KVPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.capacity, model.dtype,
                           model.device, slots)
        self.slots = SlotTable(slots, self.pool.swap_slots)
        self.graphs = graphs
        self.widths = length_buckets(self.capacity, 256)
        self.one_row_at_a_time = one_row_at_a_time  # the reference path: every step at batch 1

    @property
    def usable_positions(self) -> int:
        return self.scratch

    @torch.inference_mode()
    def prefill(self, row: int, start: int, ids: list[int]) -> torch.Tensor:
        """Runs `ids` at positions start.. of `row`; returns post-norm hidden [T, C]."""
        n = len(ids)
        width = length_bucket(start + n, self.widths)
        positions = torch.arange(start, start + n, device=self.device)[None]
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        view = self.pool.view(row, 1, width)
        return self.llm(ids_t, positions, view, causal_mask(positions, width))[0]

    @torch.inference_mode()
    def sample_one(self, hidden: torch.Tensor, window: list[int], sampling: LLMSampling) -> int:
        """The next token after a prefill's last hidden state (the reply header's first step)."""
        logits = self.llm.compute_logits(hidden[None])
        return int(self._sample(logits, *self._sampling_tensors([(window, sampling)], 1))[0])

    @torch.inference_mode()
    def decode(self, rows: list[LLMRow]) -> list[int]:
        """One token for each of `rows` (all of them active rows of the pool); returns the sampled tokens."""
        if self.one_row_at_a_time:
            return [self._decode(r.row, 1, [r])[0] for r in rows]
        return self._decode(0, batch_bucket(self.slots.num_active, self.slots.size), rows)

    def _decode(self, first: int, batch: int, rows: list[LLMRow]) -> list[int]:
        """One step over pool rows first..first+batch-1, of which `rows` take part."""
        width = length_bucket(max(r.position for r in rows) + 1, self.widths)
        ids = np.zeros(batch, np.int64)
        positions = np.full(batch, self.scratch, np.int64)
        entries: list[tuple[list[int], LLMSampling] | None] = [None] * batch
        for r in rows:
            i = r.row - first
            ids[i], positions[i], entries[i] = r.token, r.position, (r.window, r.sampling)
        inputs = {"ids": ids, "positions": positions}
        window, params = self._sampling_tensors(entries, batch)
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in inputs.items()}
        inputs.update(window=window, **params)
        out = self.graphs.run(("llm", first, batch, width), lambda **kw: self._step(first, width, **kw), inputs)
        tokens = out.cpu().numpy()
        return [int(tokens[r.row - first]) for r in rows]

    def warm_up(self) -> None:
        """Captures every (batch size, key width) step graph now; scratch rows only, so no cache is touched."""
        if not self.graphs.enabled:
            return
        for batch in sorted({batch_bucket(n, self.slots.size) for n in range(1, self.slots.size + 1)}):
            for width in self.widths:
                window, params = self._sampling_tensors([None] * batch, batch)
                inputs = {
                    "ids": torch.zeros(batch, dtype=torch.long, device=self.device),
                    "positions": torch.full((batch,), self.scratch, dtype=torch.long, device=self.device),
                    "window": window,
                    **params,
                }
                self.graphs.run(("llm", 0, batch, width), lambda w=width, **kw: self._step(0, w, **kw), inputs)

    def _step(self, first: int, width: int, ids, positions, window, **params) -> torch.Tensor:
        positions = positions[:, None]
        view = self.pool.view(first, ids.shape[0], width)
        hidden = self.llm(ids[:, None], positions, view, causal_mask(positions, width))[:, -1]
        return self._sample(self.llm.compute_logits(hidden), window, params)

    @staticmethod
    def _sample(logits: torch.Tensor, window: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return sample_llm(logits, window, **params)

    def _sampling_tensors(self, entries, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        window = np.zeros((batch, WINDOW), np.int64)
        temperature, top_p, penalty = np.ones(batch, np.float32), np.ones(batch, np.float32), np.ones(batch, np.float32)
        top_k, seeds, counters = np.ones(batch, np.int64), np.zeros(batch, np.int64), np.zeros(batch, np.int64)
        greedy = np.ones(batch, bool)
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            ids, s = entry
            ids = ids[-WINDOW:]
            window[i] = ids + [ids[0]] * (WINDOW - len(ids))  # padding repeats an id: penalised once all the same
            temperature[i], top_p[i], penalty[i] = s.temperature, s.top_p, s.repetition_penalty
            top_k[i] = LLM_TOP_K_MAX if s.top_k <= 0 else min(s.top_k, LLM_TOP_K_MAX)
            greedy[i], seeds[i], counters[i] = s.greedy, s.seed, s.counter
        host = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=penalty, greedy=greedy,
                    seeds=seeds, counters=counters)
        params = {k: torch.from_numpy(v).to(self.device) for k, v in host.items()}
        return torch.from_numpy(window).to(self.device), params
