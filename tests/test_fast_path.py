"""The fast path (static caches from slot pools, device-side step logic) against the reference path, on the CPU.

On a CPU there are no CUDA graphs, so `path="fast"` runs the very step functions the GPU captures, eagerly (the
graph checks themselves are in `python -m omnivox.bench.gpu_suite --parts validate`). Same seed, same model:
the fast path must give the same LLM tokens (reply text), the same audio codes and the same waveform. Tolerance:
the waveform is compared with atol 1e-6 (float32 PCM in [-1, 1]); on the CPU it is in fact bit-identical, since
the step functions run the same kernels on the same values.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnivox.config import tiny_config
from omnivox.engine.engine import Engine, EngineConfig
from omnivox.engine.fast_runner import FastRunner
from omnivox.engine.runner import tts_audio_mask
from omnivox.engine.sampling import draw, sample_tts_codes
from omnivox.engine.types import SamplingParams
from omnivox.errors import EngineBusy, InvalidRequest
from omnivox.models.loader import build_dummy_model

PCM_ATOL = 1e-6
REPLY = "Glad to hear that. Is there anything on your mind that you would like to talk about today?"
LONG_REPLY = " ".join(f"This is sentence number {i} of a long answer that keeps going for a while." for i in range(14))


@pytest.fixture(scope="module")
def model():
    return build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)


@pytest.fixture(scope="module")
def engines(model):
    """(reference, fast) over the same weights; both keep their pools for the whole module."""
    return Engine(model, EngineConfig(path="reference")), Engine(model, EngineConfig(path="fast"))


class Recorded:
    """Collects every window of codes the pipeline decodes and counts segment restarts."""

    def __init__(self, engine: Engine):
        self.runner = engine.runner
        self.windows: list[torch.Tensor] = []
        self.restarts = 0

    def __enter__(self) -> Recorded:
        decode, prefill_audio = self.runner.decode_audio_launch, self.runner.tts_prefill_audio

        def rec_decode(codes):
            self.windows.append(codes.clone())
            return decode(codes)

        def rec_prefill_audio(*args, **kwargs):
            self.restarts += 1
            return prefill_audio(*args, **kwargs)

        self.runner.decode_audio_launch, self.runner.tts_prefill_audio = rec_decode, rec_prefill_audio
        return self

    def __exit__(self, *exc) -> None:
        del self.runner.decode_audio_launch, self.runner.tts_prefill_audio

    @property
    def codes(self) -> torch.Tensor:
        return torch.cat(self.windows) if self.windows else torch.zeros(0, 4, dtype=torch.long)


def run(engine: Engine, make_stream) -> dict:
    with Recorded(engine) as rec:
        stream = make_stream(engine)
        chunks = list(stream)
    return {
        "pcm": np.concatenate([c.pcm for c in chunks]),
        "texts": [c.text for c in chunks],
        "reply": stream.metrics.reply_text,
        "llm_tokens": stream.metrics.llm_tokens,
        "tts_steps": stream.metrics.tts_steps,
        "codes": rec.codes,
        "restarts": rec.restarts,
    }


def assert_same(ref: dict, fast: dict) -> None:
    assert fast["reply"] == ref["reply"]
    assert fast["texts"] == ref["texts"]
    assert (fast["llm_tokens"], fast["tts_steps"]) == (ref["llm_tokens"], ref["tts_steps"])
    assert torch.equal(fast["codes"], ref["codes"]), "the fast path must sample the same audio codes"
    assert fast["pcm"].shape == ref["pcm"].shape
    np.testing.assert_allclose(fast["pcm"], ref["pcm"], atol=PCM_ATOL, rtol=0)


def assert_pools_idle(engine: Engine) -> None:
    runner = engine.runner
    assert runner.llm_pool.num_free == runner.llm_pool.size
    assert runner.tts_pool.num_free == runner.tts_pool.size
    assert engine.live_requests == 0


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_forced_reply_same_codes_and_waveform(engines, greedy):
    sampling = SamplingParams(greedy=greedy)
    ref, fast = (
        run(e, lambda e: e.stream("Hello!", seed=3, sampling=sampling, forced_reply=REPLY, forced_audio_seconds=4.0))
        for e in engines
    )
    assert len(ref["codes"]) > 100
    assert_same(ref, fast)
    assert_pools_idle(engines[1])


@pytest.mark.parametrize("greedy", [False, True], ids=["sampled", "greedy"])
def test_free_llm_same_tokens(engines, greedy):
    """No forcing: the LLM samples (repetition penalty, top-k, top-p) and the TTS ends on its own EOS."""
    sampling = SamplingParams(greedy=greedy, max_new_tokens=15)
    ref, fast = (run(e, lambda e: e.stream("Tell me a story.", seed=5, sampling=sampling)) for e in engines)
    assert 0 < ref["llm_tokens"] <= 15
    assert_same(ref, fast)


def test_segment_restart_same_output(engines):
    ref, fast = (
        run(e, lambda e: e.stream("Go on.", seed=2, forced_reply=LONG_REPLY, forced_audio_seconds=16.0))
        for e in engines
    )
    assert ref["restarts"] >= 1, "the long reply must restart the TTS segment"
    assert fast["restarts"] == ref["restarts"]
    assert_same(ref, fast)
    assert_pools_idle(engines[1])


def test_multi_turn_same_output_and_session_slot(engines):
    outs = []
    for engine in engines:
        session = engine.new_session()
        turns = []
        for text, reply in (("Hi!", REPLY), ("And now?", "Sure. Here is more.")):
            turns.append(
                run(
                    engine,
                    lambda e, t=text, r=reply, s=session: e.stream(
                        t, session=s, seed=4, forced_reply=r, forced_audio_seconds=2.0
                    ),
                )  # fmt: skip
            )
        if engine.config.path == "fast":
            pool = engine.runner.llm_pool
            assert pool.num_free == pool.size - 1, "an open session keeps its LLM slot between turns"
        engine.close_session(session)
        outs.append(turns)
    for ref, fast in zip(*outs, strict=True):
        assert_same(ref, fast)
    assert_pools_idle(engines[1])


def test_read_aloud_same_output(engines):
    text = " ".join(f"Part {i} of a text read aloud, with 23 apples and a dog." for i in range(18))
    ref, fast = (run(e, lambda e: e.read_aloud(text, seed=6, forced_audio_seconds=3.0)) for e in engines)
    assert_same(ref, fast)
    assert_pools_idle(engines[1])


def test_cancel_and_close_release_slots(engines):
    fast = engines[1]
    stream = fast.stream("Hello", seed=0, forced_reply=REPLY, forced_audio_seconds=8.0)
    next(stream)
    runner = fast.runner
    assert runner.llm_pool.num_free == runner.llm_pool.size - 1
    assert runner.tts_pool.num_free == runner.tts_pool.size - 1
    stream.close()
    assert_pools_idle(fast)


def test_busy_pools_raise_engine_busy(model):
    engine = Engine(model, EngineConfig(path="fast", max_concurrent_requests=2, max_sessions=1))
    session = engine.new_session()
    with pytest.raises(EngineBusy, match="LLM session caches are in use"):
        engine.stream("one", forced_reply="a", forced_audio_seconds=1.0)
    assert engine.live_requests == 0
    engine.close_session(session)
    list(engine.stream("two", forced_reply="b", forced_audio_seconds=1.0))
    runner = FastRunner(model, tts_slots=1, llm_slots=1)
    state = runner.new_tts_state()
    with pytest.raises(EngineBusy, match="TTS caches"):
        runner.new_tts_state()
    runner.release_tts_state(state)
    runner.release_tts_state(runner.new_tts_state())
    assert runner.tts_pool.num_free == 1


def test_reused_slot_reads_as_zeros(model):
    runner = FastRunner(model, tts_slots=1, llm_slots=1)
    state = runner.new_tts_state()
    for t in state.cache.ks:
        t.normal_()
    runner.release_tts_state(state)
    again = runner.new_tts_state()
    assert again.cache is state.cache
    assert not any(t.any() for t in (*again.cache.ks, *again.cache.vs))
    cache = runner.new_llm_cache()
    cache.vs[0].fill_(1.0)
    runner.release_llm_cache(cache)
    assert not any(t.any() for t in runner.new_llm_cache().vs)


def test_switch_validation(model):
    with pytest.raises(InvalidRequest, match="flash"):
        FastRunner(model, attention="flash")
    with pytest.raises(InvalidRequest, match="compile mode"):
        FastRunner(model, compile="fastest")
    with pytest.raises(InvalidRequest, match="attention"):
        FastRunner(model, attention="xformers")


def test_attention_switch_keeps_codes_on_cpu(model, engines):
    """The math backend (the one every device has) gives the reference's codes; the switch breaks nothing."""
    engine = Engine(model, EngineConfig(path="fast", attention="math", max_concurrent_requests=1))
    ref = run(engines[0], lambda e: e.stream("Hi", seed=9, forced_reply="Fine.", forced_audio_seconds=1.5))
    out = run(engine, lambda e: e.stream("Hi", seed=9, forced_reply="Fine.", forced_audio_seconds=1.5))
    assert torch.equal(out["codes"], ref["codes"])


