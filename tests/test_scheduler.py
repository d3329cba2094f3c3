"""The scheduler's priorities with a fake clock: which live requests' work runs in an iteration (`Scheduler.plan`).

Most tests build `Live` requests whose coroutines are parked on a chosen piece of work, so `plan(now)` (a pure
function of the requests and the clock) can be asked directly. The last tests drive a real request on the tiny
model, one loop iteration at a time on the test thread, with a clock the test moves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from omnivox.engine.engine import Engine
from omnivox.engine.graphs import Ready
from omnivox.engine.live import CallInProgress, Live, Side
from omnivox.engine.llm_executor import RIDING_PROMPT_TOKENS
from omnivox.engine.request import Piece
from omnivox.engine.scheduler import Launched, Scheduler, SchedulerConfig
from omnivox.engine.slots import SlotHandle
from omnivox.engine.types import SAMPLE_RATE, RequestMetrics, SamplingParams
from omnivox.engine.work import (
    NEXT_CHUNK,
    LLMDecode,
    LLMPrefill,
    TTSCall,
    TTSCallResult,
    TTSPrefillAudio,
    TTSPrefillText,
    Vocode,
)

CONFIG = SchedulerConfig()


def parked(item: object) -> Side:
    """A coroutine side waiting on `item` (its result not in yet)."""
    side = Side(iter(()))
    side.item, side.ready = item, False
    return side


def live(speech: object = NEXT_CHUNK, llm: object | None = None, *, buffered: float | None = None,
         now: float = 100.0, read_aloud: bool = False) -> Live:
    """A request whose speech waits on `speech` and whose LLM waits on `llm`; `buffered`: seconds of audio ahead of
    the listener at `now` (None: no audio yet)."""
    r = Live(reply=None, speech=parked(speech), llm=None if read_aloud else parked(llm), session=None,
             sampling=SamplingParams(), metrics=RequestMetrics(), llm_seed=0, tts_seed=1, emit=lambda item: None,
             lookahead=8)
    if isinstance(speech, TTSCall):
        r.call = CallInProgress(speech, counter=0)  # what the loop does when the request asks for a call
    if buffered is not None:
        r.first_audio_at, r.audio_s = now - 10.0, 10.0 + buffered
    return r


def scheduler(*lives: Live, _last_vocode_at: float | None = None, **config) -> Scheduler:
    s = Scheduler(None, None, None, None, SchedulerConfig(**config), clock=lambda: 0.0)
    s.live.extend(lives)
    if _last_vocode_at is not None:
        s._last_vocode_at = _last_vocode_at  # a vocoder batch was launched then
    return s


def tts_step() -> TTSCall:
    return TTSCall(position=310, prev_codes=(0, 0, 0, 0), num_text_tokens=20, ban_eos=(False,) * 25,
                   force_eos=(False,) * 25)


def prefill_text() -> TTSPrefillText:
    return TTSPrefillText([1, 2, 3], 12)


def decode_one() -> LLMDecode:
    return LLMDecode([5], [5])


# ---- the playback clock -----------------------------------------------------------------------------------------
def test_buffered_audio_is_first_audio_time_plus_audio_minus_now():
    r = live()
    assert r.buffered_s(5.0) == 0.0, "no audio yet: nothing buffered"
    r.first_audio_at, r.audio_s = 10.0, 3.0
    assert r.buffered_s(10.0) == pytest.approx(3.0)
    assert r.buffered_s(11.5) == pytest.approx(1.5)
    assert r.buffered_s(14.0) == pytest.approx(-1.0), "past its audio: the listener has run dry (negative)"


def test_delivery_starts_the_clock_and_adds_each_piece():
    now = [7.0]
    emitted = []
    s = Scheduler(None, None, None, None, CONFIG, clock=lambda: now[0])
    r = live()
    r.emit = emitted.append
    s._deliver(r, Piece(np.zeros(0, np.float32), "text only"))
    assert r.first_audio_at is None, "a piece without samples does not start the playback clock"
    s._deliver(r, Piece(np.zeros(SAMPLE_RATE, np.float32), "one second"))
    now[0] = 7.25
    s._deliver(r, Piece(np.zeros(SAMPLE_RATE // 2, np.float32), "half"))
    assert r.first_audio_at == 7.0 and r.audio_s == pytest.approx(1.5)
    assert r.buffered_s(7.25) == pytest.approx(1.25)
    assert [p.text for p in emitted] == ["text only", "one second", "half"]


# ---- prefill order ------------------------------------------------------------------------------------------------
def test_new_stream_prefills_before_filler_prefills():
    fillers = [live(prefill_text(), buffered=b) for b in (2.0, 5.0)]
    filler_llm = live(llm=LLMPrefill([1, 2, 3]), buffered=1.0)
    new = live(llm=LLMPrefill([4, 5, 6]))  # arrived last, no audio yet
    new_tts = live(prefill_text())
    plan = scheduler(*fillers, filler_llm, new, new_tts).plan(100.0)
    assert plan["prefill"][:2] == [new, new_tts], "streams without audio first, in arrival order"
    assert plan["prefill"][2:] == [filler_llm, fillers[0], fillers[1]], "then the least buffered"


def test_header_decode_counts_as_a_prefill_and_single_tokens_as_decode():
    header = live(llm=LLMDecode([1, 2, 3, 4], [1, 2, 3, 4], hidden_at=2))
    plan = scheduler(header).plan(100.0)
    assert plan["prefill"] == [header] and plan["llm"] == []


def test_streams_ordered_by_least_buffered():
    lives = [live(TTSPrefillAudio(np.zeros((50, 4), np.int64), 5), buffered=b) for b in (3.0, 0.9, 2.0, 1.2)]
    plan = scheduler(*lives).plan(100.0)
    assert [r.buffered_s(100.0) for r in plan["prefill"]] == pytest.approx([0.9, 1.2, 2.0, 3.0])


def test_about_to_underrun_holds_tts_prefills_to_one_batch_of_text_and_one_audio_prefill():
    fillers = [live(prefill_text(), buffered=b) for b in (2.0, 4.0, 6.0)]
    restarts = [live(TTSPrefillAudio(np.zeros((50, 4), np.int64), 5), buffered=b) for b in (1.5, 3.0)]
    dry = live(prefill_text(), buffered=CONFIG.underrun_reserve_s / 2)
    stepping = [live(tts_step(), buffered=b) for b in (0.0, 1.0)]
    s = scheduler(*fillers, *restarts, dry, *stepping, urgent_text_prefills=3)
    plan = s.plan(100.0)
    assert plan["prefill"] == [dry, restarts[0], fillers[0], fillers[1]], \
        "the stream about to run dry first; three text prefills (one batch) and one audio prefill, least buffered first"
    assert plan["tts"] == stepping, "TTS steps are not held back"
    # a text longer than a batched prefill's rows (a read-aloud part's) runs alone: one of those at most
    parts = [live(TTSPrefillText(list(range(40)), 0), buffered=b) for b in (0.5, 0.6)]
    plan = scheduler(*fillers, *parts, dry, urgent_text_prefills=3).plan(100.0)
    assert plan["prefill"] == [dry, parts[0], fillers[0], fillers[1]]
    # a prompt prefill runs on the LLM's own stream, beside the TTS step: new streams are not held back
    prompts = [live(NEXT_CHUNK, LLMPrefill([1, 2, 3])) for _ in range(2)]
    plan = scheduler(*fillers, dry, *prompts, *stepping, urgent_text_prefills=1).plan(100.0)
    assert plan["prefill"] == [dry, *prompts], "the dry stream's text prefill, then every prompt prefill"
    # once the clock moves on, a stream that has already run dry also holds prefills back
    s2 = scheduler(*fillers, live(tts_step(), buffered=CONFIG.underrun_reserve_s + 0.1), urgent_text_prefills=2)
    assert len(s2.plan(100.0)["prefill"]) == 3
    assert len(s2.plan(100.2)["prefill"]) == 2


def test_a_stream_far_ahead_is_left_out_of_every_kind_of_work():
    ahead = CONFIG.ahead_limit_s + 1.0
    kinds = {
        "vocode": lambda b: live(Vocode(np.zeros((29, 4), np.int64)), buffered=b),
        "tts": lambda b: live(tts_step(), buffered=b),
        "prefill": lambda b: live(prefill_text(), buffered=b),
        "llm": lambda b: live(NEXT_CHUNK, decode_one(), buffered=b),
    }
    for kind, make in kinds.items():
        # the LLM case's stream waits on text with less than low_buffer_s buffered, so its step is needed
        far, near = make(ahead), make(CONFIG.low_buffer_s / 2 if kind == "llm" else 5.0)
        plan = scheduler(far, near).plan(100.0)
        assert plan[kind] == [near], f"{kind}: the stream {ahead} s ahead waits"
        later = ahead - CONFIG.ahead_limit_s + 0.5
        assert far in scheduler(far, near).plan(100.0 + later)[kind], f"{kind}: it runs again once played down"


# ---- LLM decode -------------------------------------------------------------------------------------------------
def test_llm_decode_runs_when_a_stream_waits_for_text():
    low = CONFIG.low_buffer_s / 2
    waiting = live(NEXT_CHUNK, decode_one(), buffered=low)  # speech stalled on the next chunk, little audio left
    lookahead = live(tts_step(), decode_one(), buffered=low)  # LLM running ahead of its speech
    plan = scheduler(waiting, lookahead).plan(100.0)
    assert plan["llm"] == [waiting, lookahead], "every pending decode row rides along with the needed one"
    first = live(NEXT_CHUNK, decode_one())  # no audio yet: its first audio waits on text
    assert scheduler(first).plan(100.0)["llm"] == [first]
    waiting.chunks.append(object())  # a chunk is already there: the speech is not stalled on the LLM, but with
    assert just_decoded(scheduler(waiting)).plan(100.0)["llm"] == [waiting], "little buffered it needs text soon"
    young = live(tts_step(), decode_one())  # in its first TTS call, no audio yet: its look-ahead rides along only
    assert just_decoded(scheduler(young)).plan(100.0)["llm"] == []
    assert just_decoded(scheduler(young, waiting)).plan(100.0)["llm"] == [young, waiting]
    # stalled, but with plenty of audio buffered: while other work runs, the step waits for more rows (or the
    # gathering time); with nothing else to run it goes at once
    relaxed = live(NEXT_CHUNK, decode_one(), buffered=CONFIG.low_buffer_s + 1.0)
    stepping = live(tts_step(), buffered=2.0)
    assert just_decoded(scheduler(relaxed, stepping)).plan(100.0)["llm"] == []
    assert just_decoded(scheduler(relaxed)).plan(100.0)["llm"] == [relaxed]
    assert scheduler(relaxed, stepping).plan(100.0)["llm"] == [relaxed], "gathered long enough since the last step"


def just_decoded(s: Scheduler, now: float = 100.0) -> Scheduler:
    s._last_decode_at = now  # a decode step was launched at `now`
    return s


def test_llm_look_ahead_rows_gather_between_decode_steps():
    ahead = [live(tts_step(), decode_one(), buffered=CONFIG.low_buffer_s + 1.0) for _ in range(2)]
    s = scheduler(*ahead)
    runs = []
    tick = 1 / 32  # iterations about 31 ms apart (a binary fraction: exact times)
    period = math.ceil(CONFIG.llm_gather_s / tick)
    for i in range(3 * period):
        now = 100.0 + tick * i
        plan = s.plan(now)
        runs.append(bool(plan["llm"]))
        if plan["llm"]:
            s._last_decode_at = now  # what launching the step does
    assert runs == ([True] + [False] * (period - 1)) * 3
    s._decode = object()  # a step in flight: no second one until its tokens are in
    assert s.plan(200.0)["llm"] == []


def test_a_short_prompt_rides_along_with_the_next_decode_step():
    """A turn's prompt and reply header of up to RIDING_PROMPT_TOKENS ids run inside a decode step: one is launched
    for it at once (gathering rows ride too), and while a step is in flight the prompt waits for the next one, which
    it would have queued behind anyway. A longer prompt runs as a prefill of its own, also while a step runs."""
    ahead = live(tts_step(), decode_one(), buffered=CONFIG.low_buffer_s + 1.0)
    header = live(llm=LLMDecode(list(range(RIDING_PROMPT_TOKENS)), [1], hidden_at=2))
    assert just_decoded(scheduler(ahead)).plan(100.0)["llm"] == [], "gathering: no step yet"
    s = just_decoded(scheduler(ahead, header))
    plan = s.plan(100.0)
    assert plan["llm"] == [ahead] and plan["prefill"] == [header], "a step for the prompt to ride along with"
    s._decode = object()  # a step in flight
    assert s.plan(100.0)["prefill"] == [], "the prompt waits for the next step"
    long = live(llm=LLMDecode(list(range(RIDING_PROMPT_TOKENS + 1)), [1], hidden_at=2))
    s = just_decoded(scheduler(ahead, long))
    assert s.plan(100.0)["llm"] == [], "a prompt that cannot ride starts no step"
    s._decode = object()
    assert s.plan(100.0)["prefill"] == [long], "and does not wait for the step in flight"


# ---- vocoder windows ---------------------------------------------------------------------------------------------
def window() -> Vocode:
    return Vocode(np.zeros((29, 4), np.int64))


def test_vocoder_windows_of_streams_with_audio_to_spare_gather():
    spare = [live(window(), buffered=CONFIG.low_buffer_s + 1.0) for _ in range(2)]
    stepping = live(tts_step(), buffered=2.0)
    s = scheduler(*spare, stepping, _last_vocode_at=100.0)  # a vocoder batch was launched at 100.0
    assert s.plan(100.0)["vocode"] == [], "they wait for more windows while TTS steps run"
    assert s.plan(100.0 + 1.01 * CONFIG.vocoder_gather_s)["vocode"] == spare, "... for vocoder_gather_s at most"
    full = [live(window(), buffered=5.0) for _ in range(CONFIG.vocoder_gather_rows)]
    assert scheduler(*full, stepping, _last_vocode_at=100.0).plan(100.0)["vocode"] == full, "or until enough wait"
    assert scheduler(*spare, _last_vocode_at=100.0).plan(100.0)["vocode"] == spare, "nothing else to run: at once"
    for needy in (live(window()), live(window(), buffered=CONFIG.low_buffer_s / 2)):  # first audio; low buffer
        plan = scheduler(*spare, needy, stepping, _last_vocode_at=100.0).plan(100.0)
        assert plan["vocode"] == [*spare, needy], "a window that a listener waits for takes the others along"


class Polled:
    """A device result that is ready after `polls` looks."""

    def __init__(self, polls: int):
        self.polls = polls

    def ready(self) -> bool:
        self.polls -= 1
        return self.polls < 0


def test_finished_llm_work_is_relaunched_while_the_tts_step_runs(monkeypatch):
    s = scheduler()
    tts, audio = Launched("tts", [], Polled(3), 0.0), Launched("audio", [], Polled(1), 0.0)
    s._decode = Launched("llm", [], Polled(1), 0.0)  # its tokens are in after the first look
    relaunched = []

    def relaunch():
        relaunched.append(tts.pending.polls)
        s._decode = None  # what taking its results does

    monkeypatch.setattr(s, "_relaunch_llm", relaunch)
    s._await_speech(tts, audio)
    assert relaunched == [1], "taken and relaunched once, while the TTS step was still running"
    assert tts.pending.ready() and audio.pending.ready()


class StepRecorder:
    """A TTS executor stand-in: records each step's rows and answers with the codes the test queues."""

    def __init__(self):
        self.launched: list[list] = []
        self.answers: list[list] = []

    def step(self, rows):
        self.launched.append(rows)
        return Ready(self.answers.pop(0))


