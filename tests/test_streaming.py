"""The streaming algorithm on the tiny random-weight model (CPU): determinism, framing, schedules, restarts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from omnivox.engine import request as request_module
from omnivox.engine.crossfade import OVERLAP, Framer, blend
from omnivox.engine.engine import Engine, EngineConfig
from omnivox.engine.masks import tts_audio_mask
from omnivox.engine.types import FIRST_AUDIO_MILESTONES, SAMPLES_PER_AUDIO_TOKEN, SamplingParams
from omnivox.errors import ContextTooLong, EngineBusy, InvalidRequest

REPLY = "Glad to hear that. Is there anything on your mind that you would like to talk about, or should I suggest?"
LONG_REPLY = " ".join(
    f"This is sentence number {i} of a long answer that keeps going for quite a while." for i in range(20)
)


class Spy:
    """Records the schedule a request asks for: TTS text/audio prefills as the executor runs them, and each TTS call
    (25 steps at most) as the request state ends it."""

    def __init__(self, engine, monkeypatch):
        self.calls: list[tuple] = []
        tts = engine.tts
        prefill_text, prefill_audio = tts.prefill_text, tts.prefill_audio

        def spy_text(row, ids, begin, speaker):
            self.calls.append(("prefill", begin, begin + len(ids), speaker is not None))
            return prefill_text(row, ids, begin, speaker)

        def spy_audio(row, codes, num_text_tokens):
            self.calls.append(("prefill_audio", len(codes), num_text_tokens))
            return prefill_audio(row, codes, num_text_tokens)

        original_call = request_module.Reply._tts_call

        def spy_call(reply, seg, num_text_tokens):
            before = seg.num_codes
            yield from original_call(reply, seg, num_text_tokens)
            self.calls.append(("generate", 25, num_text_tokens, before, seg.num_codes - before, seg.finished))

        monkeypatch.setattr(tts, "prefill_text", spy_text)
        monkeypatch.setattr(tts, "prefill_audio", spy_audio)
        monkeypatch.setattr(request_module.Reply, "_tts_call", spy_call)


def speak(engine, text="Hello!", seed=0, reply=REPLY, seconds=4.0, **kw):
    stream = engine.stream(text, seed=seed, forced_reply=reply, forced_audio_seconds=seconds, **kw)
    chunks = list(stream)
    return chunks, stream.metrics


def test_seeded_streaming_is_deterministic(engine):
    a, ma = speak(engine, seed=7)
    b, mb = speak(engine, seed=7)
    c, _ = speak(engine, seed=8)
    pcm = lambda chunks: np.concatenate([ch.pcm for ch in chunks])  # noqa: E731
    assert np.array_equal(pcm(a), pcm(b))
    assert [ch.text for ch in a] == [ch.text for ch in b]
    assert ma.reply_text == mb.reply_text == REPLY
    assert not np.array_equal(pcm(a), pcm(c)), "another seed must sample other audio codes"


def test_free_sampling_is_deterministic_and_bounded(engine):
    sampling = SamplingParams(max_new_tokens=12)
    texts = []
    for _ in range(2):
        stream = engine.stream("Tell me a story.", seed=3, sampling=sampling)
        for _chunk in stream:
            pass
        texts.append(stream.metrics.reply_text)
        assert stream.metrics.llm_tokens <= 12
    assert texts[0] == texts[1]


def test_greedy_is_reproducible(engine):
    greedy = SamplingParams(greedy=True)
    a, _ = speak(engine, seed=1, sampling=greedy)
    b, _ = speak(engine, seed=2, sampling=greedy)
    assert np.array_equal(np.concatenate([c.pcm for c in a]), np.concatenate([c.pcm for c in b]))


def test_framing_512_samples_per_token_and_chunk_sizes(model):
    for early in (True, False):
        engine = Engine(model, EngineConfig(early_first_chunk=early))
        chunks, metrics = speak(engine, seconds=4.0)
        audio_tokens = round(4.0 * 46.875)
        total = sum(len(c.pcm) for c in chunks)
        assert total == audio_tokens * SAMPLES_PER_AUDIO_TOKEN
        assert metrics.audio_s == pytest.approx(total / 24000)
        sizes = [len(c.pcm) for c in chunks if len(c.pcm)]
        first_call = 25 * SAMPLES_PER_AUDIO_TOKEN
        if early:
            assert sizes[0] == first_call - OVERLAP  # released after ONE TTS call
            assert sizes[-1] == OVERLAP
        else:
            assert sizes[0] == first_call  # released after the second call, full length
        assert all(s == first_call for s in sizes[1:-2]), "every full 25-token call releases 12800 samples"
        assert sizes[-2] <= first_call  # the call that ended with EOS may be shorter
        assert chunks[-1].is_last and not any(c.is_last for c in chunks[:-1])
        starts = [c.audio_start_s for c in chunks]
        assert starts == sorted(starts)


def test_early_first_chunk_equals_official_framing(model):
    early, _ = speak(Engine(model, EngineConfig(early_first_chunk=True)), seed=5)
    official, _ = speak(Engine(model, EngineConfig(early_first_chunk=False)), seed=5)
    a = np.concatenate([c.pcm for c in early])
    b = np.concatenate([c.pcm for c in official])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)  # identical arithmetic; only the boundaries move
    assert len(early[0].pcm) < len(official[0].pcm)
    assert "".join(c.text for c in early) == "".join(c.text for c in official)


def test_crossfade_weights():
    old, new = np.ones(OVERLAP, np.float32), np.zeros(OVERLAP, np.float32)
    out = blend(old, new)
    assert out[0] == pytest.approx(2048 / 2049) and out[-1] == pytest.approx(1 / 2049)
    framer = Framer(early=False)
    assert framer.push(np.full(12800, 1.0, np.float32)) is None
    released = framer.push(np.full(14848, 3.0, np.float32))
    assert len(released) == 12800 and np.all(released[:-OVERLAP] == 1.0)
    assert len(framer.flush()) == 14848 - OVERLAP


def test_mask_schedule():
    def row(p, num_text, audio_end=None):
        t = lambda v: torch.tensor([v])  # noqa: E731
        return tts_audio_mask(t(p), t(num_text), t(audio_end or p + 1), 400)[0, 0, 0]

    first = row(302, 40)
    assert first[:12].all() and not first[12:].any(), "first audio query: [Stts] [spk] + 10 text, not even itself"
    assert row(302 + 48, 40)[:12].all() and not row(302 + 48, 40)[12:303].any()
    assert row(302 + 49, 40)[:22].all() and not row(302 + 49, 40)[22:303].any(), "token 49 sees 20 text tokens"
    short = row(302 + 200, 5)
    assert short[:8].all() and not short[8:303].any(), "text visible only up to [Etts] of the current text"
    assert short[303 : 302 + 201].all() and not short[302 + 201 :].any(), "earlier audio visible, future not"
    block = row(302, 5, audio_end=352)
    assert block[303:352].all(), "restart block: one row for all 50 queries, so the block is non-causal"


def test_call_sizes_and_prefill_slices(model, monkeypatch):
    engine = Engine(model)
    runner = Spy(engine, monkeypatch)
    speak(engine, seconds=6.0)
    prefills = [c for c in runner.calls if c[0] == "prefill"]
    generates = [c for c in runner.calls if c[0] == "generate"]
    assert prefills[0][1:] == (0, 12, True), "chunk 0: [Stts][spk_emb] + 10 text slots, with the speaker vector"
    for i, p in enumerate(prefills[1:-1], start=1):
        assert p[1:] == (10 * i + 2, 10 * i + 12, False)
    assert all(g[1] == 25 for g in generates)
    assert all(g[4] <= 25 for g in generates)
    assert generates[-1][5], "last call ends with EOS"
    # a TTS call during the LLM phase needs L >= 10 (m + 1); streaming calls come before the flush prefill
    streamed = [c for c in runner.calls[: runner.calls.index(prefills[-1])] if c[0] == "generate"]
    for m, g in enumerate(streamed):
        assert g[2] >= 10 * (m + 1)


def test_segment_restart_on_long_reply(model, monkeypatch):
    engine = Engine(model)
    runner = Spy(engine, monkeypatch)
    chunks, metrics = speak(engine, reply=LONG_REPLY, seconds=60.0)
    restarts = [c for c in runner.calls if c[0] == "prefill_audio"]
    assert restarts, "a reply over 120 BERT tokens with sentence ends must restart the TTS segment"
    assert all(r[1] == 50 and r[2] == 5 for r in restarts), "restart: [Ptts] + 49 old codes, 5 old text tokens"
    restart_prefill = runner.calls[runner.calls.index(restarts[0]) - 1]
    assert restart_prefill[1:] == (0, 7, True), "[Stts][spk_emb] + 5 text tokens"
    assert chunks[-1].is_last
    assert metrics.audio_s > 10
    assert engine.wait_idle() and engine.live_requests == 0


def test_multi_turn_keeps_the_llm_cache(engine):
    session = engine.new_session()
    _, m1 = speak(engine, "Hi!", session=session)
    length_after_first = session.length
    assert session.last_reply_terminated and session.turns == 1
    _, m2 = speak(engine, "And now?", session=session, reply="Sure.")
    assert session.turns == 2 and session.length > length_after_first
    # the second prompt only adds the new user turn (no system prompt again)
    assert m2.prompt_tokens == len(engine.model.tokenizer.encode("<|im_end|>\n<|im_start|>user\nAnd now?"))
    engine.close_session(session)
    with pytest.raises(InvalidRequest, match="closed"):
        engine.stream("again", session=session)


def test_each_turn_prefills_its_prompt_and_the_reply_header_in_one_batch(model):
    """The user turn and the reply header go to the LLM together: one prefill batch per turn on the way to first
    audio, not two one after the other (the system prompt is the shared prompt's cache, copied)."""
    engine = Engine(model)
    batches: list[str] = []
    engine.on_batch = lambda stage, size: batches.append(stage)
    session = engine.new_session()
    for turn, text in enumerate(("Hi!", "And now?"), start=1):
        batches.clear()
        _, m = speak(engine, text, session=session, reply="Sure.", seconds=1.0)
        assert batches.count("prefill") == 1, batches
        assert session.turns == turn and m.first_audio_milestones["decoding"] > 0
    engine.close_session(session)


def test_read_aloud_uses_the_default_voice(engine):
    stream = engine.read_aloud("Read this sentence aloud, please. It has 23 apples.", seed=0,
                               forced_audio_seconds=3.0)
    chunks = list(stream)
    assert sum(len(c.pcm) for c in chunks) == round(3.0 * 46.875) * SAMPLES_PER_AUDIO_TOKEN
    assert stream.metrics.llm_tokens == 0
    assert engine.wait_idle() and engine.live_requests == 0


def test_fake_clock_ttfb_and_rtf(model):
    ticks = itertools.count()
    engine = Engine(model, clock=lambda: float(next(ticks)))  # every clock read advances one second
    chunks, m = speak(engine, seconds=2.0)
    assert m.ttfb_s == chunks[0].ready_s and m.ttfb_s > 0
    assert m.total_s >= chunks[-1].ready_s
    assert m.rtf == pytest.approx(m.total_s / m.audio_s)
    assert sum(v for k, v in m.stages.items()) <= m.total_s


def test_first_audio_milestones_follow_the_request_in_order(model):
    ticks = itertools.count()
    engine = Engine(model, clock=lambda: float(next(ticks)))  # every clock read advances one second
    _, m = speak(engine, seconds=2.0)
    times = m.first_audio_milestones
    assert list(times) == list(FIRST_AUDIO_MILESTONES), "a chat reply passes every milestone, in this order"
    values = list(times.values())
    assert values == sorted(set(values)), f"each milestone later than the one before: {times}"
    assert 0 < times["admitted"] and times["audio"] < m.ttfb_s, "the stream takes the audio after the loop made it"
    read = engine.read_aloud("Read this aloud.", seed=0, forced_audio_seconds=1.0)
    list(read)
    assert list(read.metrics.first_audio_milestones) == ["admitted", "speaking", "audio"], "no LLM on the way"


def test_cancel_frees_the_request(engine):
    stream = engine.stream("Hello", seed=0, forced_reply=REPLY, forced_audio_seconds=8.0)
    next(stream)
    assert engine.live_requests == 1 and engine.stats()["cache_bytes"] > 0
    stream.close()
    assert engine.wait_idle(), "a cancelled request leaves the loop within one iteration"
    assert engine.live_requests == 0 and engine.stats()["cache_bytes"] == 0
    assert stream.metrics.finish_reason == "cancelled"
    assert list(stream) == []


def test_bad_input(engine, model):
    with pytest.raises(InvalidRequest, match="empty"):
        engine.stream("   ")
    with pytest.raises(ContextTooLong, match="characters"):
        engine.stream("x" * 5000)
    with pytest.raises(ContextTooLong, match="LLM positions"):
        Engine(model, EngineConfig(max_session_tokens=600)).stream("word " * 300)
    with pytest.raises(InvalidRequest, match="device"):
        Engine.from_pretrained(None, device="tpu")
    with pytest.raises(InvalidRequest, match="forced_audio_seconds"):
        engine.stream("hi", forced_reply="x", forced_audio_seconds=0)
    assert engine.live_requests == 0


def test_admission_limit(model):
    engine = Engine(model, EngineConfig(max_concurrent_requests=1))
    first = engine.stream("one", forced_reply="a", forced_audio_seconds=1.0)
    with pytest.raises(EngineBusy):
        engine.stream("two", forced_reply="b", forced_audio_seconds=1.0)
    first.close()
    assert engine.wait_idle()
    list(engine.stream("three", forced_reply="c", forced_audio_seconds=1.0))
    assert engine.wait_idle() and engine.live_requests == 0


def test_async_readers_get_every_chunk_with_shared_wakeups(model, monkeypatch):
    """Chunks for async readers are handed over with one wake-up of their event loop per flush (once the requests
    have advanced, and at the end of each loop pass), not one per chunk, and the readers still get every chunk, the
    same as a blocking reader does."""
    import asyncio

    engine = Engine(model, EngineConfig(max_concurrent_requests=4))
    expected = [len(speak(engine, seed=s, seconds=2.0)[0]) for s in range(3)]
    wakeups, passes = [], [0]  # the flush each wake-up came from
    flush = engine._flush_wakeups

    def counted_flush() -> None:
        passes[0] += 1
        flush()

    monkeypatch.setattr(engine, "_flush_wakeups", counted_flush)

    async def read_all() -> list[int]:
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a, **kw: wakeups.append(passes[0]) or real(*a, **kw))
        streams = [engine.stream("Hello!", seed=s, forced_reply=REPLY, forced_audio_seconds=2.0) for s in range(3)]

        async def count(stream) -> int:
            n = 0
            while await stream.next_async() is not None:
                n += 1
            return n

        return await asyncio.gather(*(count(s) for s in streams))

    got = asyncio.run(read_all())
    engine.shutdown()
    assert got == expected
    assert sum(got) > len(set(wakeups))  # three readers' chunks shared wake-ups
    assert len(wakeups) == len(set(wakeups))  # at most one wake-up of the event loop per flush
