"""The engine loop: each iteration gathers the ready work of every live request and runs it as batches.

A live request (`Live`) holds its reply's two coroutines (omnivox/engine/request.py), its cache rows, its random
keys and its playback clock. `advance` runs each coroutine until it asks for device work or waits; the iteration
then runs, in order: vocoder windows (audio leaves first), one TTS step for every row that wants one, an LLM decode
step when a stream needs text (or the LLM has idled for a few iterations), and prefills within a token budget.

Deadlines: a stream's playback clock is first-audio time + audio delivered. `plan` orders prefills: a stream about
to underrun first, then streams without audio yet, then the rest by how little they have buffered; while any stream
is about to underrun, prefills are held to one per iteration (they delay every stream's next step); a stream more
than `ahead_limit_s` ahead waits (its rows idle).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from omnivox.engine.llm_executor import LLMExecutor, LLMRow, LLMSampling
from omnivox.engine.request import LLMChunk, Piece, Reply
from omnivox.engine.session import Session
from omnivox.engine.slots import SlotHandle
from omnivox.engine.tts_executor import TTSExecutor, TTSRow, TTSSampling
from omnivox.engine.types import SAMPLE_RATE, RequestMetrics, SamplingParams
from omnivox.engine.vocoder import VocoderExecutor
from omnivox.engine.work import (
    NEXT_CHUNK,
    LLMDecode,
    LLMPrefill,
    NewSegment,
    ProjectSpeaker,
    TTSPrefillAudio,
    TTSPrefillText,
    TTSStep,
    Vocode,
)


class Side:
    """One coroutine of a request and the work it waits on."""

    def __init__(self, gen: Generator):
        self.gen = gen
        self.item: object = None
        self.result: object = None
        self.ready = True  # the coroutine may be resumed (with `result`)
        self.done = False

    def resolve(self, result: object) -> None:
        self.result, self.ready = result, True

    def resume(self) -> object:
        value, self.result, self.ready = self.result, None, False
        try:
            self.item = self.gen.send(value)
        except StopIteration:
            self.done, self.item = True, None
        return self.item

    def waiting_on(self, kind: type) -> bool:
        return not self.ready and not self.done and isinstance(self.item, kind)


@dataclass(eq=False)
class Live:
    """A request the loop is serving."""

    reply: Reply
    speech: Side
    llm: Side | None  # None for read-aloud
    session: Session | None
    sampling: SamplingParams
    metrics: RequestMetrics
    llm_seed: int
    tts_seed: int
    emit: Callable[[object], None]  # a Piece, an exception, or None at the end
    lookahead: int
    llm_counter: int = 0
    tts_counter: int = 0
    tts_slot: SlotHandle | None = None
    chunks: deque[LLMChunk] = field(default_factory=deque)
    first_audio_at: float | None = None
    audio_s: float = 0.0
    cancelled: bool = False
    order: int = field(default_factory=itertools.count().__next__)

    def buffered_s(self, now: float) -> float:
        """Audio delivered but not yet played by a realtime listener (0 before the first audio)."""
        return 0.0 if self.first_audio_at is None else self.first_audio_at + self.audio_s - now

    @property
    def llm_waited_for(self) -> bool:
        """The speech is stalled on the next LLM chunk."""
        return self.speech.item is NEXT_CHUNK and not self.speech.ready and not self.chunks


@dataclass
class SchedulerConfig:
    prefill_token_budget: int = 2048  # LLM prefill tokens per iteration
    llm_idle_iterations: int = 4  # run a decode step for pending look-ahead rows at least this often
    text_wait_reserve_s: float = 1.0  # a stream waiting on text with less audio buffered gets a decode step now
    underrun_reserve_s: float = 0.3  # a stream with less buffered than this is about to underrun
    ahead_limit_s: float = 20.0  # a stream with more buffered than this waits


class Scheduler:
    def __init__(self, llm: LLMExecutor, tts: TTSExecutor, vocoder: VocoderExecutor, prefix,
                 config: SchedulerConfig | None = None, clock: Callable[[], float] = time.perf_counter):
        self.llm, self.tts, self.vocoder = llm, tts, vocoder
        self.prefix = prefix  # PrefixCache: the shared system prompt's cache
        self.config = config or SchedulerConfig()
        self.clock = clock
        self.live: list[Live] = []
        self.iterations = 0
        self._llm_idle = 0
        self.on_batch: Callable[[str, int], None] | None = None  # observer of each batch's size (metrics)

    # ---- requests in and out ----------------------------------------------------------------------------------
    def add(self, live: Live) -> None:
        if live.session is not None:
            self.llm.slots.activate(live.session.slot)
        self.live.append(live)

    def finish(self, live: Live, error: BaseException | None = None) -> None:
        """Ends a request (done, cancelled or failed) and gives back everything it holds."""
        if live not in self.live:
            return
        self.live.remove(live)
        for side in (live.speech, live.llm):
            if side is not None:
                side.gen.close()
        if live.tts_slot is not None:
            self.tts.slots.release(live.tts_slot)
            live.tts_slot = None
        session = live.session
        if session is not None and session.slot is not None:
            consumed = live.reply.consumed_length
            if consumed is not None and session.length > consumed:
                session.length = consumed  # chunks made ahead but never spoken are taken back
            self.llm.slots.deactivate(session.slot)
            session.busy = False
        m = live.metrics
        if not m.finish_reason:
            m.finish_reason = "error" if error is not None else ("cancelled" if live.cancelled else "eos")
        live.emit(error)

    # ---- one iteration ------------------------------------------------------------------------------------------
    def reap(self) -> None:
        """Ends the cancelled requests, giving their rows back."""
        for live in [r for r in self.live if r.cancelled]:
            self.finish(live)

    def step(self) -> bool:
        """One iteration; False when no work could run (the caller may wait for a new request or event)."""
        self.reap()
        if not self.live:
            return False
        now = self.clock()
        for live in list(self.live):
            self._guard(live, self._advance, live)
        plan = self.plan(now)
        if not any(plan.values()):
            return False  # every request waits on something outside the loop (text to come, its listener)
        self._run_vocoder(plan["vocode"])
        self._run_tts(plan["tts"])
        self._run_llm(plan["llm"])
        self._run_prefills(plan["prefill"])
        self.iterations += 1
        return True

    def plan(self, now: float) -> dict[str, list[Live]]:
        """Which requests' pending work runs this iteration (pure: reads the requests and the clock)."""
        cfg = self.config
        go = [r for r in self.live if r.buffered_s(now) <= cfg.ahead_limit_s]
        vocode = [r for r in go if r.speech.waiting_on(Vocode)]
        tts = [r for r in go if r.speech.waiting_on(TTSStep)]
        llm_rows = [r for r in go if r.llm is not None and r.llm.waiting_on(LLMDecode) and len(r.llm.item.ids) == 1]
        # a decode step costs about as much for one row as for many: run it when a stream's audio waits on text
        # (its first audio, or a buffer running low), else let look-ahead rows gather for a few iterations
        needed = any(r.llm_waited_for and r.buffered_s(now) < cfg.text_wait_reserve_s for r in llm_rows)
        gather = bool(tts or vocode)  # rows wait to gather only while there is other work to do
        llm = llm_rows if needed or (llm_rows and (self._llm_idle >= cfg.llm_idle_iterations or not gather)) else []
        def urgent(r: Live) -> bool:
            return r.first_audio_at is not None and r.buffered_s(now) < cfg.underrun_reserve_s

        prefills = [r for r in go if _prefill_work(r) is not None]
        prefills.sort(key=lambda r: (not urgent(r), r.first_audio_at is not None, r.buffered_s(now), r.order))
        if any(urgent(r) for r in self.live):
            prefills = prefills[:1]
        return {"vocode": vocode, "tts": tts, "llm": llm, "prefill": prefills}

    def stats(self, now: float) -> dict[str, dict[str, float]]:
        """Queue depths by kind of work and the buffered audio of the streams that have audio (for /metrics)."""
        kinds = {"tts_step": TTSStep, "vocoder": Vocode, "tts_prefill": (TTSPrefillText, TTSPrefillAudio)}
        waiting = {name: sum(r.speech.waiting_on(kind) for r in self.live) for name, kind in kinds.items()}
        waiting["llm"] = sum(r.llm is not None and r.llm.waiting_on((LLMDecode, LLMPrefill)) for r in self.live)
        waiting["text"] = sum(r.llm_waited_for for r in self.live)
        buffered = [r.buffered_s(now) for r in self.live if r.first_audio_at is not None]
        if not buffered:
            return {"waiting": waiting, "buffered_s": {"min": 0.0, "mean": 0.0}}
        return {"waiting": waiting, "buffered_s": {"min": min(buffered), "mean": sum(buffered) / len(buffered)}}

    # ---- coroutines ---------------------------------------------------------------------------------------------
    def _advance(self, live: Live) -> None:
        """Runs the request's coroutines until each waits on device work (or the speech on text not yet made)."""
        speech, llm = live.speech, live.llm
        while True:
            moved = False
            while speech.ready and not speech.done:
                self._handle_speech(live, speech.resume())
                moved = True
            if speech.done:
                self.finish(live)
                return
            if speech.item is NEXT_CHUNK and not speech.ready:
                if live.chunks:
                    speech.resolve(live.chunks.popleft())
                    continue
                if llm is None or llm.done:
                    speech.resolve(None)
                    continue
            while llm is not None and llm.ready and not llm.done and self._llm_may_run(live):
                if isinstance(llm.resume(), LLMChunk):
                    live.chunks.append(llm.item)
                    llm.resolve(None)
                moved = True
            if not moved:
                return

    def _llm_may_run(self, live: Live) -> bool:
        """The LLM makes a chunk when the speech waits for one, or runs ahead (once audio is out) up to the limit."""
        if live.llm_waited_for:
            return True
        return live.reply.audio_released and len(live.chunks) < live.lookahead

    def _handle_speech(self, live: Live, item: object) -> None:
        if isinstance(item, Piece):
            self._deliver(live, item)
            live.speech.resolve(None)
        elif isinstance(item, ProjectSpeaker):
            live.speech.resolve(self.tts.project_speaker(item.hidden))
        elif isinstance(item, NewSegment):
            if live.tts_slot is not None:
                self.tts.slots.release(live.tts_slot)
            live.tts_slot = self.tts.slots.acquire(active=True)
            assert live.tts_slot is not None, "admission keeps a TTS row for every live request"
            self.tts.clear_condition_slots(live.tts_slot.row)
            live.speech.resolve(None)

    def _deliver(self, live: Live, piece: Piece) -> None:
        if len(piece.pcm) and live.first_audio_at is None:
            live.first_audio_at = self.clock()
        live.audio_s += len(piece.pcm) / SAMPLE_RATE
        live.emit(piece)

    def _guard(self, live: Live, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # one request's failure ends that request only
            self.finish(live, exc)

    # ---- running batches ----------------------------------------------------------------------------------------
    def _timed(self, stage: str, lives: list[Live], run: Callable[[], list]) -> list:
        t0 = self.clock()
        try:
            out = run()
        except Exception as exc:
            for live in lives:
                self.finish(live, exc)
            return []
        dt = self.clock() - t0
        for live in lives:
            live.metrics.stages[stage] = live.metrics.stages.get(stage, 0.0) + dt
        if self.on_batch is not None:
            self.on_batch({"audio": "vocoder", "tts_init": "prefill"}.get(stage, stage), len(lives))
        return out

    def _run_vocoder(self, lives: list[Live]) -> None:
        if not lives:
            return
        pcms = self._timed("audio", lives, lambda: self.vocoder.decode([r.speech.item.codes for r in lives]))
        for live, pcm in zip(lives, pcms, strict=False):
            live.speech.resolve(pcm)

    def _run_tts(self, lives: list[Live]) -> None:
        if not lives:
            return
        rows = []
        for live in lives:
            s, w = live.sampling, live.speech.item
            sampling = TTSSampling(tuple(s.tts_temperature), s.tts_top_p, s.tts_top_k, s.greedy, live.tts_seed,
                                   live.tts_counter)
            rows.append(TTSRow(live.tts_slot.row, w.position, w.prev_codes, w.num_text_tokens, w.ban_eos,
                               w.force_eos, sampling))
        codes = self._timed("tts", lives, lambda: self.tts.step(rows))
        for live, c in zip(lives, codes, strict=False):
            live.tts_counter += 1
            live.speech.resolve(c)

    def _llm_sampling(self, live: Live) -> LLMSampling:
        s = live.sampling
        return LLMSampling(s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.greedy, live.llm_seed,
                           live.llm_counter)

    def _run_llm(self, lives: list[Live]) -> None:
        if not lives:
            self._llm_idle += 1
            return
        self._llm_idle = 0
        rows = []
        for live in lives:
            w = live.llm.item
            rows.append(LLMRow(live.session.slot.row, w.ids[0], live.session.length, w.window,
                               self._llm_sampling(live)))
        tokens = self._timed("llm", lives, lambda: self.llm.decode(rows))
        for live, token in zip(lives, tokens, strict=False):
            live.session.length += 1
            live.llm_counter += 1
            live.llm.resolve((token, None))

    def _run_prefills(self, lives: list[Live]) -> None:
        texts = [r for r in lives if r.speech.waiting_on(TTSPrefillText)]
        if texts:
            items = [(r.tts_slot.row, r.speech.item.ids, r.speech.item.begin, r.speech.item.speaker) for r in texts]
            if self._timed("tts", texts, lambda: [self.tts.prefill_text_rows(items)]):
                for live in texts:
                    live.speech.resolve(None)
        budget = self.config.prefill_token_budget
        for live in lives:
            if live in texts:
                continue
            side, item = _prefill_work(live)
            cost = len(getattr(item, "ids", ())) if isinstance(item, (LLMPrefill, LLMDecode)) else 0
            if cost and budget <= 0:
                break
            budget -= cost
            stage = "prefill" if isinstance(item, LLMPrefill) else ("llm" if isinstance(item, LLMDecode) else "tts")
            result = self._timed(stage, [live], lambda live=live, item=item: [self._prefill(live, item)])
            if result:
                side.resolve(result[0])

    def _prefill(self, live: Live, item: object) -> object:
        if isinstance(item, TTSPrefillAudio):
            self.tts.prefill_audio(live.tts_slot.row, item.codes, item.num_text_tokens)
            return None
        session = live.session
        ids = item.ids
        if isinstance(item, LLMPrefill) and session.length == 0:
            ids = ids[self.prefix.copy_into(self.llm.pool, session.slot.row, ids):]
            session.length = len(item.ids) - len(ids)
        if not ids:
            return None
        hidden = self.llm.prefill(session.slot.row, session.length, ids)
        session.length += len(ids)
        if isinstance(item, LLMPrefill):
            return None
        token = self.llm.sample_one(hidden[-1], item.window, self._llm_sampling(live))
        live.llm_counter += 1
        return token, (hidden[item.hidden_at] if item.hidden_at is not None else None)


def _prefill_work(live: Live) -> tuple[Side, object] | None:
    """The request's pending prefill-like work (run one request at a time), if any."""
    if live.speech.waiting_on((TTSPrefillText, TTSPrefillAudio)):
        return live.speech, live.speech.item
    llm = live.llm
    if llm is not None and (llm.waiting_on(LLMPrefill) or (llm.waiting_on(LLMDecode) and len(llm.item.ids) > 1)):
        return llm, llm.item
    return None