def test_a_call_steps_ahead_of_its_codes_and_a_step_after_eos_is_dropped():
    call = TTSCall(position=320, prev_codes=(7, 7, 7, 7), num_text_tokens=20, ban_eos=(True,) * 10 + (False,) * 15,
                   force_eos=(False,) * 25)
    r = live(call, buffered=2.0)
    r.tts_slot, r.tts_counter = SlotHandle(3), 40
    r.call = CallInProgress(call, counter=r.tts_counter)
    s = scheduler(r)
    s.tts = StepRecorder()
    s.tts.answers = [[((1, 1, 1, 1), False)], [((2, 2, 2, 2), True)], [((3, 3, 3, 3), False)]]
    first = s._launch_tts(s.plan(100.0)["tts"])
    second = s._launch_tts(s.plan(100.0)["tts"])  # launched before the first step's codes are read
    rows = [step[0] for step in s.tts.launched]
    assert [(x.position, x.counter, x.prev_drawn) for x in rows] == [(320, 40, False), (321, 41, True)]
    assert rows[0].prev_codes == (7, 7, 7, 7) and rows[0].ban_eos and not rows[0].force_eos
    s._resolve_tts(first)
    assert not r.speech.ready and r.call.codes == [(1, 1, 1, 1)], "mid-call: the request is not resumed"
    third = s._launch_tts(s.plan(100.0)["tts"])  # the EOS of step 2 is not known yet: step 3 goes too
    s._resolve_tts(second)
    assert r.speech.ready and r.speech.result == TTSCallResult([(1, 1, 1, 1)], eos=True)
    assert r.tts_counter == 42, "the EOS step counts, the step after it does not"
    assert s.plan(100.0)["tts"] == [], "a call that is over asks for no more steps"
    s._resolve_tts(third)
    assert r.speech.result.codes == [(1, 1, 1, 1)] and r.tts_counter == 42, "the step after EOS is dropped"


