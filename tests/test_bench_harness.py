"""run_bench against a fake engine that follows the Engine API contract (docs/architecture.md, "Engine API")."""

import json

import numpy as np
import pytest

from omnivox.audio import read_wav
from omnivox.bench.harness import run_bench
from omnivox.bench.results import read_results
from omnivox.bench.workloads import WorkloadItem
from omnivox.engine.types import SAMPLE_RATE, AudioChunk, RequestMetrics
from omnivox.errors import GenerationFailed, InvalidRequest

ITEMS = [
    WorkloadItem("warmup", "Hi", "Hello there", 0.5),
    WorkloadItem("p1", "One", "Reply one", 1.0),
    WorkloadItem("p2", "Two", "Reply two", 0.25),
]


class FakeStream:
    """Yields `seconds` of audio in 0.1 s chunks; metrics complete once exhausted or closed."""

    def __init__(self, request_id: str, seconds: float, fail_after: int | None = None):
        self.metrics = RequestMetrics(request_id=request_id)
        self.samples = round(seconds * SAMPLE_RATE)
        self.fail_after = fail_after
        self.closed = False

    def __iter__(self):
        step, sent, index = SAMPLE_RATE // 10, 0, 0
        while sent < self.samples:
            if self.fail_after is not None and index == self.fail_after:
                raise GenerationFailed("device fell over")
            n = min(step, self.samples - sent)
            sent += n
            if index == 0:
                self.metrics.ttfb_s = 0.01
            yield AudioChunk(np.full(n, 0.25, np.float32), "x", index, sent / SAMPLE_RATE, 0.01 * (index + 1),
                             is_last=sent == self.samples)
            index += 1
        self.metrics.audio_s = sent / SAMPLE_RATE
        self.metrics.total_s = 0.01 * index
        self.metrics.stages.update(llm=0.002, tts=0.003, audio=0.001)
        self.metrics.llm_tokens, self.metrics.tts_steps, self.metrics.finish_reason = 3, 10, "eos"

    def close(self):
        self.closed = True
        self.metrics.finish_reason = self.metrics.finish_reason or "cancelled"


class FakeEngine:
    def __init__(self, fail_request: str | None = None):
        self.calls: list[dict] = []
        self.streams: list[FakeStream] = []
        self.fail_request = fail_request

    def stream(self, text, history=None, session=None, seed=None, sampling=None, forced_reply=None,
               forced_audio_seconds=None, request_id=""):
        if not text:
            raise InvalidRequest("empty text")
        self.calls.append(dict(text=text, seed=seed, forced_reply=forced_reply,
                               forced_audio_seconds=forced_audio_seconds, request_id=request_id))
        seconds = forced_audio_seconds if forced_audio_seconds is not None else 0.3
        s = FakeStream(request_id, seconds, fail_after=1 if request_id == self.fail_request else None)
        self.streams.append(s)
        return s


def test_warmup_excluded_trials_times_items_and_wavs(tmp_path):
    engine = FakeEngine()
    results = run_bench(engine, ITEMS, trials=2, out_dir=tmp_path, seed=10, dummy_weights=True, progress=False,
                        config={"name": "fake"})
    assert engine.calls[0]["request_id"] == "warmup"  # warm-up first...
    assert [s["request_id"] for s in results["samples"]] == ["t0-p1", "t0-p2", "t1-p1", "t1-p2"]  # ...never sampled
    assert [c["seed"] for c in engine.calls[1:]] == [10, 11, 1010, 1011]
    assert [(s["prompt_id"], s["trial"]) for s in results["samples"]] == [("p1", 0), ("p2", 0), ("p1", 1), ("p2", 1)]
    assert engine.calls[1]["forced_reply"] == "Reply one" and engine.calls[1]["forced_audio_seconds"] == 1.0
    assert results["dummy_weights"] is True and results["config"]["name"] == "fake"
    assert results["config"]["trials"] == 2 and results["extra"]["warmup"]["prompt_id"] == "warmup"
    for item, seconds in (("p1", 1.0), ("p2", 0.25)):
        for trial in (0, 1):
            pcm, rate = read_wav(tmp_path / "wav" / f"{item}-t{trial}.wav")
            assert rate == SAMPLE_RATE and len(pcm) == round(seconds * SAMPLE_RATE)
            assert np.allclose(pcm, 0.25, atol=1e-4)
    assert not (tmp_path / "wav" / "warmup-t0.wav").exists()
    assert sorted(p.name for p in (tmp_path / "wav").iterdir()) == ["p1-t0.wav", "p1-t1.wav", "p2-t0.wav",
                                                                    "p2-t1.wav"]
    assert read_results(tmp_path / "results.json") == json.loads(json.dumps(results))
    assert results["samples"][0]["audio_s"] == 1.0 and results["samples"][0]["rtf"] == pytest.approx(0.1)


