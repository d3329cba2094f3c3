"""The TTS executor: a pool of segment cache rows, text and audio prefills at one row, and batched audio steps.

A step feeds each active row its last audio token (or `[Ptts]` on a segment's first step) at its own slot, builds
each row's audio mask on the device, and samples each row's 4 codes with its own parameters and random key, so it
replays as one CUDA graph per (batch size, key width). Rows without a step write to the scratch slot (the last
one) and are dropped, as in the LLM executor. Each row's drawn codes also stay on the device, where the row's next
step may take them as its input: the loop launches that step before it has read them (host work beside the step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omnivox.engine.graphs import (
    GraphCache,
    Pending,
    Ready,
    batch_bucket,
    batch_buckets,
    length_bucket,
    length_buckets,
)
from omnivox.engine.masks import causal_mask, tts_audio_mask
from omnivox.engine.sampling import compiled, sample_tts
from omnivox.engine.slots import SlotTable
from omnivox.models.kv_cache import KVPool, KVRows

PREFILL_WIDTH = 16  # text tokens per row of a batched text prefill (a streaming chunk is 10 + 2, a restart's 7)


@dataclass(frozen=True)
class TTSSampling:
    """A request's TTS sampling parameters and seed (made once per request)."""

    temperature: tuple[float, ...]  # one per codebook
    top_p: float
    top_k: int
    greedy: bool
    seed: int


@dataclass
class TTSRow:
    row: int
    position: int
    prev_codes: Sequence[int] | None  # None (and not prev_drawn): the segment's first audio step, fed [Ptts]
    num_text_tokens: int
    ban_eos: bool
    force_eos: bool
    sampling: TTSSampling
    counter: int  # the request's step counter: with the seed, the key of this step's random numbers
    prev_drawn: bool = False  # feed the codes this row drew at its last step (on the device; prev_codes unused)