def test_a_call_asks_for_its_steps_only():
    call = TTSCall(position=310, prev_codes=None, num_text_tokens=20, ban_eos=(True,) * 3, force_eos=(False,) * 3)
    r = live(call, buffered=2.0)
    r.tts_slot = SlotHandle(0)
    s = scheduler(r)
    s.tts = StepRecorder()
    s.tts.answers = [[((i, i, i, i), False)] for i in range(3)]
    launched = [s._launch_tts(s.plan(100.0)["tts"]) for _ in range(4)]
    assert launched[3] is None and len(s.tts.launched) == 3, "three steps, then none until the codes are in"
    assert s.tts.launched[0][0].prev_codes is None and not s.tts.launched[0][0].prev_drawn, "[Ptts] first"
    for step in launched[:3]:
        s._resolve_tts(step)
    assert r.speech.result == TTSCallResult([(0,) * 4, (1,) * 4, (2,) * 4], eos=False) and r.tts_counter == 3


def test_read_aloud_has_no_llm_work():
    r = live(prefill_text(), read_aloud=True)
    plan = scheduler(r).plan(100.0)
    assert plan["prefill"] == [r] and plan["llm"] == []


# ---- a real request on the tiny model, driven one iteration at a time --------------------------------------------
class Driven:
    """An engine whose loop the test runs: commands and iterations on the test thread, with a clock it sets."""

    def __init__(self, model, monkeypatch, **config):
        self.now = 0.0
        self.engine = Engine(model, clock=lambda: self.now)
        self.engine.scheduler.config = SchedulerConfig(**config)
        self.commands = []
        monkeypatch.setattr(self.engine, "_submit", self.commands.append)

    def iterate(self, n: int = 1) -> None:
        with self.engine.on_device():
            for _ in range(n):
                for command in self.commands:
                    command()
                self.commands.clear()
                self.engine.scheduler.step()


