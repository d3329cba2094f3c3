"""A request as the engine loop holds it: its reply's two coroutine sides, its rows, random keys and playback clock.

The scheduler (omnivox/engine/scheduler.py) reads these to plan an iteration and resolves their sides with the
results of the batches it runs.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from omnivox.engine.request import LLMChunk, Reply
from omnivox.engine.session import Session
from omnivox.engine.slots import SlotHandle
from omnivox.engine.tts_executor import TTSSampling
from omnivox.engine.types import RequestMetrics, SamplingParams
from omnivox.engine.work import NEXT_CHUNK, LLMDecode, LLMPrefill, TTSCall, TTSPrefillAudio, TTSPrefillText

SPEECH_PREFILLS = (TTSPrefillText, TTSPrefillAudio)


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
class CallInProgress:
    """A TTS call the loop is stepping. Its steps are launched one per iteration, each before the codes of the one
    before it are read (they feed it on the device), so up to one step more than the call needs may run: after an
    EOS, whose codes are dropped."""

    work: TTSCall
    counter: int  # the request's TTS step counter at the call's first step (step i uses counter + i)
    launched: int = 0
    codes: list[tuple[int, ...]] = field(default_factory=list)
    over: bool = False  # EOS or the last step came back: the result went to the request
    steps: int = field(init=False)

    def __post_init__(self) -> None:
        self.steps = self.work.steps  # read for every row of every step: a field, not a property

    @property
    def wants_step(self) -> bool:
        return not self.over and self.launched < self.steps


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
    tts_counter: int = 0  # TTS steps whose codes the request took (with the seed, the key of the next one)
    call: CallInProgress | None = None  # the TTS call being stepped
    tts_sampling: TTSSampling | None = None  # made at its first TTS step
    tts_slot: SlotHandle | None = None
    chunks: deque[LLMChunk] = field(default_factory=deque)
    first_audio_at: float | None = None
    started_at: float = 0.0  # the request's start, on the loop's clock (its first-audio milestones count from it)
    audio_s: float = 0.0
    cancelled: bool = False
    llm_inflight: bool = False  # its LLM work was launched and its result is not in yet
    ended: bool = False  # finished: no longer in the loop (results still in flight for it are dropped)
    order: int = field(default_factory=itertools.count().__next__)
    stage_busy_until: dict[str, float] = field(default_factory=dict)  # where its stage time was booked up to

    def mark(self, milestone: str, now: float) -> None:
        """The first time the request reaches `milestone` on its way to first audio (FIRST_AUDIO_MILESTONES)."""
        if self.first_audio_at is None:
            self.metrics.first_audio_milestones.setdefault(milestone, now - self.started_at)

    def buffered_s(self, now: float) -> float:
        """Audio delivered but not yet played by a realtime listener (0 before the first audio)."""
        return 0.0 if self.first_audio_at is None else self.first_audio_at + self.audio_s - now

    @property
    def llm_waited_for(self) -> bool:
        """The speech is stalled on the next LLM chunk."""
        return self.speech.item is NEXT_CHUNK and not self.speech.ready and not self.chunks

    def prefill_side(self) -> Side | None:
        """The side whose pending work is prefill-like (a TTS text or audio prefill, an LLM prompt or reply header:
        several tokens at once), if any."""
        speech, llm = self.speech, self.llm  # asked of every live request in every plan: types compared directly
        if not speech.ready and not speech.done and type(speech.item) in SPEECH_PREFILLS:
            return speech
        if llm is not None and not llm.ready and not llm.done:
            kind = type(llm.item)
            if kind is LLMPrefill or (kind is LLMDecode and len(llm.item.ids) > 1):
                return llm
        return None

    @property
    def may_move(self) -> bool:
        """Advancing its coroutines could move it: a side has a result to take, or the speech waits on the LLM's
        next chunk (which may be made already). Otherwise both wait on device work and advancing does nothing."""
        speech, llm = self.speech, self.llm
        return speech.ready or speech.item is NEXT_CHUNK or (llm is not None and llm.ready)