class TTSExecutor:
    def __init__(self, model, slots: int, capacity: int, graphs: GraphCache, one_row_at_a_time: bool = False,
                 compile: bool = False):
        c = model.config.tts
        self.model, self.tts, self.device = model, model.tts, model.device
        self.capacity = min(capacity, c.max_position_embeddings)
        self.scratch = self.capacity - 1
        self.num_vq, self.eos_code = c.num_vq, c.eos_code
        self.audio_bos, self.spk_emb = c.audio_bos_token_id, c.spk_emb_token_id
        self.condition_slots = c.condition_len - 1
        self.pool = KVPool(c.num_hidden_layers, c.num_attention_heads, c.head_dim, self.capacity, model.dtype,
                           model.device, slots)
        self.drawn = torch.zeros(slots, self.num_vq, dtype=torch.long, device=model.device)  # each row's last codes
        self.slots = SlotTable(slots, self._swap, self._move)
        self.graphs = graphs
        self.widths = length_buckets(self.capacity, 512)
        self.one_row_at_a_time = one_row_at_a_time  # the reference path: every step at batch 1, eager
        self.compiled = compile  # the layers' compiled halves; batches of 1 are padded to 2 (one compile for all)
        self.smallest_batch = 2 if compile else 1

    def _swap(self, a: int, b: int) -> None:
        self.pool.swap_slots(a, b)
        tmp = self.drawn[a].clone()
        self.drawn[a] = self.drawn[b]
        self.drawn[b] = tmp

    def _move(self, src: int, dst: int) -> None:
        self.pool.move_slot(src, dst)
        self.drawn[dst] = self.drawn[src]

    @torch.inference_mode()
    def clear_condition_slots(self, row: int) -> None:
        """A new segment starts from zeros in its text slots, as the official fresh cache does: the first call after
        a restart may attend text slots the restart prefill did not write (fact sheet 4.13)."""
        self.pool.zero_slot(row, self.condition_slots + 1)

    @torch.inference_mode()
    def project_speaker(self, llm_hidden: torch.Tensor) -> torch.Tensor:
        return self.tts.project_speaker(llm_hidden[None])[0]

    @torch.inference_mode()
    def prefill_text(self, row: int, ids: list[int], begin: int, speaker: torch.Tensor | None) -> None:
        """Writes text slots begin..begin+len(ids)-1; text attends only to earlier text (plain causal mask)."""
        ids_t = torch.tensor([ids], dtype=torch.long, device=self.device)
        embeds = self._text_embeds(ids_t, speaker[None] if speaker is not None else None)
        positions = torch.arange(begin, begin + len(ids), device=self.device)[None]
        width = length_bucket(begin + len(ids), self.widths)
        self.tts(embeds, positions, self.pool.view(row, 1, width), causal_mask(positions, width))

    @torch.inference_mode()
    def prefill_text_rows(self, rows: list[tuple[int, list[int], int, torch.Tensor | None]]) -> None:
        """Several rows' text prefills, each (row, ids, begin, speaker). With graphs, those of at most PREFILL_WIDTH
        tokens run as one batched step over just those rows, wherever they are in the pool (`KVRows`; per-row
        positions, padding at the scratch slot): a step over every active row would cost sixteen tokens of each;
        the rest (a read-aloud part's whole text) run one at a time."""
        batched = [self.graphs.enabled and len(ids) <= PREFILL_WIDTH for _, ids, _, _ in rows]
        short = [r for r, b in zip(rows, batched, strict=True) if b]
        for r, b in zip(rows, batched, strict=True):
            if not b:
                self.prefill_text(*r)
        if not short:
            return
        batch = batch_bucket(len(short), self.slots.size, self.smallest_batch)
        width = length_bucket(max(begin + len(ids) for _, ids, begin, _ in short), self.widths)
        ids_h = np.zeros((batch, PREFILL_WIDTH), np.int64)
        positions = np.full((batch, PREFILL_WIDTH), self.scratch, np.int64)
        pool_rows = np.full(batch, short[0][0], np.int64)  # a padding row writes to the first row's scratch slot
        has_speaker = np.zeros(batch, bool)
        speaker = torch.zeros(batch, self.tts.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        for i, (row, ids, begin, spk) in enumerate(short):
            ids_h[i, : len(ids)] = ids
            positions[i, : len(ids)] = np.arange(begin, begin + len(ids))
            pool_rows[i] = row
            if spk is not None:
                has_speaker[i] = True
                speaker[i] = spk
        inputs = {"ids": ids_h, "positions": positions, "rows": pool_rows, "speaker": speaker,
                  "has_speaker": has_speaker}
        self.graphs.run(("tts_text", batch, width), lambda **kw: self._text_step(width, **kw), inputs)

    def _text_embeds(self, ids: torch.Tensor, speaker: torch.Tensor | None,
                     has_speaker: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, T, C], the speaker vector [B, C] in each row's [spk_emb] slot (rows with `has_speaker`,
        all rows when it is None; no row when `speaker` is None)."""
        embeds = self.tts.embed_text(ids)
        if speaker is None:
            return embeds
        is_speaker = ids == self.spk_emb
        if has_speaker is not None:
            is_speaker = is_speaker & has_speaker[:, None]
        return torch.where(is_speaker[..., None], speaker[:, None].to(embeds.dtype), embeds)

    def _text_step(self, width: int, ids, positions, rows, speaker, has_speaker) -> torch.Tensor:
        embeds = self._text_embeds(ids, speaker, has_speaker)
        view = KVRows(self.pool, rows, width)
        return self.tts(embeds, positions, view, causal_mask(positions, width), compiled=self.compiled)

    @torch.inference_mode()
    def prefill_audio(self, row: int, codes: np.ndarray, num_text_tokens: int) -> None:
        """Segment restart: `[Ptts]` + codes[:-1] at 302.. with ONE mask row for the whole block (so the block is
        non-causal, as in the official `prefill_audio_ids`)."""
        codes_t = torch.from_numpy(np.asarray(codes)).to(self.device)
        bos = self.tts.embed_text(torch.tensor([[self.audio_bos]], device=self.device))
        embeds = torch.cat([bos, self.tts.embed_codes(codes_t[None, :-1])], dim=1)
        n, start = embeds.shape[1], self.condition_slots
        width = length_bucket(start + n, self.widths)
        one = torch.tensor([start], device=self.device)
        mask = tts_audio_mask(one, torch.tensor([num_text_tokens], device=self.device), one + n, width)
        positions = torch.arange(start, start + n, device=self.device)[None]
        self.tts(embeds, positions, self.pool.view(row, 1, width), mask)

    @torch.inference_mode()
    def step(self, rows: list[TTSRow]) -> Pending | Ready:
        """One audio token for each of `rows` (active rows of the pool); the result is, for each row, its codes (a
        tuple of num_vq ints) and whether they hold EOS (the end of the segment)."""
        if self.one_row_at_a_time:
            return Ready([self._step_rows(r.row, 1, [r]).get()[0] for r in rows])
        return self._step_rows(0, batch_bucket(self.slots.num_active, self.slots.size, self.smallest_batch), rows)

    def _step_rows(self, first: int, batch: int, rows: list[TTSRow]) -> Pending:
        """One step over pool rows first..first+batch-1, of which `rows` take part."""
        width = length_bucket(max(r.position for r in rows) + 1, self.widths)
        ints, floats = self._blank(batch)
        index = [r.row - first for r in rows]
        no_codes = [0] * self.num_vq
        # one list per row, converted by numpy in one go: a slice assignment per field costs more than the step's
        # whole packing at a hundred rows
        ints[index] = [[r.position, r.prev_codes is None and not r.prev_drawn, r.num_text_tokens, r.ban_eos,
                        r.force_eos, r.sampling.top_k, r.sampling.greedy, r.sampling.seed, r.counter, r.prev_drawn,
                        *(no_codes if r.prev_codes is None else r.prev_codes)] for r in rows]
        floats[index] = [[*r.sampling.temperature, r.sampling.top_p] for r in rows]
        out = self.graphs.run(("tts", first, batch, width), lambda **kw: self._step(first, width, **kw),
                              {"ints": ints, "floats": floats})
        eos = self.eos_code
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None

        def codes_of_rows(codes: np.ndarray) -> list[tuple[tuple[int, ...], bool]]:
            # tuples of Python ints, which the garbage collector stops tracking (a reply keeps every step's codes:
            # lists would lengthen every full collection); EOS in any codebook ends the segment
            every = codes.tolist()
            taking = [tuple(every[i]) for i in index]
            return [(row_codes, eos in row_codes) for row_codes in taking]

        return Pending((out,), codes_of_rows, stream)

    def warm_up(self) -> None:
        """Captures every (batch size, key width) step and text-prefill graph now; scratch rows only."""
        if not self.graphs.enabled:
            return
        for batch in batch_buckets(self.slots.size, self.smallest_batch):
            for width in self.widths:
                ints, floats = self._blank(batch)
                self.graphs.run(("tts", 0, batch, width), lambda w=width, **kw: self._step(0, w, **kw),
                                {"ints": ints, "floats": floats})
                text = {
                    "ids": np.zeros((batch, PREFILL_WIDTH), np.int64),
                    "positions": np.full((batch, PREFILL_WIDTH), self.scratch, np.int64),
                    "rows": np.zeros(batch, np.int64),
                    "speaker": torch.zeros(batch, self.tts.cfg.hidden_size, dtype=self.model.dtype,
                                           device=self.device),
                    "has_speaker": np.zeros(batch, bool),
                }
                self.graphs.run(("tts_text", batch, width), lambda w=width, **kw: self._text_step(w, **kw), text)

    def _blank(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """A step's inputs in two host arrays, every row at the scratch slot (taking no part). ints [B, 10 + Q]:
        position, first step, text tokens, ban EOS, force EOS, top_k, greedy, seed, counter, feed the drawn codes,
        previous codes [Q]; floats [B, Q + 1]: temperature per codebook, top_p."""
        ints = np.zeros((batch, 10 + self.num_vq), np.int64)
        ints[:, 0], ints[:, 5], ints[:, 6] = self.scratch, 1, 1
        return ints, np.ones((batch, self.num_vq + 1), np.float32)

    def _step(self, first: int, width: int, ints: torch.Tensor, floats: torch.Tensor) -> torch.Tensor:
        """Each row's next audio token: its input (`[Ptts]`, the codes it drew last or codes from the host), its
        audio mask, the backbone and its sampling. Returns the codes [B, num_vq]."""
        batch, q = ints.shape[0], self.num_vq
        positions, first_step, num_text = ints[:, 0], ints[:, 1] != 0, ints[:, 2]
        bos = self.tts.embed_text(torch.full((batch, 1), self.audio_bos, device=ints.device))
        drawn = self.drawn[first:first + batch]
        prev = torch.where(ints[:, 9, None] != 0, drawn, ints[:, 10:10 + q])
        embeds = torch.where(first_step[:, None, None], bos, self.tts.embed_codes(prev[:, None]))  # [B, 1, C]
        mask = tts_audio_mask(positions, num_text, positions + 1, width)
        hidden = self.tts(embeds, positions[:, None], self.pool.view(first, batch, width), mask, self.compiled)
        logits = self.tts.compute_logits(hidden)[:, -1]  # [B, num_vq, num_codes]
        sample = compiled(sample_tts) if self.compiled else sample_tts
        codes = sample(logits, temperature=floats[:, :q], top_p=floats[:, q], top_k=ints[:, 5],
                       first_audio_step=first_step, ban_eos=ints[:, 3] != 0, force_eos=ints[:, 4] != 0,
                       greedy=ints[:, 6] != 0, eos_id=self.eos_code, seeds=ints[:, 7], counters=ints[:, 8])
        drawn.copy_(torch.where((positions != self.scratch)[:, None], codes, drawn))  # rows taking part only
        return codes