def test_a_stream_ahead_of_its_listener_waits_for_the_clock(model, monkeypatch):
    loop = Driven(model, monkeypatch, ahead_limit_s=0.3)
    stream = loop.engine.stream("Hi", seed=0, forced_reply="Hello there, friend.", forced_audio_seconds=1.5)
    live_ = None
    for _ in range(400):
        loop.iterate()
        live_ = stream.live
        if live_.audio_s > 0.3:
            break
    delivered = live_.audio_s
    assert 0.3 < delivered < 1.0, "the clock stands still: audio stops soon after the limit"
    steps = live_.tts_counter
    loop.iterate(20)
    assert live_.audio_s == delivered and live_.tts_counter == steps, "far ahead: no work at all for it"
    loop.now += 60.0  # the listener catches up (and more): it runs to its end
    for _ in range(2000):
        if stream.done:
            break
        loop.iterate()
    chunks = list(stream)
    assert chunks[-1].is_last
    assert sum(len(c.pcm) for c in chunks) == round(1.5 * 46.875) * 512
    assert loop.engine.scheduler.live == [] and loop.engine.stats()["tts_rows_used"] == 0


def test_a_new_stream_gets_its_first_audio_while_an_older_one_is_paused(model, monkeypatch):
    loop = Driven(model, monkeypatch, ahead_limit_s=0.3)
    old = loop.engine.stream("Hi", seed=0, forced_reply="Hello there, friend.", forced_audio_seconds=1.5)
    for _ in range(400):
        loop.iterate()
        if old.live.audio_s > 0.3:
            break
    paused_at = old.live.audio_s
    new = loop.engine.stream("Again", seed=1, forced_reply="Hi.", forced_audio_seconds=0.5)
    for _ in range(400):
        loop.iterate()
        if new.live is not None and new.live.first_audio_at is not None:
            break
    assert new.live.first_audio_at is not None, "the new stream's first audio comes while the old one waits"
    assert old.live.audio_s == paused_at
    new.close()
    old.close()
    loop.iterate(2)
    assert loop.engine.scheduler.live == [] and loop.engine.stats()["tts_rows_used"] == 0
    assert loop.engine.stats()["llm_rows_used"] == 0


def test_an_iteration_with_a_live_request_never_reports_idle(model, monkeypatch):
    """`step()` returning False lets the loop sleep (up to 0.1 s) until new work comes: it must not do so while a
    request can move, e.g. after a prompt wholly covered by the shared prefix is resolved without a launch."""
    loop = Driven(model, monkeypatch)
    stream = loop.engine.stream("Hi", seed=0, forced_reply="Hello there.", forced_audio_seconds=0.5)
    idle_with_work = 0
    with loop.engine.on_device():
        for command in loop.commands:
            command()
        for _ in range(2000):
            if stream.done:
                break
            idle_with_work += not loop.engine.scheduler.step() and bool(loop.engine.scheduler.live)
    assert stream.done and list(stream)[-1].is_last
    assert idle_with_work == 0