def test_real_weights_do_not_force_the_reply():
    engine = FakeEngine()
    results = run_bench(engine, ITEMS, trials=1, out_dir=None, dummy_weights=False, progress=False)
    assert all(c["forced_reply"] is None and c["forced_audio_seconds"] is None for c in engine.calls)
    assert len(results["samples"]) == 2 and results["dummy_weights"] is False


def test_without_warmup_item_the_first_item_warms_up():
    engine = FakeEngine()
    results = run_bench(engine, ITEMS[1:], trials=1, progress=False)
    assert [c["request_id"] for c in engine.calls] == ["warmup", "t0-p1", "t0-p2"]
    assert results["config"]["warmup_id"] == "p1" and len(results["samples"]) == 2


def test_failed_request_becomes_error_sample_and_stream_is_closed(tmp_path):
    engine = FakeEngine(fail_request="t0-p1")
    results = run_bench(engine, ITEMS, trials=1, out_dir=tmp_path, dummy_weights=True, progress=False)
    failed, ok = results["samples"]
    assert failed["error"].startswith("GenerationFailed") and failed["finish_reason"] == "error"
    assert "error" not in ok
    assert engine.streams[1].closed
    assert not (tmp_path / "wav" / "p1-t0.wav").exists() and (tmp_path / "wav" / "p2-t0.wav").exists()


def test_failed_warmup_stops_the_run():
    with pytest.raises(GenerationFailed):
        run_bench(FakeEngine(fail_request="warmup"), ITEMS, trials=1, dummy_weights=True, progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="trials"):
        run_bench(FakeEngine(), ITEMS, trials=0, progress=False)
    with pytest.raises(ValueError, match="no items besides the warm-up"):
        run_bench(FakeEngine(), ITEMS[:1], trials=1, progress=False)


def test_engine_warm_up_runs_once_before_any_request():
    class WarmingEngine(FakeEngine):
        def warm_up(self):
            self.calls.append({"request_id": "<graphs>"})

    engine = WarmingEngine()
    run_bench(engine, ITEMS, trials=1, progress=False)
    assert [c["request_id"] for c in engine.calls] == ["<graphs>", "warmup", "t0-p1", "t0-p2"]


def test_batch_bench_steps_and_profile_run_on_the_tiny_model(tmp_path):
    """`batch_bench --parts steps,profile`: a step time per stage and batch size, and each stage's op table."""
    import json

    from omnivox.bench import batch_bench

    assert batch_bench.main(["--out", str(tmp_path), "--parts", "steps,profile", "--batches", "1,2",
                             "--repeats", "2"]) == 0
    results = json.loads((tmp_path / "batch_bench.json").read_text())
    assert [r["batch"] for r in results["steps"]] == [1, 2]
    assert all(r[k] > 0 for r in results["steps"] for k in ("llm_ms", "tts_ms", "vocoder_ms", "prefill_ms"))
    assert set(results["profile"]) == {f"{stage}@{b}" for stage in ("llm", "tts", "vocoder") for b in (1, 2)}
    ops = results["profile"]["tts@2"]["kernels"]
    assert results["profile"]["tts@2"]["kernel_ms"] > 0 and all(k["calls"] > 0 for k in ops)
    assert any("mm" in k["kernel"] or "linear" in k["kernel"] for k in ops), "the step's products are listed"
