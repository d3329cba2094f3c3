"""The engine loop: each iteration gathers the ready work of every live request and runs it as batches.

A live request (`Live`, omnivox/engine/live.py) holds its reply's two coroutines (omnivox/engine/request.py), its
cache rows, its random keys and its playback clock. `advance` runs each coroutine until it asks for device work or
waits; the iteration then launches the LLM's work on its own stream (a decode step when a stream needs text now or
soon, else every `llm_gather_s` for the rows running ahead; short prompts ride along inside it, others run as a
prefill within a token budget) and launches, meanwhile, the vocoder windows (on the vocoder's stream), one TTS step
for every row in a TTS call and the TTS prefills. The TTS step's codes are read in the next iteration, after its
next step is launched: a row's next step takes them on the device, so the host's work of one iteration runs beside
the device's step, and the device always has the next step queued. While it waits for the last step and the
vocoder, LLM work that finishes hands its results over and the LLM's next work is launched at once (it starts on
the device when the TTS step ends).

Deadlines: a stream's playback clock is first-audio time + audio delivered. `plan` orders prefills: a stream about
to underrun first, then streams without audio yet, then the rest by how little they have buffered; while any stream
is about to underrun, TTS prefills (on the loop's stream) are held to one batch of short text prefills (up to
`urgent_text_prefills` rows, which cost about what one does with graphs on), one longer text (run alone) and one
segment-restart audio prefill per iteration (they delay every stream's next step), the LLM's prompt prefills (on
its own stream) are not; a stream more than `ahead_limit_s` ahead waits (its rows idle). Vocoder windows of streams
with audio to spare gather into larger batches for up to `vocoder_gather_s`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from omnivox.engine.graphs import Pending, Ready
from omnivox.engine.live import CallInProgress, Live
from omnivox.engine.llm_executor import RIDING_PROMPTS, LLMExecutor, LLMRow, LLMSampling, PrefillRow, can_ride
from omnivox.engine.request import LLMChunk, Piece
from omnivox.engine.tts_executor import PREFILL_WIDTH, TTSExecutor, TTSRow, TTSSampling
from omnivox.engine.types import SAMPLE_RATE
from omnivox.engine.vocoder import VocoderExecutor
from omnivox.engine.work import (
    NEXT_CHUNK,
    LLMDecode,
    LLMPrefill,
    NewSegment,
    ProjectSpeaker,
    TTSCall,
    TTSCallResult,
    TTSPrefillAudio,
    TTSPrefillText,
    Vocode,
)

SPIN_S = 5e-5  # how long the loop sleeps between looks at the device while it waits for a TTS step


@dataclass
class SchedulerConfig:
    prefill_token_budget: int = 2048  # LLM prefill tokens per iteration
    llm_gather_s: float = 0.1  # look-ahead rows gather this long between decode steps while other work runs
    low_buffer_s: float = 1.0  # a stream with less audio buffered gets its decode step or vocoder window now
    vocoder_gather_s: float = 0.05  # windows of streams with audio to spare gather this long while TTS steps run
    vocoder_gather_rows: int = 8  # ... or until this many wait
    underrun_reserve_s: float = 0.3  # a stream with less buffered than this is about to underrun
    urgent_text_prefills: int = 8  # TTS text prefills an iteration while a stream is about to underrun
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
        self.prompts_riding = 0  # LLM prompts run inside a decode step since start-up
        self._last_decode_at = -float("inf")
        self._last_vocode_at = -float("inf")
        self._decode: Launched | None = None  # the LLM's work in flight on its stream (at most one of each)
        self._prefill: Launched | None = None
        self._tts: Launched | None = None  # the TTS step in flight, its codes read in the next iteration
        self.loop_seconds: defaultdict[str, float] = defaultdict(float)  # host time by part of the iteration
        self.on_batch: Callable[[str, int], None] | None = None  # observer of each batch's size (metrics)
        self.after_advance: Callable[[], None] | None = None  # called once requests have advanced (chunks went out)

    # ---- requests in and out ----------------------------------------------------------------------------------
    def add(self, live: Live) -> None:
        if live.session is not None:
            self.llm.slots.activate(live.session.slot)
        live.mark("admitted", self.clock())
        self.live.append(live)

    def finish(self, live: Live, error: BaseException | None = None) -> None:
        """Ends a request (done, cancelled or failed) and gives back everything it holds. It leaves `self.live`
        last: a request no longer live holds no row (`Engine.wait_idle` reads this from another thread)."""
        if live.ended or live not in self.live:
            return
        live.ended = True
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
        live.emit(error)  # an owned session's LLM row is given back here
        self.live.remove(live)

    # ---- one iteration ------------------------------------------------------------------------------------------
    def reap(self) -> None:
        """Ends the cancelled requests, giving their rows back."""
        for live in [r for r in self.live if r.cancelled]:
            self.finish(live)

    def step(self) -> bool:
        """One iteration; False when no work could run (the caller may wait for a new request or event).

        The LLM's work runs on its own stream: launched here, its results are taken in a later iteration once
        ready, so the TTS steps of every stream go on meanwhile. An iteration with nothing else to run waits for it.
        """
        self.reap()
        resolved = self._resolve_llm(block=False)
        if not self.live and self._tts is None:
            return bool(self._resolve_llm(block=True) or resolved)
        now = self.clock()
        for live in list(self.live):
            if live.may_move:
                self._guard(live, self._advance, live)
        if self.after_advance is not None:
            self.after_advance()
        plan = self.plan(now)
        self.loop_seconds["advance"] += self.clock() - now
        launched = self._launch_llm_work(plan, now)
        speech = [r for r in plan["prefill"] if r.speech is r.prefill_side()]
        if plan["vocode"] or plan["tts"] or speech or self._tts is not None:
            audio = self._launch_vocoder(plan["vocode"])
            previous, self._tts = self._tts, self._launch_tts(plan["tts"])
            self._run_speech_prefills(speech)
            self._await_speech(previous, audio)
            self._resolve_tts(previous)
            self._resolve_vocoder(audio)
            self._relaunch_llm()
        elif not self._resolve_llm(block=True):  # nothing to do but wait for the LLM
            return bool(resolved or launched)
        self.iterations += 1
        return True

    def _launch_llm_work(self, plan: dict[str, list[Live]], now: float) -> bool:
        """Launches the planned decode step and prefills; True if any request moved (a prompt wholly covered by
        the shared prefix moves without a launch), so the loop goes on rather than wait for new work."""
        moved = bool(plan["llm"])
        prompts = [r for r in plan["prefill"] if r.llm is not None and r.prefill_side() is r.llm]
        if plan["llm"]:
            riders = [r for r in prompts if can_ride(len(r.llm.item.ids))][:RIDING_PROMPTS]
            self._decode = self._launch_llm(plan["llm"], riders)
            self._last_decode_at = now
            prompts = [r for r in prompts if r not in riders]
        if self._prefill is None:
            moved |= bool(prompts)
            self._prefill = self._launch_llm_prefills(prompts)
        return moved

    def _relaunch_llm(self) -> None:
        """LLM work that finished during the speech work hands its results over now, and the LLM's next work is
        launched at once rather than at the next iteration (a new stream's text comes one step after another)."""
        resolved = self._resolve_llm(block=False)
        if not resolved:
            return
        now = self.clock()
        for live in resolved:
            if not live.ended:
                self._guard(live, self._advance, live)
        if self.after_advance is not None:
            self.after_advance()
        self._launch_llm_work(self.plan(now), now)
        self.loop_seconds["relaunch_llm"] += self.clock() - now

    def plan(self, now: float) -> dict[str, list[Live]]:
        """Which requests' pending work runs this iteration (pure: reads the requests and the clock). One pass over
        the live requests sorts each one's pending work by kind."""
        cfg = self.config
        llm_busy, decode_free = self._prefill is not None, self._decode is None
        vocode, tts, llm_rows, prefills, buffered, urgent = [], [], [], [], {}, set()
        rider_ready = False  # a prompt that can ride along with a decode step is ready
        for r in self.live:
            b = buffered[r] = r.buffered_s(now)
            if r.first_audio_at is not None and b < cfg.underrun_reserve_s:
                urgent.add(r)  # about to underrun
            if b > cfg.ahead_limit_s:  # far ahead: it waits
                continue
            speech, reply_llm = r.speech, r.llm
            speech_wants = None if speech.ready or speech.done else type(speech.item)
            llm_wants = None if reply_llm is None or reply_llm.ready or reply_llm.done else type(reply_llm.item)
            if speech_wants is Vocode:
                vocode.append(r)
            elif speech_wants is TTSCall and r.call.wants_step:
                tts.append(r)
            side = r.prefill_side()
            if side is reply_llm and side is not None:
                # an LLM prompt waits while its request's LLM work runs; one that can ride along with a decode step
                # waits for the next step (queued behind the one in flight anyway), others for the prefill in flight.
                # Length is judged before the shared system prompt's ids are taken off: a first turn's rarely rides
                rides = can_ride(len(r.llm.item.ids))
                if not (r.llm_inflight or (rides and not decode_free) or (llm_busy and not rides)):
                    prefills.append(r)
                    rider_ready |= rides
            elif side is not None:
                prefills.append(r)
            if llm_wants is LLMDecode and len(reply_llm.item.ids) == 1 and decode_free and not r.llm_inflight:
                llm_rows.append(r)
        # a vocoder batch of eight windows costs about what one costs: windows of streams with audio to spare wait
        # for more (while TTS steps run), one that a first audio or a low buffer needs goes now
        if tts and vocode and now - self._last_vocode_at < cfg.vocoder_gather_s and len(vocode) < \
                cfg.vocoder_gather_rows and all(buffered[r] >= cfg.low_buffer_s for r in vocode):
            vocode = []
        # a decode step costs about as much for one row as for many: run it when a stream's audio waits on text (its
        # first audio, or a buffer running low) or will soon (audio out, little buffered: the next TTS call's text
        # must be there before the buffer runs dry, or a prompt can ride along), else let look-ahead rows gather for
        # a few iterations; rows of a stream in its first TTS call join the steps that run
        needed = any(buffered[r] < cfg.low_buffer_s and (r.llm_waited_for or r.first_audio_at is not None)
                     for r in llm_rows)
        gather = bool(tts or vocode)  # rows wait to gather only while there is other work to do
        gathered = now - self._last_decode_at >= cfg.llm_gather_s
        llm = llm_rows if needed or rider_ready or (llm_rows and (gathered or not gather)) else []
        prefills.sort(key=lambda r: (r not in urgent, r.first_audio_at is not None, buffered[r], r.order))
        if urgent:  # TTS prefills on the loop's stream delay the step of a stream about to run dry: one batch of
            # short text prefills (as costly for a few rows as for one), one longer text (a read-aloud part's, run
            # alone) and one audio prefill at most; the LLM's prefills run on its own stream and are not held back
            texts = [r for r in prefills if r.speech.waiting_on(TTSPrefillText)]
            short = [r for r in texts if len(r.speech.item.ids) <= PREFILL_WIDTH][:cfg.urgent_text_prefills]
            long = [r for r in texts if len(r.speech.item.ids) > PREFILL_WIDTH][:1]
            audio = [r for r in prefills if r.speech.waiting_on(TTSPrefillAudio)][:1]
            kept = {*short, *long, *audio}
            prefills = [r for r in prefills if r in kept or r.prefill_side() is not r.speech]
        return {"vocode": vocode, "tts": tts, "llm": llm, "prefill": prefills}

    def stats(self, now: float) -> dict[str, dict[str, float]]:
        """Queue depths by kind of work, the buffered audio of the streams that have audio, the loop's host time by
        part of the iteration and the prompts that rode along with decode steps (for /metrics)."""
        kinds = {"tts_step": TTSCall, "vocoder": Vocode, "tts_prefill": (TTSPrefillText, TTSPrefillAudio)}
        waiting = {name: sum(r.speech.waiting_on(kind) for r in self.live) for name, kind in kinds.items()}
        waiting["llm"] = sum(r.llm is not None and r.llm.waiting_on((LLMDecode, LLMPrefill)) for r in self.live)
        waiting["text"] = sum(r.llm_waited_for for r in self.live)
        buffered = [r.buffered_s(now) for r in self.live if r.first_audio_at is not None]
        stats = {"waiting": waiting, "loop_s": dict(self.loop_seconds), "iterations": self.iterations,
                 "prompts_riding": self.prompts_riding}
        if not buffered:
            return stats | {"buffered_s": {"min": 0.0, "mean": 0.0}}
        return stats | {"buffered_s": {"min": min(buffered), "mean": sum(buffered) / len(buffered)}}

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
                    live.mark("text", self.clock())
                    live.chunks.append(llm.item)
                    llm.resolve(None)
                moved = True
            if not moved:
                return

    def _llm_may_run(self, live: Live) -> bool:
        """The LLM makes a chunk when the speech waits for one, or runs ahead of it up to the limit: during the first
        TTS call too, so the second call's text is there before the first chunk has played."""
        return live.llm_waited_for or len(live.chunks) < live.lookahead

    def _handle_speech(self, live: Live, item: object) -> None:
        if isinstance(item, Piece):
            self._deliver(live, item)
            live.speech.resolve(None)
        elif isinstance(item, ProjectSpeaker):
            live.speech.resolve(self.tts.project_speaker(item.hidden))
        elif isinstance(item, TTSCall):
            live.call = CallInProgress(item, live.tts_counter)
        elif isinstance(item, NewSegment):
            if live.tts_slot is not None:
                self.tts.slots.release(live.tts_slot)
            live.tts_slot = self.tts.slots.acquire(active=True)
            assert live.tts_slot is not None, "admission keeps a TTS row for every live request"
            self.tts.clear_condition_slots(live.tts_slot.row)
            live.speech.resolve(None)

    def _deliver(self, live: Live, piece: Piece) -> None:
        if len(piece.pcm) and live.first_audio_at is None:
            now = self.clock()
            live.mark("audio", now)
            live.first_audio_at = now
        live.audio_s += len(piece.pcm) / SAMPLE_RATE
        live.emit(piece)

    def _guard(self, live: Live, fn: Callable, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # one request's failure ends that request only
            self.finish(live, exc)

    # ---- running batches ----------------------------------------------------------------------------------------
    def _launch(self, stage: str, lives: list[Live], run: Callable[[], object], part: str = "",
                calls: list[CallInProgress] | None = None) -> Launched | None:
        """Starts a batch (`run` returns a Pending result); a failure ends the requests that took part. Its host
        time is booked to `part` of the loop, if given."""
        t0 = self.clock()
        try:
            return Launched(stage, lives, run(), t0, calls)
        except Exception as exc:
            for live in lives:
                self.finish(live, exc)
            return None
        finally:
            if part:
                self.loop_seconds[part] += self.clock() - t0

    def _collect(self, launched: Launched | None) -> list:
        """Waits for a launched batch's results; books its time to its requests and its size to the observer."""
        if launched is None:
            return []
        t0 = self.clock()
        try:
            out = launched.pending.get()
        except Exception as exc:
            for live in launched.lives:
                self.finish(live, exc)
            return []
        now = self.clock()
        if isinstance(launched.pending, Pending):
            self.loop_seconds["wait_" + launched.stage] += now - t0
        # prompts that rode along with a decode step (the last `riders` requests) count as a prefill
        steppers = len(launched.lives) - launched.riders
        for i, live in enumerate(launched.lives):  # a request's batches of one stage may overlap (TTS steps):
            stage = launched.stage if i < steppers else "prefill"  # their union counts
            start = max(launched.t0, live.stage_busy_until.get(stage, launched.t0))
            live.metrics.stages[stage] = live.metrics.stages.get(stage, 0.0) + now - start
            live.stage_busy_until[stage] = now
        if launched.riders and not self.llm.one_row_at_a_time:  # the reference path runs them after the step
            self.prompts_riding += launched.riders
        if self.on_batch is not None:
            self.on_batch("vocoder" if launched.stage == "audio" else launched.stage, steppers)
            if launched.riders:
                self.on_batch("prefill", launched.riders)
        return out

    def _run(self, stage: str, lives: list[Live], run: Callable[[], list], part: str = "") -> list:
        """A batch run to its end at once (on the loop's stream); its time is booked to `part` of the loop."""
        t0 = self.clock()
        out = self._collect(self._launch(stage, lives, lambda: Ready(run())))
        self.loop_seconds[part or stage] += self.clock() - t0
        return out

    def _launch_vocoder(self, lives: list[Live]) -> Launched | None:
        """Audio windows, launched ahead of the TTS step (on the vocoder's stream); the PCM is taken after it."""
        if not lives:
            return None
        self._last_vocode_at = self.clock()
        return self._launch("audio", lives, lambda: self.vocoder.decode([r.speech.item.codes for r in lives]),
                            "audio")

    def _resolve_vocoder(self, launched: Launched | None) -> None:
        t0 = self.clock()
        for live, pcm in zip(launched.lives if launched else (), self._collect(launched), strict=False):
            live.speech.resolve(pcm)
        self.loop_seconds["audio"] += self.clock() - t0

    def _launch_tts(self, lives: list[Live]) -> Launched | None:
        """The next step of each of `lives`' TTS calls, on the loop's stream; its codes are taken by `_resolve_tts`
        in the next iteration. A call's later steps feed on the codes its last step drew, on the device."""
        if not lives:
            return None
        rows, calls, now = [], [], self.clock()
        for live in lives:
            live.mark("speaking", now)
            if live.tts_sampling is None:
                s = live.sampling
                live.tts_sampling = TTSSampling(tuple(s.tts_temperature), s.tts_top_p, s.tts_top_k, s.greedy,
                                                live.tts_seed)
            call = live.call
            work, i = call.work, call.launched
            rows.append(TTSRow(live.tts_slot.row, work.position + i, work.prev_codes, work.num_text_tokens,
                               work.ban_eos[i], work.force_eos[i], live.tts_sampling, call.counter + i,
                               prev_drawn=i > 0))
            call.launched += 1
            calls.append(call)
        return self._launch("tts", lives, lambda: self.tts.step(rows), "tts", calls)

    def _resolve_tts(self, launched: Launched | None) -> None:
        """Hands each call its step's codes; a call that drew EOS or its last step gives the request its result (a
        step launched after an EOS is dropped)."""
        if launched is None:
            return
        t0 = self.clock()
        for live, call, (codes, eos) in zip(launched.lives, launched.calls, self._collect(launched), strict=False):
            if live.ended or call.over:
                continue
            if not eos:
                call.codes.append(codes)
            if eos or len(call.codes) == call.work.steps:
                call.over = True
                live.tts_counter = call.counter + len(call.codes) + eos
                live.speech.resolve(TTSCallResult(call.codes, eos))
        self.loop_seconds["tts"] += self.clock() - t0

    def _await_speech(self, *launched: Launched | None) -> None:
        """Waits for the speech batches in flight; LLM work that finishes meanwhile hands its results over and the
        LLM's next work is launched at once. It is queued behind the TTS step (the LLM's stream waits for the work
        queued on this one) but starts as soon as the step ends, not when the iteration does."""
        pending = [x.pending for x in launched if x is not None]
        t0 = self.clock()
        while not all(p.ready() for p in pending):
            if self._llm_ready():
                self.loop_seconds["await_speech"] += self.clock() - t0
                self._relaunch_llm()
                t0 = self.clock()
            else:
                time.sleep(SPIN_S)
        self.loop_seconds["await_speech"] += self.clock() - t0

    def _llm_ready(self) -> bool:
        return any(x is not None and x.pending.ready() for x in (self._decode, self._prefill))

    def _llm_sampling(self, live: Live) -> LLMSampling:
        s = live.sampling
        sampling = LLMSampling(s.temperature, s.top_k, s.top_p, s.repetition_penalty, s.greedy, live.llm_seed,
                               live.llm_counter)
        live.llm_counter += 1
        return sampling

    def _launch_llm(self, lives: list[Live], riders: list[Live]) -> Launched | None:
        """A decode step for `lives`, with the prompts of `riders` in the same forward."""
        prompts, taking = self._prompt_rows(riders)
        rows, now = [], self.clock()
        for live in lives:
            live.mark("decoding", now)
            w = live.llm.item
            rows.append(LLMRow(live.session.slot.row, w.ids[0], live.session.length, w.window,
                               self._llm_sampling(live)))
            live.session.length += 1
            live.llm_inflight = True
        launched = self._launch("llm", lives + taking, lambda: self.llm.decode(rows, prompts), "launch_llm")
        if launched is not None:
            launched.riders = len(taking)
        return launched

    def _launch_llm_prefills(self, lives: list[Live]) -> Launched | None:
        """The LLM prompt prefills and reply headers of `lives` (in priority order) as one batch, within the token
        budget; the rest wait for a later iteration."""
        rows, taking = self._prompt_rows(lives, self.config.prefill_token_budget)
        if not rows:
            return None
        return self._launch("prefill", taking, lambda: self.llm.prefill(rows), "launch_prefill")

    def _prompt_rows(self, lives: list[Live], budget: int | None = None) -> tuple[list[PrefillRow], list[Live]]:
        """The prefill rows of `lives`' pending LLM prompts (in order, within `budget` tokens if given) and the
        requests they belong to. A prompt wholly covered by the shared system prompt takes its cache and is
        done at once."""
        rows, taking = [], []
        for live in lives:
            item, session = live.llm.item, live.session
            covered = self.prefix.covers(item.ids) if isinstance(item, LLMPrefill) and session.length == 0 else 0
            ids = item.ids[covered:]
            if budget is not None and ids and rows and len(ids) > budget:
                break
            if covered:  # a new conversation starts from the shared system prompt's cache
                self.llm.copy_prefix(self.prefix.pool, session.slot.row, covered)
                session.length = covered
            if not ids:
                live.llm.resolve(None)
                continue
            if budget is not None:
                budget -= len(ids)
            if isinstance(item, LLMDecode):
                rows.append(PrefillRow(session.slot.row, session.length, ids, item.window, self._llm_sampling(live),
                                       item.hidden_at))
            else:
                rows.append(PrefillRow(session.slot.row, session.length, ids))
            session.length += len(ids)
            live.llm_inflight = True
            taking.append(live)
        return rows, taking

    def _resolve_llm(self, block: bool) -> list[Live]:
        """Hands the LLM's finished work to its requests (waiting for what is in flight if `block`); returns them."""
        done = []
        for name in ("_decode", "_prefill"):
            launched: Launched | None = getattr(self, name)
            if launched is None or not (block or launched.pending.ready()):
                continue
            setattr(self, name, None)
            done += launched.lives
            for live, out in zip(launched.lives, self._collect(launched), strict=False):
                live.llm_inflight = False
                if live.ended:
                    continue
                if isinstance(live.llm.item, LLMPrefill):
                    live.llm.resolve(None)
                else:
                    live.llm.resolve(out if isinstance(out, tuple) else (out, None))
        return done

    def _run_speech_prefills(self, lives: list[Live]) -> None:
        """TTS text prefills (batched) and segment-restart audio prefills (one at a time)."""
        texts = [r for r in lives if r.speech.waiting_on(TTSPrefillText)]
        if texts:
            items = [(r.tts_slot.row, r.speech.item.ids, r.speech.item.begin, r.speech.item.speaker) for r in texts]
            if self._run("tts", texts, lambda: [self.tts.prefill_text_rows(items)], "tts_prefill"):
                for live in texts:
                    live.speech.resolve(None)
        for live in lives:
            if live.speech.waiting_on(TTSPrefillAudio):
                row, item = live.tts_slot.row, live.speech.item
                run = partial(self.tts.prefill_audio, row, item.codes, item.num_text_tokens)
                if self._run("tts", [live], lambda run=run: [run()], "tts_prefill"):
                    live.speech.resolve(None)


@dataclass
class Launched:
    stage: str
    lives: list[Live]
    pending: Pending | Ready
    t0: float
    calls: list[CallInProgress] | None = None  # a TTS step's: the call each row's step belongs to
    riders: int = 0  # a decode step's: how many of `lives` (the last ones) are prompts riding along
