"""The LLM executor: a pool of cache rows, batched prefills over any rows, and batched decode steps over the
active rows, on the executor's own CUDA stream so they run beside the TTS.

It knows rows, positions and sampling parameters, never requests. A decode step runs on rows 0..B-1 of the pool
(B: the captured batch size that holds the active rows, omnivox/engine/slots.py keeps them in front); rows without
a token this step write to the scratch position (the last one, never used by a session) and their output is
dropped. When the rows taking part fit a smaller batch, the step runs over just them instead, wherever they are
(`KVRows`: their keys gathered): a step's cost is mostly its rows' share of the products, and a gathered row's
keys cost little beside them (a few of the ~256 active rows take part in a step when streams run ahead). Masks,
sampling and the counter-based random numbers all run inside the step, so it replays as one CUDA graph per (batch
size, key width). A prefill runs the prompts of several rows, wherever they are in the pool, as one padded batch
(pads write to the scratch position), replayed as a CUDA graph per (batch, length, key width). Short prompts may
instead ride along with a decode step, in the same forward (one graph per decode shape): the weights, which a step
at these batch sizes spends most of its time reading, are then read once for both.

Both return `Pending` results: the loop launches the LLM's work, runs the TTS and the vocoder meanwhile, and only
then waits for the tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from omnivox.engine.graphs import (
    BATCH_BUCKETS,
    GraphCache,
    Pending,
    Ready,
    batch_bucket,
    batch_buckets,
    length_bucket,
    length_buckets,
)
from omnivox.engine.masks import causal_mask
from omnivox.engine.sampling import LLM_TOP_K_MAX, compiled, sample_llm
from omnivox.engine.slots import SlotTable
from omnivox.models.kv_cache import KVPool, KVRows
from omnivox.models.layers import Segment, Segments

WINDOW = 16  # repetition-penalty window width of a step (the header + a 3-token call fit)
PREFILL_ALIGN = 16  # prefill lengths are padded to a multiple of this (fewer shapes for the compiler)
RIDING_PROMPTS = 2  # prompts a decode step takes along (padded to this many rows: one graph per step shape)
RIDING_PROMPT_TOKENS = 64  # ... each of at most this many ids (a turn's prompt and reply header; longer run alone)


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
    """One decode-step row: `token` at `position`, then one token sampled with the repetition `window`."""

    row: int
    token: int
    position: int
    window: list[int]
    sampling: LLMSampling


@dataclass
class PrefillRow:
    """`ids` at positions start.. of `row`; with `sampling`, one token is sampled after the last id (a reply's
    header); with `hidden_at`, the post-norm hidden state at that index of `ids` is handed back (on the device)."""

    row: int
    start: int
    ids: list[int]
    window: list[int] | None = None
    sampling: LLMSampling | None = None
    hidden_at: int | None = None


class LLMExecutor:
    def __init__(self, model, slots: int, capacity: int, graphs: GraphCache, one_row_at_a_time: bool = False,
                 compile: bool = False, stream: torch.cuda.Stream | None = None):
        c = model.config.llm
        self.model, self.llm, self.device = model, model.llm, model.device
        self.capacity = min(capacity, c.max_position_embeddings)
        self.scratch = self.capacity - 1
        self.pool = KVPool(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.capacity, model.dtype,
                           model.device, slots)
        self.slots = SlotTable(slots, self._swap, self._move)
        self.graphs = graphs
        self.widths = length_buckets(self.capacity, 256)
        self.one_row_at_a_time = one_row_at_a_time  # the reference path: every step at batch 1, eager
        # the layers' compiled halves; batches of 1 are padded to 2 (one compile for every batch size; a step with
        # prompts riding along is one row of flattened tokens: one more compile)
        self.compiled = compile
        self.smallest_batch = 2 if compile else 1
        self.stream = stream

    @property
    def usable_positions(self) -> int:
        return self.scratch

    @contextlib.contextmanager
    def on_stream(self) -> Iterator[torch.cuda.Stream | None]:
        """Runs the block on the executor's stream, after the work the caller's stream has queued (row swaps, cache
        copies); yields the caller's stream (None without streams)."""
        if self.stream is None:
            yield None
            return
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)
        with torch.cuda.stream(self.stream):
            yield caller

    def _swap(self, a: int, b: int) -> None:
        with self.on_stream():
            self.pool.swap_slots(a, b)

    def _move(self, src: int, dst: int) -> None:
        with self.on_stream():
            self.pool.move_slot(src, dst)

    @torch.inference_mode()
    def copy_prefix(self, source: KVPool, row: int, length: int) -> None:
        """Row `row` starts with `source`'s row 0, positions [0, length) (the shared system prompt)."""
        with self.on_stream():
            self.pool.copy_prefix(source, 0, row, length)

    # ---- prefills -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: list[PrefillRow]) -> Pending | Ready:
        """Runs every row's ids; the result is, per row, (sampled token or None, hidden at `hidden_at` or None)."""
        if self.one_row_at_a_time:
            return Ready([self._prefill([r], 1, len(r.ids)).get()[0] for r in rows])
        return self._prefill(rows, *self._prefill_shape(len(rows), max(len(r.ids) for r in rows)))

    @staticmethod
    def _prefill_shape(rows: int, tokens: int) -> tuple[int, int]:
        """(batch, length) of the captured prefill that holds `rows` rows of up to `tokens` ids: at least 2 rows
        (one compile for every batch size), lengths in powers of two from PREFILL_ALIGN."""
        length = PREFILL_ALIGN
        while length < tokens:
            length *= 2
        return batch_bucket(max(rows, 2), BATCH_BUCKETS[-1]), length

    def _prefill(self, rows: list[PrefillRow], batch: int, length: int) -> Pending:
        width = length_bucket(max(r.start + len(r.ids) for r in rows), self.widths)
        ints, floats = self._pack([_entry(r) for r in rows], batch)
        inputs = dict(self._prompt_arrays(rows, batch, length), ints=ints, floats=floats)
        with self.on_stream() as caller:
            tokens, hidden = self.graphs.run(("prefill", batch, length, width),
                                             lambda **kw: self._prefill_step(width, **kw), inputs)
            results = self._prompt_results(rows, hidden, caller)
            return Pending((tokens,), lambda tokens: results(tokens, 0), self.stream)

    def _prompt_arrays(self, rows: Sequence[PrefillRow], batch: int, length: int) -> dict[str, np.ndarray]:
        """Prompts' inputs padded to [batch, length]: ids, positions, pool rows and each one's last index. Padding
        writes to the scratch position (of the first prompt's row, for padding rows)."""
        ids = np.zeros((batch, length), np.int64)
        positions = np.full((batch, length), self.scratch, np.int64)
        pool_rows = np.full(batch, rows[0].row, np.int64)
        last = np.zeros(batch, np.int64)
        for i, r in enumerate(rows):
            n = len(r.ids)
            ids[i, :n], positions[i, :n], pool_rows[i], last[i] = r.ids, np.arange(r.start, r.start + n), r.row, n - 1
        return dict(ids=ids, positions=positions, rows=pool_rows, last=last)

    @staticmethod
    def _prompt_results(rows: Sequence[PrefillRow], hidden: torch.Tensor, caller: torch.cuda.Stream | None):
        """Each prompt's (sampled token or None, hidden at `hidden_at` or None), from the step's tokens (prompt i's
        at index offset + i) and its hidden states [batch, length, C] (copied now: a graph's output is overwritten
        by its next replay)."""
        wanted = {}
        for i, r in enumerate(rows):
            if r.hidden_at is not None:
                wanted[i] = hidden[i, r.hidden_at].clone()
                if caller is not None:
                    wanted[i].record_stream(caller)  # read later on the caller's stream
        sampled = [r.sampling is not None for r in rows]

        def results(tokens: np.ndarray, offset: int) -> list[tuple[int | None, torch.Tensor | None]]:
            return [(int(tokens[offset + i]) if sampled[i] else None, wanted.get(i)) for i in range(len(rows))]

        return results

    def _prefill_step(self, width: int, ids, positions, rows, last, ints, floats):
        view = KVRows(self.pool, rows, width)
        hidden = self.llm(ids, positions, view, causal_mask(positions, width), compiled=self.compiled)  # [B,T,C]
        final = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # [B, C]
        return self._sample(self.llm.compute_logits(final), ints, floats), hidden

    # ---- decode steps -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, rows: list[LLMRow], prompts: Sequence[PrefillRow] = ()) -> Pending | Ready:
        """One token for each of `rows` (all of them active rows of the pool); the result is the sampled tokens,
        then one (token or None, hidden or None) per prompt of `prompts` (see `prefill`). Up to RIDING_PROMPTS
        prompts of at most RIDING_PROMPT_TOKENS ids ride along in the same forward (`can_ride`); the reference path
        runs them after the step, one at a time."""
        if self.one_row_at_a_time:
            steps = [self._decode(r.row, 1, [r]).get()[0] for r in rows]
            return Ready(steps + (self.prefill(list(prompts)).get() if prompts else []))
        batch = batch_bucket(self.slots.num_active, self.slots.size, self.smallest_batch)
        gathered = batch_bucket(len(rows), self.slots.size, self.smallest_batch) if rows else batch
        first, batch = (None, gathered) if gathered < batch else (0, batch)
        if not prompts:
            return self._decode(first, batch, rows)
        if len(prompts) > RIDING_PROMPTS or not all(can_ride(len(p.ids)) for p in prompts):
            raise ValueError(f"at most {RIDING_PROMPTS} prompts of 1..{RIDING_PROMPT_TOKENS} ids ride along")
        return self._decode_with_prompts(first, batch, rows, prompts)

    def _decode_with_prompts(self, first: int | None, batch: int, rows: list[LLMRow],
                             prompts: Sequence[PrefillRow]) -> Pending:
        """A decode step (as `_decode`) with prompts riding along: one forward over the step's tokens and the
        prompts' (`Segments`), so the weights are read once for both. A prefill alone costs about as much as a
        decode step; inside one it costs a few more rows of each product."""
        ends = [r.position + 1 for r in rows] + [p.start + len(p.ids) for p in prompts]
        width = length_bucket(max(ends), self.widths)
        riding = [_entry(p) for p in prompts] + [None] * (RIDING_PROMPTS - len(prompts))
        ints, floats, index = self._step_inputs(first, batch, rows, riding)
        inputs = dict(self._prompt_arrays(prompts, RIDING_PROMPTS, RIDING_PROMPT_TOKENS), ints=ints, floats=floats)
        key = ("llm+prompts", batch, width)
        if first is None:
            inputs["step_rows"], key = self._gather_rows(batch, rows), ("llm_rows+prompts", batch, width)
        with self.on_stream() as caller:
            tokens, hidden = self.graphs.run(key, lambda **kw: self._step_with_prompts(width, **kw), inputs)
            prompt_results = self._prompt_results(prompts, hidden, caller)

            def results(tokens: np.ndarray) -> list:
                return [int(tokens[i]) for i in index] + prompt_results(tokens, batch)

            return Pending((tokens,), results, self.stream)

    def _step_with_prompts(self, width: int, ints, floats, ids, positions, rows, last, step_rows=None):
        batch = ints.shape[0] - ids.shape[0]
        step_ids, step_positions = ints[:batch, :1], ints[:batch, 1:2]
        view = self.pool.view(0, batch, width) if step_rows is None else KVRows(self.pool, step_rows, width)
        segments = Segments([
            Segment(step_positions, view, causal_mask(step_positions, width)),
            Segment(positions, KVRows(self.pool, rows, width), causal_mask(positions, width)),
        ])
        flat_ids = torch.cat([step_ids.flatten(), ids.flatten()])[None]
        hidden = self.llm(flat_ids, segments.positions, segments, compiled=self.compiled)[0]  # [N, C]
        prompts = hidden[batch:].view(ids.shape[0], ids.shape[1], -1)
        final = torch.cat([hidden[:batch], prompts[torch.arange(ids.shape[0], device=ids.device), last]])
        return self._sample(self.llm.compute_logits(final), ints, floats), prompts

    def _decode(self, first: int | None, batch: int, rows: list[LLMRow]) -> Pending:
        """One step over pool rows first..first+batch-1, of which `rows` take part; `first` None: over `rows`
        alone, wherever they are, padded to `batch`."""
        width = length_bucket(max(r.position for r in rows) + 1, self.widths)
        ints, floats, index = self._step_inputs(first, batch, rows)
        inputs, key = {"ints": ints, "floats": floats}, ("llm", first, batch, width)
        if first is None:
            inputs["rows"], key = self._gather_rows(batch, rows), ("llm_rows", batch, width)
        with self.on_stream():
            out = self.graphs.run(key, lambda **kw: self._step(first, width, **kw), inputs)
            return Pending((out,), lambda tokens: [int(tokens[i]) for i in index], self.stream)

    @staticmethod
    def _gather_rows(batch: int, rows: list[LLMRow]) -> np.ndarray:
        """A gathered step's pool rows; padding rows write to the first row's scratch position."""
        pool_rows = np.full(batch, rows[0].row, np.int64)
        pool_rows[: len(rows)] = [r.row for r in rows]
        return pool_rows

    def warm_up(self) -> None:
        """Captures every (batch size, key width) decode graph, with and without prompts riding along, and the
        prefill graphs of the common shapes now; every row writes to the scratch position only, so no cache is
        touched."""
        if not self.graphs.enabled:
            return
        with self.on_stream():
            buckets = batch_buckets(self.slots.size, self.smallest_batch)
            for batch in buckets:
                gathered = batch < buckets[-1]  # a step over every active row never needs a gather
                for width in self.widths:
                    ints, floats = self._pack([None] * batch, batch)
                    self.graphs.run(("llm", 0, batch, width), lambda w=width, **kw: self._step(0, w, **kw),
                                    {"ints": ints, "floats": floats})
                    if gathered:
                        self.graphs.run(("llm_rows", batch, width), lambda w=width, **kw: self._step(None, w, **kw),
                                        {"ints": ints, "floats": floats, "rows": np.zeros(batch, np.int64)})
                    ints, floats = self._pack([None] * (batch + RIDING_PROMPTS), batch + RIDING_PROMPTS)
                    scratch = PrefillRow(0, self.scratch, [0])  # one id at the scratch position
                    prompts = dict(self._prompt_arrays([scratch], RIDING_PROMPTS, RIDING_PROMPT_TOKENS), ints=ints,
                                   floats=floats)
                    self.graphs.run(("llm+prompts", batch, width),
                                    lambda w=width, **kw: self._step_with_prompts(w, **kw), prompts)
                    if gathered:
                        self.graphs.run(("llm_rows+prompts", batch, width),
                                        lambda w=width, **kw: self._step_with_prompts(w, **kw),
                                        dict(prompts, step_rows=np.zeros(batch, np.int64)))
            for batch in (2, 4, 8, 16, 32):  # the prefills of up to 32 new conversations at once
                for length in (PREFILL_ALIGN, 2 * PREFILL_ALIGN, 4 * PREFILL_ALIGN):
                    for width in self.widths:
                        ints, floats = self._pack([None] * batch, batch)
                        inputs = dict(ids=np.zeros((batch, length), np.int64),
                                      positions=np.full((batch, length), self.scratch, np.int64),
                                      rows=np.zeros(batch, np.int64), last=np.zeros(batch, np.int64),
                                      ints=ints, floats=floats)
                        self.graphs.run(("prefill", batch, length, width),
                                        lambda w=width, **kw: self._prefill_step(w, **kw), inputs)

    def _step(self, first: int | None, width: int, ints, floats, rows=None) -> torch.Tensor:
        ids, positions = ints[:, :1], ints[:, 1:2]
        view = self.pool.view(first, ids.shape[0], width) if first is not None else KVRows(self.pool, rows, width)
        hidden = self.llm(ids, positions, view, causal_mask(positions, width), compiled=self.compiled)[:, -1]
        return self._sample(self.llm.compute_logits(hidden), ints, floats)

    def _sample(self, logits: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor) -> torch.Tensor:
        sample = compiled(sample_llm) if self.compiled else sample_llm
        return sample(logits, ints[:, 6:], temperature=floats[:, 0], top_k=ints[:, 2], top_p=floats[:, 1],
                      repetition_penalty=floats[:, 2], greedy=ints[:, 3] != 0, seeds=ints[:, 4], counters=ints[:, 5])

    def _step_inputs(self, first: int | None, batch: int, rows: list[LLMRow],
                     after: list[tuple[list[int], LLMSampling] | None] = ()) -> tuple[np.ndarray, np.ndarray, list]:
        """A decode step's packed inputs and each row's batch index: row r at r.row - first (`first` None: in the
        order given) with its token, position and sampling, then the sampling entries `after` (prompts riding along)
        past the step's `batch` rows."""
        index = list(range(len(rows))) if first is None else [r.row - first for r in rows]
        entries: list[tuple[list[int], LLMSampling] | None] = [None] * batch
        for i, r in zip(index, rows, strict=True):
            entries[i] = (r.window, r.sampling)
        ints, floats = self._pack(entries + list(after), batch + len(after))
        for i, r in zip(index, rows, strict=True):
            ints[i, :2] = r.token, r.position
        return ints, floats, index

    def _pack(self, entries, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The step's inputs in two host arrays: ints [B, 6 + WINDOW] (token, position, top_k, greedy, seed,
        counter, window) and floats [B, 3] (temperature, top_p, penalty); token and position are left for the
        caller. Rows without an entry sample greedily at the scratch position."""
        ints = np.zeros((batch, 6 + WINDOW), np.int64)
        ints[:, 1], ints[:, 2], ints[:, 3] = self.scratch, 1, 1
        floats = np.ones((batch, 3), np.float32)
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            ids, s = entry
            ids = ids[-WINDOW:]
            ints[i, 6:] = ids + [ids[0]] * (WINDOW - len(ids))  # padding repeats an id: penalised once all the same
            ints[i, 2] = LLM_TOP_K_MAX if s.top_k <= 0 else min(s.top_k, LLM_TOP_K_MAX)
            ints[i, 3:6] = s.greedy, s.seed, s.counter
            floats[i] = s.temperature, s.top_p, s.repetition_penalty
        return ints, floats


def can_ride(tokens: int) -> bool:
    """A prompt of `tokens` ids may run inside a decode step (`LLMExecutor.decode`)."""
    return 0 < tokens <= RIDING_PROMPT_TOKENS


def _entry(prompt: PrefillRow) -> tuple[list[int], LLMSampling] | None:
    """A prompt's sampling entry for `LLMExecutor._pack` (None: nothing is sampled after it)."""
    return (prompt.window, prompt.sampling) if prompt.sampling is not None else None