def test_device_mask_matches_reference_rule(model):
    runner = FastRunner(model, llm_slots=1, tts_slots=1)
    cap = runner.tts_capacity
    for num_text in (3, 10, 57, 300):
        for pos in (302, 303, 350, 351, 352, 401, 402, 900, cap - 1):
            want = tts_audio_mask(pos, num_text, cap, pos + 1, "cpu")
            got = runner.tts_audio_mask(torch.tensor([pos]), torch.tensor([num_text]), runner.tts_keys)
            assert torch.equal(got, want), (pos, num_text)


def test_draw_is_multinomial_and_tensor_eos_ban_is_bool_ban():
    probs = torch.rand(4, 626).softmax(-1)
    probs[:, 7] = 0
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(20):
        assert torch.equal(torch.multinomial(probs, 1, generator=g1).squeeze(-1), draw(probs, g2))
    logits, temperature = torch.randn(4, 626) * 3, torch.tensor([[0.1], [0.3], [0.1], [0.3]])
    for ban in (True, False):
        kw = {"top_p": 0.7, "top_k": 20, "first_audio_step": False, "eos_id": 625, "greedy": False}
        a = sample_tts_codes(logits, temperature, ban_eos=ban, generator=torch.Generator().manual_seed(2), **kw)
        b = sample_tts_codes(logits, temperature, ban_eos=torch.tensor([ban]),
                             generator=torch.Generator().manual_seed(2), **kw)  # fmt: skip
        assert torch.equal(a, b)


