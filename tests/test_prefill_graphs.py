"""Padded multi-token LLM forwards (prefill_graphs.py) against the eager forward, on the CPU.

On a CPU the padded function runs eagerly (the GPU captures exactly it), so these tests check the padding, the
device-side positions and mask, the junk rows' K/V and the eager fallback near the capacity. Padding changes the
matmuls' row count, so hidden states and K/V are compared in fp32 with atol = rtol = 1e-5 (observed differences
are ~1e-7: post-norm hidden values are O(1)); tokens, codes and reply text must be equal.
"""

from __future__ import annotations

import pytest
import torch
from test_fast_path import REPLY, assert_same, run

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine, EngineConfig
from omnivox.engine.fast_runner import FastRunner
from omnivox.engine.prefill_graphs import PREFILL_BUCKETS
from omnivox.engine.runner import EagerRunner
from omnivox.engine.session import Session
from omnivox.engine.types import SamplingParams
from omnivox.models.loader import build_dummy_model

TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def model():
    return build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def runners(model, capacity: int) -> tuple[EagerRunner, FastRunner]:
    ref = EagerRunner(model, cache="static", llm_capacity=capacity)
    return ref, FastRunner(model, llm_capacity=capacity, llm_slots=1, tts_slots=1)


def new_session(runner: EagerRunner) -> Session:
    return Session(cache=runner.new_llm_cache(), capacity=runner.llm_capacity)


def keys_values(cache, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[KV, end, D] keys and values of positions 0..end-1 of either static cache."""
    if hasattr(cache, "ks"):
        return cache.ks[layer][0, :, :end], cache.vs[layer][0, :, :end]
    return cache.k[layer, 0, :, :end], cache.v[layer, 0, :, :end]


def test_padded_length_and_fallback(model):
    fast = runners(model, 64)[1]
    p = fast.prefill
    assert [p.padded_length(0, n) for n in (1, 9, 16, 17, 22, 33)] == [16, 16, 16, 32, 32, 64]
    assert p.padded_length(48, 16) == 16, "start + Tb == capacity still fits"
    assert p.padded_length(49, 2) is None, "padded rows would run past the capacity: eager"
    assert runners(model, 4096)[1].prefill.padded_length(0, PREFILL_BUCKETS[-1] + 1) is None, "too long: eager"


# (capacity, history, T): `history` tokens are prefilled first (eagerly), then T tokens by the runner's llm_forward
CASES = [
    (4096, 0, 2),
    (4096, 0, 22),
    (4096, 22, 9),
    (4096, 3, 16),
    (4096, 3, 17),
    (4096, 300, 40),
    (4096, 500, 20),  # start + Tb = 532: the key bucket is 1024
    (64, 40, 10),  # start + Tb = 56 <= 64: padded
    (64, 48, 16),  # start + Tb = 64: padded, no padding rows
    (64, 50, 10),  # start + Tb = 66 > 64: eager fallback
    (64, 60, 4),  # eager fallback, up to the last slot
]


@pytest.mark.parametrize(("capacity", "history", "n"), CASES)
def test_padded_prefill_matches_eager(model, capacity, history, n):
    ref, fast = runners(model, capacity)
    ref_session, fast_session = new_session(ref), new_session(fast)
    hidden = []
    for runner, session in ((ref, ref_session), (fast, fast_session)):
        if history:  # unpadded, so that the cache past it is still zero
            EagerRunner.llm_forward(runner, session, random_ids(history, 1))
        hidden.append(runner.llm_forward(session, random_ids(n, 2)))
        assert session.length == history + n
    assert hidden[1].shape == hidden[0].shape == (n, model.config.llm.hidden_size)
    torch.testing.assert_close(hidden[1], hidden[0], **TOL)
    end = history + n
    for layer in range(model.config.llm.num_hidden_layers):
        got, want = keys_values(fast_session.cache, layer, end), keys_values(ref_session.cache, layer, end)
        torch.testing.assert_close(got, want, **TOL)
    # which path ran: padded rows leave junk past the end; the eager fallback leaves zeros
    tb = fast.prefill.padded_length(history, n)
    assert (tb is None) == (history + 16 > capacity)
    beyond = fast_session.cache.ks[0][0, :, end:]
    junk = tb is not None and tb > n
    assert bool(beyond[:, : (tb or n) - n].any()) == junk
    assert not beyond[:, (tb or n) - n :].any(), "nothing is written past start + Tb"


def test_decode_after_padded_prefill_ignores_junk(model):
    """System prompt (22 tokens, padded to 32), then the header (9, padded to 16) through llm_step as the pipeline
    runs it, then one-token decode steps over the junk slots: the same greedy tokens as after eager prefills, and
    a final forward's hidden states equal."""
    ref, fast = runners(model, 4096)
    greedy = SamplingParams(greedy=True)
    prompt, header = random_ids(22, 3), random_ids(9, 4)
    outs = []
    for runner in (ref, fast):
        session = new_session(runner)
        runner.llm_forward(session, prompt)
        if runner is fast:
            assert fast_junk(fast, session, 22, 32), "the padded prompt leaves junk K/V at 22..31"
        token, speaker = runner.llm_step(session, header, header, greedy, None, want_hidden=True)
        tokens, window = [token], [*header, token]
        for _ in range(12):
            token, _ = runner.llm_step(session, [token], window[-3:], greedy, None)
            tokens.append(token)
            window.append(token)
        last = EagerRunner.llm_forward(runner, session, [token])
        outs.append((tokens, speaker, last))
    assert outs[1][0] == outs[0][0]
    torch.testing.assert_close(outs[1][1], outs[0][1], **TOL)
    torch.testing.assert_close(outs[1][2], outs[0][2], **TOL)


def fast_junk(fast: FastRunner, session: Session, begin: int, end: int) -> bool:
    return all(bool(t[0, :, begin:end].any()) for t in session.cache.ks)


def test_engine_fast_path_same_output_and_padded(model):
    """A new conversation (system prompt, user turn, header) and a second turn: the fast path, whose prefills are
    all padded here, gives the reference's reply text, codes and waveform."""
    engines = Engine(model, EngineConfig(path="reference")), Engine(model, EngineConfig(path="fast"))
    calls = []
    prefill = engines[1].runner.prefill
    real_run = prefill.run
    prefill.run = lambda slot, start, ids: calls.append(len(ids)) or real_run(slot, start, ids)
    outs = []
    for engine in engines:
        session = engine.new_session()
        turns = []
        for text, reply, seed in (("Tell me a story.", REPLY, 5), ("And then?", "Sure. Here is more.", 6)):
            make = lambda e, t=text, r=reply, k=seed, s=session: e.stream(  # noqa: E731
                t, session=s, seed=k, forced_reply=r, forced_audio_seconds=1.5
            )
            turns.append(run(engine, make))
        engine.close_session(session)
        outs.append(turns)
    for ref, fast in zip(*outs, strict=True):
        assert len(ref["codes"]) > 50
        assert_same(ref, fast)
    assert len(calls) == 5, "system prompt, user turn and header, then the second turn's prompt and header"
    assert calls[0] == 22 and calls[2] == 9
