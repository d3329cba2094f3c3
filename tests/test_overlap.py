"""Overlap (engine/overlap.py): the LLM running ahead of the TTS must not change a single output.

On a CPU nothing runs asynchronously, so the tests make TTS calls look busy for a few polls (`SlowTTS`): the
pipeline then produces LLM chunks ahead while "waiting", exactly as it does on a GPU while a call computes. Against
the same engine without lookahead: same reply, codes, waveform, token counts and session state, also when the
speech ends before the LLM does (the chunks made ahead are taken back) and in the turn after.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine, EngineConfig
from omnivox.engine.fast_runner import FastRunner
from omnivox.engine.overlap import Lookahead, Ready
from omnivox.engine.types import SamplingParams
from omnivox.errors import InvalidRequest
from omnivox.models.loader import build_dummy_model

REPLY = "Glad to hear that. Is there anything on your mind that you would like to talk about today?"
LONG_REPLY = " ".join(f"This is sentence number {i} of a long answer that keeps going for a while." for i in range(8))


class BusyFor:
    """A finished result that claims to be running for its first `polls` polls."""

    def __init__(self, pending, polls: int):
        self.pending, self.polls = pending, polls
        self.seconds = 0.0

    def running(self) -> bool:
        self.polls -= 1
        return self.polls >= 0

    def wait(self):
        value = self.pending.wait()
        self.seconds = self.pending.seconds
        return value


class SlowTTS(FastRunner):
    """The fast runner on a CPU, with every TTS call looking busy for `polls` polls; counts chunks made ahead."""

    def __init__(self, model, polls: int):
        super().__init__(model)
        self.polls = polls

    def tts_launch(self, *args, **kwargs):
        return BusyFor(super().tts_launch(*args, **kwargs), self.polls)


@pytest.fixture(scope="module")
def model():
    return build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)


def engine_pair(model, lookahead: int, polls: int = 3) -> tuple[Engine, Engine]:
    sequential = Engine(model, EngineConfig(path="fast", overlap=False))
    ahead = Engine(model, EngineConfig(path="fast", llm_lookahead=lookahead), runner=SlowTTS(model, polls))
    return sequential, ahead


def speak(engine: Engine, text: str, session=None, **kwargs) -> dict:
    stream = engine.stream(text, session=session, seed=11, **kwargs)
    chunks = list(stream)
    m = stream.metrics
    return {
        "pcm": np.concatenate([c.pcm for c in chunks]),
        "texts": [c.text for c in chunks],
        "reply": m.reply_text,
        "counts": (m.llm_tokens, m.tts_steps, m.tts_calls, m.finish_reason),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a["reply"] == b["reply"]
    assert a["texts"] == b["texts"]
    assert a["counts"] == b["counts"]
    np.testing.assert_array_equal(a["pcm"], b["pcm"])


def produced_ahead(engine: Engine, text: str, **kwargs) -> int:
    """Chunks the LLM produced while a TTS call was 'running' during one request."""
    produced = []
    fill = Lookahead.fill_while

    def counting(self, busy):
        n = fill(self, busy)
        produced.append(n)
        return n

    Lookahead.fill_while = counting
    try:
        speak(engine, text, **kwargs)
    finally:
        Lookahead.fill_while = fill
    return sum(produced)


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_free_reply_identical_with_the_llm_ahead(model, greedy):
    sequential, ahead = engine_pair(model, lookahead=4)
    sampling = SamplingParams(greedy=greedy, max_new_tokens=150)
    prompt = "Hello there, how are you today?"  # a reply of several TTS calls in both modes (tiny model, seed 11)
    assert_same(speak(sequential, prompt, sampling=sampling), speak(ahead, prompt, sampling=sampling))
    assert produced_ahead(ahead, prompt, sampling=sampling) > 0, "the test must exercise the lookahead"


def test_long_reply_with_segment_restarts_identical(model):
    sequential, ahead = engine_pair(model, lookahead=6)
    kwargs = {"forced_reply": LONG_REPLY, "forced_audio_seconds": 30.0}
    assert_same(speak(sequential, "Go on.", **kwargs), speak(ahead, "Go on.", **kwargs))


def test_speech_ending_first_rewinds_the_session(model):
    """The forced speech ends long before the LLM's reply does: chunks made ahead are taken back, so the session
    holds what the sequential algorithm leaves, and the next turn is identical too."""
    sequential, ahead = engine_pair(model, lookahead=8, polls=6)
    kwargs = {"forced_reply": LONG_REPLY, "forced_audio_seconds": 0.6}
    assert produced_ahead(ahead, "Hi.", **kwargs) > 0
    results = []
    for engine in (sequential, ahead):
        session = engine.new_session()
        try:
            first = speak(engine, "Hi.", session=session, **kwargs)
            state = (session.length, session.last_reply_terminated)
            second = speak(engine, "And then?", session=session, sampling=SamplingParams(max_new_tokens=12))
            results.append((first, state, second))
        finally:
            engine.close_session(session)
    (first_a, state_a, second_a), (first_b, state_b, second_b) = results
    assert_same(first_a, first_b)
    assert state_a == state_b
    assert state_a[1] is False, "the reply was cut by the end of speech, not by the LLM"
    assert_same(second_a, second_b)
    for engine in (sequential, ahead):
        assert engine.runner.llm_pool.num_free == engine.runner.llm_pool.size


def test_cancel_while_ahead_releases_everything(model):
    _, ahead = engine_pair(model, lookahead=8, polls=6)
    stream = ahead.stream("Hello!", seed=1, forced_reply=LONG_REPLY, forced_audio_seconds=20.0)
    next(stream)
    stream.close()
    runner = ahead.runner
    assert (runner.llm_pool.num_free, runner.tts_pool.num_free) == (runner.llm_pool.size, runner.tts_pool.size)
    assert ahead.live_requests == 0


def test_overlapped_stage_times_are_recorded(model):
    _, ahead = engine_pair(model, lookahead=4)
    stream = ahead.stream("Hello!", seed=2, forced_reply=REPLY, forced_audio_seconds=3.0)
    list(stream)
    stages = stream.metrics.stages
    assert stages["llm"] > 0 and stages["tts"] > 0 and stages["audio"] > 0 and stages["prefill"] > 0


def test_lookahead_keeps_order_and_limit():
    items = Lookahead(iter(range(10)), limit=3)
    assert next(items) == 0
    assert items.fill_while(lambda: True) == 3 and items.buffered == 3
    assert items.fill_while(lambda: True) == 0, "the buffer is full"
    assert [next(items), next(items)] == [1, 2]
    assert items.fill_while(lambda: False) == 0
    assert list(items) == list(range(3, 10))
    assert items.fill_while(lambda: True) == 0
    with pytest.raises(StopIteration):
        next(items)


def test_ready_is_computed_at_once():
    calls = []
    ready = Ready(lambda: calls.append(1) or 7)
    assert calls == [1] and not ready.running() and ready.wait() == 7 and ready.seconds >= 0


def test_negative_lookahead_is_refused(model):
    with pytest.raises(InvalidRequest, match="llm_lookahead"):
        Engine(model, EngineConfig(path="fast", llm_lookahead=-1))


def test_llm_runs_ahead_only_after_the_first_audio(model):
    """Before the first audio, LLM work on the GPU would only slow the TTS call that first audio waits for."""
    _, ahead = engine_pair(model, lookahead=8, polls=6)
    events: list[tuple[str, int]] = []
    fill = Lookahead.fill_while

    def recording(self, busy):
        n = fill(self, busy)
        events.append(("ahead", n))
        return n

    Lookahead.fill_while = recording
    try:
        for chunk in ahead.stream("Hello!", seed=3, forced_reply=LONG_REPLY, forced_audio_seconds=4.0):
            if len(chunk.pcm):
                events.append(("audio", len(chunk.pcm)))
    finally:
        Lookahead.fill_while = fill
    first_audio = next(i for i, (kind, _) in enumerate(events) if kind == "audio")
    assert all(kind == "audio" for kind, _ in events[:first_audio]), "no lookahead before the first audio"
    assert sum(n for kind, n in events[first_audio:] if kind == "ahead") > 0, "it runs ahead afterwards"