def test_small_attention_buckets_same_output(model, engines, monkeypatch):
    """Attention reads the caches in buckets of positions; with tiny buckets a request crosses many of them."""
    from omnivox.engine import fast_runner

    monkeypatch.setattr(fast_runner, "LLM_BUCKET", 16)
    monkeypatch.setattr(fast_runner, "TTS_BUCKET", 32)
    engine = Engine(model, EngineConfig(path="fast", max_concurrent_requests=1))
    make = lambda e: e.stream("Hi there", seed=12, forced_reply=REPLY, forced_audio_seconds=3.0)  # noqa: E731
    assert_same(run(engines[0], make), run(engine, make))


def test_bucket():
    from omnivox.engine.graphs import bucket

    assert [bucket(n, 256, 2560) for n in (1, 256, 257, 2559, 2560, 9999)] == [256, 256, 512, 2560, 2560, 2560]


def test_fused_decoder_matches_the_modules(model):
    """FusedDecoder / FusedHeads (the bf16 GPU default) compute what the modules compute; fusing keeps the
    modules' values (their weights become views of the fused buffers)."""
    import copy

    from omnivox.engine.fused_linears import FusedDecoder, FusedHeads, fuse
    from omnivox.engine.kv_cache import StaticKVCache

    tts = copy.deepcopy(model.tts)
    stack, cfg = tts.model, tts.cfg
    x, positions = torch.randn(1, 1, cfg.hidden_size), torch.tensor([40])
    mask = (torch.arange(64) <= 40)[None, None, None]
    caches = [StaticKVCache(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim, 64, torch.float32, "cpu")
              for _ in range(2)]  # fmt: skip
    for c in caches:
        c.k[:, :, :, :40].normal_(generator=torch.Generator().manual_seed(0))
        c.v[:, :, :, :40].normal_(generator=torch.Generator().manual_seed(1))
    want_hidden = stack(x, positions, caches[0], mask)
    want_logits = tts.compute_logits(want_hidden)
    q_before = stack.layers[0].self_attn.q_proj.weight.clone()
    decoder, heads = FusedDecoder(stack), FusedHeads(tts.head_code)
    assert torch.equal(stack.layers[0].self_attn.q_proj.weight, q_before)
    assert stack.layers[0].self_attn.q_proj.weight.data_ptr() == decoder.qkv[0].weight.data_ptr()
    got_hidden = decoder(x, positions, caches[1], mask)
    torch.testing.assert_close(got_hidden, want_hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(heads(got_hidden), want_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caches[1].k, caches[0].k, atol=1e-5, rtol=1e-5)
    assert fuse(list(tts.head_code)) is heads.group, "fusing twice reuses the first fusion"


def test_fused_path_same_codes(model, engines):
    """With the fused decode forward forced on (it is off by default for fp32), a short request's codes match."""
    engine = Engine(model, runner=FastRunner(model, llm_slots=1, tts_slots=1, fused=True))
    make = lambda e: e.stream("Hi", seed=9, forced_reply="Fine, thanks.", forced_audio_seconds=1.5)  # noqa: E731
    ref, out = run(engines[0], make), run(engine, make)
    assert torch.equal(out["codes"], ref["codes"])
    assert out["reply"] == ref["reply"]


def test_compile_auto_resolves_per_device():
    from omnivox.engine.engine import resolve_compile

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", cpu) == "none"
    assert resolve_compile("auto", cuda) == "default"
    assert resolve_compile("auto", cuda, cuda_graphs=False) == "none"
    assert resolve_compile("max-autotune", cpu) == "max-autotune"
    model = build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)
    engine = Engine(model, EngineConfig(path="fast"))
    assert engine.runner.compile_mode == "none"


def test_engine_warm_up_captures_through_the_runner():
    model = build_dummy_model(tiny_config(), device="cpu", dtype=torch.float32, seed=0)
    calls = []

    class Counting(FastRunner):
        def warm_up(self, *args, **kwargs):
            calls.append(args)
            return super().warm_up(*args, **kwargs)

    Engine(model, EngineConfig(path="fast"), runner=Counting(model)).warm_up()
    assert calls == [()]
    Engine(model, EngineConfig(path="reference")).warm_up()  # the eager runner has nothing to capture: no error
