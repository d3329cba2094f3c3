"""Continuous batching on the tiny model (CPU, fp32): batch invariance, the reference path as oracle, mixed work in
flight together, rows given back on cancel, admission at capacity, a soak, and slot compaction under churn.

Tokens, text, the audio codes of every vocoder window and the PCM must be identical (on a CPU the vocoder decodes
windows one at a time, omnivox/engine/vocoder.py).

The free-sampling requests use seeds whose random-weight TTS happens to end soon (it ends at a drawn EOS), so the
tests stay short; forced replies end where they are told to.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
import torch

from omnivox.engine.engine import Engine, EngineConfig
from omnivox.engine.graphs import GraphCache, batch_bucket, batch_buckets
from omnivox.engine.llm_executor import LLMRow, LLMSampling, PrefillRow
from omnivox.engine.slots import SlotTable
from omnivox.engine.tts_executor import TTSRow, TTSSampling
from omnivox.engine.types import SAMPLES_PER_AUDIO_TOKEN, SamplingParams
from omnivox.errors import EngineBusy
from omnivox.models.kv_cache import KVPool

FREE = SamplingParams(max_new_tokens=4)
MATE = SamplingParams(max_new_tokens=3, temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2,
                      tts_temperature=(0.2, 0.2, 0.2, 0.2))
GREEDY = SamplingParams(greedy=True)
SENTENCES = [f"This is sentence number {i} of a long answer that keeps going for quite a while." for i in range(9)]
RESTART_REPLY = " ".join(SENTENCES)  # just over 120 BERT tokens: one segment restart


def samples(seconds: float) -> int:
    return round(seconds * 46.875) * SAMPLES_PER_AUDIO_TOKEN


def mixed(engine: Engine) -> list:
    """Eight requests of every kind: free chats (other seeds and parameters), forced chats of other lengths and
    seeds, a greedy one, and read-aloud."""
    starts = [
        lambda i: engine.stream("Hello!", seed=4, sampling=FREE, request_id=i),  # watched for invariance
        lambda i: engine.stream("Tell me.", seed=11, sampling=MATE, request_id=i),
        lambda i: engine.stream("Tell me.", seed=10, sampling=MATE, request_id=i),
        lambda i: engine.stream("Hi", seed=1, forced_reply="Glad to hear that.", forced_audio_seconds=0.5,
                                request_id=i),
        lambda i: engine.stream("How are you?", seed=2, forced_reply="Fine, thanks. And you?",
                                forced_audio_seconds=1.0, request_id=i),
        lambda i: engine.stream("Hi", sampling=GREEDY, forced_reply="Hello.", forced_audio_seconds=0.8, request_id=i),
        lambda i: engine.read_aloud("Read this sentence aloud.", seed=3, forced_audio_seconds=0.7, request_id=i),
        lambda i: engine.read_aloud("Another, longer sentence to read.", seed=5, forced_audio_seconds=1.2,
                                    request_id=i),
    ]
    return [lambda start=start, i=i: start(f"r{i}") for i, start in enumerate(starts)]


def record_codes(engine: Engine) -> dict[str, list[np.ndarray]]:
    """The audio codes of every vocoder window, by request id, as the loop hands them to the vocoder."""
    windows: dict[str, list[np.ndarray]] = defaultdict(list)
    launch = engine.scheduler._launch_vocoder

    def spy(lives):
        for live in lives:
            windows[live.metrics.request_id].append(np.array(live.speech.item.codes))
        return launch(lives)

    engine.scheduler._launch_vocoder = spy
    return windows


def drain(streams, windows: dict | None = None) -> list[tuple]:
    """Reads every stream to its end: (PCM, chunk texts, token counts, vocoder windows) each."""
    out = []
    for stream in streams:
        chunks = list(stream)
        assert chunks and chunks[-1].is_last
        m = stream.metrics
        counts = dict(llm_tokens=m.llm_tokens, tts_steps=m.tts_steps, tts_calls=m.tts_calls, text=m.reply_text,
                      finish=m.finish_reason)
        codes = (windows or {}).get(m.request_id, [])
        out.append((np.concatenate([c.pcm for c in chunks]), [c.text for c in chunks], counts, codes))
    return out


def assert_same(a, b, what: str) -> None:
    assert a[2] == b[2], f"{what}: token counts and text differ"
    assert a[1] == b[1], f"{what}: chunk texts differ"
    assert len(a[3]) == len(b[3]) and all(np.array_equal(x, y) for x, y in zip(a[3], b[3], strict=True)), \
        f"{what}: audio codes differ"
    assert a[0].shape == b[0].shape, f"{what}: audio length differs"
    assert np.array_equal(a[0], b[0]), f"{what}: PCM differs"


def assert_clean(engine: Engine) -> None:
    assert engine.wait_idle(30.0)
    stats = engine.stats()
    assert stats["live_requests"] == 0 and stats["stream_slots_free"] == stats["stream_slots"]
    assert stats["llm_rows_used"] == 0 and stats["tts_rows_used"] == 0 and stats["cache_bytes"] == 0
    assert engine.scheduler.live == []


@pytest.fixture(scope="module")
def batched(model):
    """The eight mixed requests in flight together on the fast path, and the largest batch each stage ran."""
    engine = Engine(model)
    sizes: dict[str, int] = {}
    engine.on_batch = lambda stage, rows: sizes.__setitem__(stage, max(rows, sizes.get(stage, 0)))
    windows = record_codes(engine)
    results = drain([start() for start in mixed(engine)], windows)
    assert_clean(engine)
    return results, sizes


# ---- batch invariance and the reference path --------------------------------------------------------------------
def test_a_request_alone_and_in_a_batch_of_eight_is_the_same(model, batched):
    results, sizes = batched
    assert sizes["tts"] >= 4 and sizes["llm"] >= 2 and sizes["vocoder"] >= 2, f"no real batching: {sizes}"
    assert sizes["prefill"] >= 2, f"LLM prompts were prefilled one at a time: {sizes}"
    engine = Engine(model)
    starts, windows = mixed(engine), record_codes(engine)
    for index in (0, 1, 3, 6):  # free chat, free chat with other parameters, forced chat, read-aloud
        alone = drain([starts[index]()], windows)[0]
        assert_same(alone, results[index], f"request {index}")
    assert results[0][2]["llm_tokens"] == FREE.max_new_tokens and results[0][2]["finish"] == "length"
    assert not np.array_equal(results[1][0][: len(results[2][0])], results[2][0]), "other seeds, other audio"


def test_the_reference_path_gives_the_same_audio(model, batched):
    """Greedy and seeded requests, several in flight, run one row at a time with eager steps: the same output."""
    results, _ = batched
    reference = Engine(model, EngineConfig(path="reference"))
    windows = record_codes(reference)
    ours_all = drain([start() for start in mixed(reference)], windows)
    for index, (ours, theirs) in enumerate(zip(ours_all, results, strict=True)):
        assert_same(ours, theirs, f"request {index}")
    assert_clean(reference)


@pytest.mark.parametrize("attention", ["auto", "products"])
def test_compiled_layers_give_the_same_audio(model, batched, attention):
    """The GPU default (torch.compile of the decoder layers and the samplers, dynamic shapes: one compile for every
    batch size, prompt length and key width; on a GPU decode attention by products, whose softmax is compiled too) on
    the same eight requests: the same tokens, codes and PCM as the eager fast path."""
    results, _ = batched
    compiled = Engine(model, EngineConfig(compile="on", attention=attention))
    assert compiled.llm.compiled and compiled.tts.compiled
    windows = record_codes(compiled)
    for index, (ours, theirs) in enumerate(zip(drain([s() for s in mixed(compiled)], windows), results, strict=True)):
        assert_same(ours, theirs, f"request {index}")
    assert_clean(compiled)


def test_decode_attention_by_products_gives_the_same_audio(model, batched):
    """The GPU default attention (a step's query rows through two matrix products, omnivox/models/layers.py) on the
    same eight requests: the same tokens, codes and PCM as SDPA."""
    results, _ = batched
    products = Engine(model, EngineConfig(attention="products"))
    calls = []
    real = torch.bmm
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "bmm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        windows = record_codes(products)
        ours_all = drain([s() for s in mixed(products)], windows)
    assert calls, "the products path ran"
    for index, (ours, theirs) in enumerate(zip(ours_all, results, strict=True)):
        assert_same(ours, theirs, f"request {index}")
    assert_clean(products)


# ---- everything in flight together ------------------------------------------------------------------------------
def session_turns(engine: Engine, windows: dict, before_second=None):
    session = engine.new_session()
    first = drain([engine.stream("Hi!", session=session, seed=6, forced_reply="Hello.", forced_audio_seconds=0.5,
                                 request_id="turn1")], windows)
    if before_second is not None:
        before_second()
    second = drain([engine.stream("And now?", session=session, seed=7, forced_reply="Sure.",
                                  forced_audio_seconds=0.5, request_id="turn2")], windows)
    return session, first[0], second[0]


def test_chat_read_aloud_multi_turn_restart_and_cancel_together(model, monkeypatch):
    engine = Engine(model)
    restarts = []
    prefill_audio = engine.tts.prefill_audio

    def spy(row, codes, num_text_tokens):
        restarts.append(len(codes))
        return prefill_audio(row, codes, num_text_tokens)

    monkeypatch.setattr(engine.tts, "prefill_audio", spy)
    windows = record_codes(engine)
    long = engine.stream("Tell me everything.", seed=0, forced_reply=RESTART_REPLY, forced_audio_seconds=8.0)
    chat = engine.stream("Hi", seed=1, forced_reply="Glad to hear that.", forced_audio_seconds=1.0)
    aloud = engine.read_aloud("Read this sentence aloud.", seed=3, forced_audio_seconds=0.7)
    victim = engine.stream("Cancel me", seed=2, forced_reply="This will not finish.", forced_audio_seconds=6.0)
    next(victim)
    victim.close()

    def cancelled_victim_let_go():
        deadline = time.monotonic() + 10
        while not victim.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert victim.done and victim.metrics.finish_reason == "cancelled"
        assert victim.live.tts_slot is None and victim.live.session.slot is None, "its rows are given back"
        assert victim.cache_bytes == 0 and list(victim) == []

    session, first, second = session_turns(engine, windows, cancelled_victim_let_go)
    assert session.turns == 2 and first[2]["text"] == "Hello." and second[2]["text"] == "Sure."
    (long_pcm, _, long_m, _), (chat_pcm, _, chat_m, _), (aloud_pcm, *_) = drain([long, chat, aloud])
    assert restarts and all(n == 50 for n in restarts), "the long reply restarted its TTS segment"
    # each restart re-decodes 4 audio tokens already played (fact sheet 4.13: ~2048 duplicated samples)
    assert long_m["text"] == RESTART_REPLY
    assert len(long_pcm) == samples(8.0) + len(restarts) * 4 * SAMPLES_PER_AUDIO_TOKEN
    assert chat_m["text"] == "Glad to hear that." and len(chat_pcm) == samples(1.0)
    assert len(aloud_pcm) == samples(0.7)
    assert engine.wait_idle(30.0) and engine.stats()["llm_rows_used"] == 1, "the open session keeps its row"
    engine.close_session(session)
    deadline = time.monotonic() + 10
    while engine.stats()["llm_rows_used"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert_clean(engine)
    # the session's turns, with other requests starting and ending around its idle row, equal the turns alone
    alone = Engine(model)
    _, alone_first, alone_second = session_turns(alone, record_codes(alone))
    assert_same(first, alone_first, "first turn")
    assert_same(second, alone_second, "second turn")


@pytest.mark.parametrize("compile", ["off", "on"])
def test_prompts_riding_along_with_a_decode_step_change_nothing(model, compile):
    """Turns that start while another reply is decoding run their prompt and reply header inside its decode step
    (one forward, `Segments`): every request gives the same tokens, codes and PCM as when it runs alone; compiled
    layers too (the flattened tokens are a new shape for them)."""
    config = EngineConfig(compile=compile)
    engine = Engine(model, config)
    riding = []
    decode = engine.llm.decode

    def spy(rows, prompts=()):
        if prompts:
            riding.append((len(rows), [len(p.ids) for p in prompts]))
        return decode(rows, prompts)

    engine.llm.decode = spy
    windows = record_codes(engine)
    long = engine.stream("Tell me a story.", seed=1, forced_reply=RESTART_REPLY, forced_audio_seconds=3.0)
    chunks = iter(long)
    first = next(chunks)  # its reply decodes from here on
    starts = [
        lambda e: e.stream("How are you?", seed=2, forced_reply="Fine, thanks. And you?", forced_audio_seconds=1.0,
                           request_id="chat"),
        lambda e: e.stream("Hi", seed=3, sampling=MATE, request_id="free"),
    ]
    streams = [start(engine) for start in starts]
    results = drain(streams, windows)
    long_pcm = np.concatenate([first.pcm] + [c.pcm for c in chunks])
    assert riding and all(len(lengths) <= 2 for _, lengths in riding), riding
    assert engine.loop_stats()["prompts_riding"] == sum(len(lengths) for _, lengths in riding)
    assert all(s.metrics.stages.get("prefill", 0.0) > 0 for s in streams), "a riding prompt's time is prefill time"
    assert_clean(engine)
    for index, start in enumerate(starts):
        alone = Engine(model, config)
        assert_same(drain([start(alone)], record_codes(alone))[0], results[index], f"request {index}")
    alone = Engine(model, config)
    alone_pcm = np.concatenate([c.pcm for c in alone.stream("Tell me a story.", seed=1, forced_reply=RESTART_REPLY,
                                                              forced_audio_seconds=3.0)])
    assert np.array_equal(alone_pcm, long_pcm), "the decoding reply's audio changed"


class EagerGraphs(GraphCache):
    """Graphs "on", so the executors take their graph-only paths (warm-up, batched TTS text prefills), with every
    step run eagerly and each shape key recorded: what a CPU can check of them. With `reuse_outputs`, as a captured
    graph's, each key's output is one buffer that the next run of the key overwrites (a CPU result handed on
    without a copy, as the loop's pipelined TTS steps are, would then change under its reader)."""

    def __init__(self, reuse_outputs: bool = False):
        super().__init__(torch.device("cpu"), enabled=False)
        self.enabled = True
        self.keys: list = []
        self.outputs: dict | None = {} if reuse_outputs else None

    def run(self, key, fn, inputs):
        self.keys.append(key)
        out = fn(**{name: torch.as_tensor(value) for name, value in inputs.items()})
        if self.outputs is None:
            return out
        kept = self.outputs.setdefault(key, out)
        if kept is not out:
            kept.copy_(out)
        return kept


def test_warm_up_captures_every_tts_step_the_loop_may_run(model):
    """Warm-up runs a TTS step and a batched text prefill at every batch size and key width (scratch slots only:
    the drawn codes of real rows stay as they were)."""
    tts = Engine(model, EngineConfig()).tts
    tts.graphs = EagerGraphs()
    before = tts.drawn.clone()
    tts.warm_up()
    every = {(b, w) for b in batch_buckets(tts.slots.size, tts.smallest_batch) for w in tts.widths}
    assert {key[2:] for key in tts.graphs.keys if key[0] == "tts"} == every
    assert {key[1:] for key in tts.graphs.keys if key[0] == "tts_text"} == every
    assert torch.equal(tts.drawn, before), "warm-up drew codes for a real row"


def test_warm_up_captures_every_llm_step_the_loop_may_run(model):
    """Warm-up runs an LLM decode step, with and without prompts riding along, over the active rows at every batch
    size and key width, and over gathered rows at every batch size below the largest (scratch positions only)."""
    llm = Engine(model, EngineConfig()).llm
    llm.graphs = EagerGraphs()
    before = [buf.clone() for buf in llm.pool._buffers]
    llm.warm_up()
    buckets = batch_buckets(llm.slots.size, llm.smallest_batch)
    every = {(b, w) for b in buckets for w in llm.widths}
    gathered = {(b, w) for b, w in every if b < buckets[-1]}  # a gathered step is smaller than the active rows'
    assert {key[2:] for key in llm.graphs.keys if key[0] == "llm"} == every
    assert {key[1:] for key in llm.graphs.keys if key[0] == "llm+prompts"} == every
    assert {key[1:] for key in llm.graphs.keys if key[0] == "llm_rows"} == gathered
    assert {key[1:] for key in llm.graphs.keys if key[0] == "llm_rows+prompts"} == gathered
    for buf, saved in zip(llm.pool._buffers, before, strict=True):
        assert torch.equal(buf[:, :, : llm.scratch], saved[:, :, : llm.scratch]), "warm-up wrote a real position"


def test_batched_tts_text_prefills_give_the_same_audio(model, batched):
    """With graphs on, the TTS text prefills of several streams run as one step over just their rows (wherever they
    are in the pool); off (CPU) they run one at a time. The eight mixed requests: the same tokens, codes and PCM."""
    engine = Engine(model)
    engine.tts.graphs = EagerGraphs()
    prefills = []
    prefill_rows = engine.tts.prefill_text_rows

    def spy(rows):
        prefills.append([row for row, *_ in rows])
        return prefill_rows(rows)

    engine.tts.prefill_text_rows = spy
    windows = record_codes(engine)
    ours = drain([start() for start in mixed(engine)], windows)
    assert any(len(rows) > 1 for rows in prefills), f"no batched text prefill: {prefills}"
    assert any(sorted(rows) != list(range(len(rows))) for rows in prefills), f"no spread-out rows: {prefills}"
    for index, (mine, theirs) in enumerate(zip(ours, batched[0], strict=True)):
        assert_same(mine, theirs, f"request {index}")
    assert_clean(engine)


# ---- rows, admission, soak --------------------------------------------------------------------------------------
def test_cancel_gives_every_row_back(model):
    engine = Engine(model)
    # 30 s of audio each: no reply ends (and gives its rows back) before the rows are counted, however slow the CPU
    streams = [engine.stream("One", seed=0, forced_reply="A long reply.", forced_audio_seconds=30.0),
               engine.read_aloud("Read this aloud.", seed=1, forced_audio_seconds=30.0),
               engine.stream("Three", seed=2, forced_reply="Another reply.", forced_audio_seconds=30.0)]
    for s in streams:
        next(s)
    stats = engine.stats()
    assert stats["tts_rows_used"] == 3 and stats["llm_rows_used"] == 2 and stats["cache_bytes"] > 0
    assert sum(s.cache_bytes for s in streams) == stats["cache_bytes"]
    for s in streams:
        s.close()
    assert_clean(engine)
    assert [s.metrics.finish_reason for s in streams] == ["cancelled"] * 3
    assert engine.stats()["live_requests"] == 0


def test_a_request_is_live_until_it_has_given_every_row_back(model):
    """`wait_idle` (another thread) takes "no request live" to mean "no row held": a request leaves the live list
    only after its rows are back."""
    engine = Engine(model)
    live_at_release = []
    for slots in (engine.llm.slots, engine.tts.slots):
        release = slots.release

        def watched(handle, release=release):
            live_at_release.append(len(engine.scheduler.live))
            release(handle)

        slots.release = watched
    stream = engine.stream("One", seed=0, forced_reply="A long reply.", forced_audio_seconds=30.0)
    next(stream)
    stream.close()
    assert_clean(engine)
    assert len(live_at_release) == 2 and all(n == 1 for n in live_at_release), live_at_release


def test_engine_busy_at_capacity_then_admits_again(model):
    engine = Engine(model, EngineConfig(max_concurrent_requests=2, max_sessions=1))
    a = engine.stream("One", seed=0, forced_reply="First.", forced_audio_seconds=3.0)
    b = engine.read_aloud("Two", seed=1, forced_audio_seconds=3.0)
    assert engine.stats()["stream_slots_free"] == 0
    with pytest.raises(EngineBusy, match="2 stream slots") as busy:
        engine.stream("Three", forced_reply="x", forced_audio_seconds=0.5)
    assert busy.value.retry_after_s > 0
    with pytest.raises(EngineBusy):
        engine.read_aloud("Four", forced_audio_seconds=0.5)
    session = engine.new_session()
    with pytest.raises(EngineBusy, match="sessions"):
        engine.new_session()
    engine.close_session(session)
    engine.close_session(engine.new_session())  # the closed session's place is free again
    a.close()
    deadline = time.monotonic() + 10
    while engine.live_requests > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    c = engine.stream("Five", seed=2, forced_reply="Yes.", forced_audio_seconds=0.5)
    assert sum(len(ch.pcm) for ch in c) == samples(0.5)
    b.close()
    assert_clean(engine)


def test_soak_with_random_cancels_ends_clean(model):
    engine = Engine(model)
    rng = random.Random(0)
    inflight: list[tuple] = []
    finished = busy = 0

    def settle(entry) -> None:
        nonlocal finished
        stream, fate, seconds = entry
        if fate == "read":
            chunks = list(stream)
            assert chunks[-1].is_last and sum(len(c.pcm) for c in chunks) == samples(seconds)
            assert stream.metrics.finish_reason == "eos"
        else:
            if fate == "one_chunk":
                next(stream, None)
            stream.close()
            list(stream)
        finished += 1

    for i in range(40):
        seconds = rng.choice((0.3, 0.4, 0.6))
        fate = rng.choice(("read", "read", "close_now", "one_chunk"))
        for _attempt in range(10):
            try:
                if rng.random() < 0.3:
                    stream = engine.read_aloud(f"Read number {i}.", seed=i, forced_audio_seconds=seconds)
                else:
                    stream = engine.stream(f"Question {i}?", seed=i, forced_reply=f"Answer {i}.",
                                           forced_audio_seconds=seconds)
                break
            except EngineBusy:  # cancelled requests not reaped yet: finish the oldest and try again
                busy += 1
                settle(inflight.pop(0))
        else:
            pytest.fail("the engine stayed busy with nothing in flight")
        if fate == "close_now":
            stream.close()
        inflight.append((stream, fate, seconds))
        if len(inflight) >= 6:
            settle(inflight.pop(0))
    while inflight:
        settle(inflight.pop(0))
    assert finished == 40
    assert_clean(engine)


# ---- codes fed on the device -------------------------------------------------------------------------------------
def test_steps_fed_their_drawn_codes_equal_steps_fed_from_the_host(model):
    """A TTS call's later steps take the codes the row drew on the device (the loop launches them before it reads
    those codes): the same tokens as feeding each step its predecessor's codes from the host, also after the row
    has moved in the pool."""
    sampling = TTSSampling((0.7,) * 4, 0.9, 20, False, seed=5)
    ids = model.tts_tokenizer.encode("[Stts][spk_emb]a short line of text to speak[Ptts]")
    drawn, fed = [], []
    for from_device, out in ((True, drawn), (False, fed)):
        tts = Engine(model).tts
        other = tts.slots.acquire(active=True)  # released after the first step: our row moves to row 0
        mine = tts.slots.acquire(active=True)
        tts.prefill_text(mine.row, ids, 0, None)
        prev = None
        for i in range(6):
            row = TTSRow(mine.row, 302 + i, prev, len(ids), False, False, sampling, i, prev_drawn=from_device and i > 0)
            codes, eos = tts.step([row]).get()[0]
            assert not eos
            out.append(codes)
            prev = codes
            if i == 0:
                tts.slots.release(other)
        assert mine.row == 0
    assert drawn == fed and len(set(fed)) > 1


def test_the_loops_first_call_equals_its_steps_fed_one_at_a_time_from_the_host(model):
    """A segment's first TTS call as the loop runs it (each step launched before the codes of the one before it are
    read, and fed them on the device) against the same call stepped one token at a time, each step fed the codes
    drawn before it from the host: only the first step feeds [Ptts] and skips top-p/top-k."""
    engine = Engine(model)
    prefills, loop_rows = [], []
    prefill_rows, step = engine.tts.prefill_text_rows, engine.tts.step
    engine.tts.prefill_text_rows = lambda items: prefills.append(list(items)) or prefill_rows(items)
    engine.tts.step = lambda rows: loop_rows.extend(rows) or step(rows)  # one request: one row a step
    windows = record_codes(engine)
    [(_, _, _, loop_windows)] = drain([engine.read_aloud("Read this sentence aloud.", seed=3,
                                                         forced_audio_seconds=0.7, request_id="r")], windows)
    assert [r.prev_drawn for r in loop_rows[:25]] == [False] + [True] * 24, "the loop fed steps on the device"
    tts = Engine(model).tts
    row = tts.slots.acquire(active=True).row
    for _, ids, begin, speaker in prefills[0]:
        tts.prefill_text(row, ids, begin, speaker)
    fed, prev = [], None
    for i, theirs in enumerate(loop_rows[:25]):  # the loop's own rows, fed from the host instead
        one = replace(theirs, row=row, prev_codes=prev if i else theirs.prev_codes, prev_drawn=False)
        prev, eos = tts.step([one]).get()[0]
        assert not eos
        fed.append(prev)
    assert [tuple(c) for c in loop_windows[0][:25]] == fed


def test_a_decode_step_over_just_its_rows_equals_one_over_every_active_row(model):
    """When the rows taking part fit a smaller batch than the active rows, the LLM's decode step runs over just them
    (their keys gathered): the same tokens and the same cache as the step over every active row, with and without
    a prompt riding along (the cache up to a CPU's matrix-product rounding, which differs with the batch size)."""
    llm = Engine(model).llm
    handles = [llm.slots.acquire(active=True) for _ in range(6)]
    prompts = [PrefillRow(h.row, 0, list(range(5 + i, 25 + 2 * i))) for i, h in enumerate(handles[:5])]
    llm.prefill(prompts).get()
    rows = [LLMRow(handles[i].row, 7 + i, len(prompts[i].ids), [3, 7 + i], LLMSampling(1.0, 20, 0.9, 1.1, False, 5, i))
            for i in (4, 1, 2)]  # a batch of 4: one padding row
    riding = [PrefillRow(handles[5].row, 0, [9, 8, 7, 6], [9], LLMSampling(1.0, 20, 0.9, 1.1, False, 6, 0))]
    gathered_steps = []
    step, with_prompts = llm._step, llm._step_with_prompts
    llm._step = lambda *a, rows=None, **kw: gathered_steps.append(rows is not None) or step(*a, rows=rows, **kw)
    llm._step_with_prompts = lambda *a, step_rows=None, **kw: gathered_steps.append(step_rows is not None) or \
        with_prompts(*a, step_rows=step_rows, **kw)
    every = batch_bucket(llm.slots.num_active, llm.slots.size, llm.smallest_batch)
    before = [buf.clone() for buf in llm.pool._buffers]
    cache = {}
    for name, run in [("gathered", lambda: llm.decode(rows, riding)),
                      ("every row", lambda: llm._decode_with_prompts(0, every, rows, riding)),
                      ("gathered alone", lambda: llm.decode(rows)),
                      ("every row alone", lambda: llm._decode(0, every, rows))]:
        for buf, saved in zip(llm.pool._buffers, before, strict=True):
            buf.copy_(saved)
        tokens = run().get()
        cache[name] = tokens, [buf[:, :, : llm.scratch].clone() for buf in llm.pool._buffers]
    assert gathered_steps == [True, False, True, False]
    for a, b in (("gathered", "every row"), ("gathered alone", "every row alone")):
        assert cache[a][0] == cache[b][0]
        for x, y in zip(cache[a][1], cache[b][1], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        assert not torch.equal(cache[a][1][0], before[0][:, :, : llm.scratch]), "the step wrote its keys"


def test_vocoder_windows_of_every_length_replay_in_graphs(model):
    """With graphs "on" (run eagerly, shape keys recorded) and windows batched as on a GPU: the two usual lengths at
    any batch size, other lengths in batches of at most SHORT_WINDOW_BATCH (more are split), and the PCM of each
    window as decoded alone (to float tolerance: batched convolutions sum in another order on a CPU)."""
    vocoder = Engine(model).vocoder
    vocoder.graphs, vocoder.batched, vocoder.max_batch = EagerGraphs(reuse_outputs=True), True, 16
    rng = np.random.default_rng(0)
    lengths = [29] * 11 + [25, 7] + [13] * 18  # 13: three graph runs of one key (8 + 8), then one of 2
    windows = [rng.integers(0, 600, (n, vocoder.num_vq)) for n in lengths]
    pcm = vocoder.decode(windows).get()
    keys = vocoder.graphs.keys
    assert sorted(keys) == sorted([("vocoder", 16, 29), ("vocoder", 1, 25), ("vocoder", 1, 7), ("vocoder", 8, 13),
                                   ("vocoder", 8, 13), ("vocoder", 2, 13)])
    for window, out in zip(windows, pcm, strict=True):
        alone = vocoder._decode(torch.from_numpy(window)[None])[0].numpy()
        assert out.shape == alone.shape and np.allclose(out, alone, atol=1e-5)
    vocoder.graphs = EagerGraphs()
    vocoder.warm_up()
    short = {("vocoder", b, n) for n in range(1, 30) if n not in (25, 29) for b in (1, 2, 4, 8)}
    usual = {("vocoder", b, n) for n in (25, 29) for b in (1, 2, 4, 8, 16)}
    assert set(vocoder.graphs.keys) == short | usual


# ---- slot compaction --------------------------------------------------------------------------------------------
def test_slot_table_keeps_active_rows_in_front_and_caches_follow_their_handles():
    """Random acquires, activations and releases (a release moves the holders at the region edges into the gap by
    one-way copies, `KVPool.move_slot`)."""
    pool = KVPool(num_layers=2, num_kv_heads=1, head_dim=2, capacity=3, dtype=torch.float32, device="cpu", slots=6)
    table = SlotTable(6, pool.swap_slots, pool.move_slot)
    rng = random.Random(1)
    owned: dict[int, object] = {}  # value written into the row -> handle
    next_value = 1.0

    def check() -> None:
        handles = list(owned.items())
        active = sorted(h.row for _, h in handles if h.active)
        idle = sorted(h.row for _, h in handles if not h.active)
        assert active == list(range(table.num_active)), "active rows are 0..num_active-1"
        assert idle == list(range(table.num_active, table.num_used)), "idle rows follow, then the free ones"
        for value, h in handles:
            for buf in (*pool.k, *pool.v):
                assert bool((buf[h.row] == value).all()), "a row's cache moves with its handle"

    for _ in range(400):
        op = rng.choice(("acquire", "acquire_active", "activate", "deactivate", "release"))
        if op.startswith("acquire"):
            h = table.acquire(active=op == "acquire_active")
            if h is None:
                assert table.num_free == 0
                continue
            for buf in (*pool.k, *pool.v):
                buf[h.row] = next_value
            owned[next_value] = h
            next_value += 1.0
        elif owned:
            value = rng.choice(list(owned))
            h = owned[value]
            if op == "activate":
                table.activate(h)
            elif op == "deactivate":
                table.deactivate(h)
            else:
                table.release(h)
                table.release(h)  # twice: harmless
                del owned[value]
        check()
    assert table.num_used == len(owned)
