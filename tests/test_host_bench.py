"""The host-time benchmark: with the device stubbed out the loop still serves every stream, and the benchmark says
where the loop's host time goes."""

from __future__ import annotations

import asyncio
import math

import pytest

from omnivox.bench.host_bench import keep_live, stub_device
from omnivox.engine.engine import Engine, EngineConfig


def test_host_bench_serves_streams_with_the_device_stubbed_and_reports_the_loop(model):
    engine = Engine(model, config=EngineConfig(max_concurrent_requests=4))
    engine.scheduler.config.ahead_limit_s = math.inf
    stub_device(engine)
    result = asyncio.run(keep_live(engine, streams=4, seconds=1.5, warmup_s=0.5))
    assert result["iterations"] > 10 and result["live_mean"] > 1
    parts = result["ms_per_iteration"]
    assert {"advance", "tts", "audio"} <= set(parts) and all(ms >= 0 for ms in parts.values())
    assert math.isclose(result["ms_per_iteration_total"], sum(parts.values()))
    assert result["mean_rows"]["tts"] >= 1 and result["mean_rows"]["vocoder"] >= 1
    assert engine.wait_idle(10.0) and engine.scheduler.live == [], "every stream ended when the benchmark did"


def test_host_bench_reports_a_failing_stream_rather_than_figures(model):
    engine = Engine(model, config=EngineConfig(max_concurrent_requests=2))
    engine.scheduler.config.ahead_limit_s = math.inf
    stub_device(engine)

    def broken_step(*_, **__):
        raise ValueError("broken step")

    engine.tts._step = broken_step
    with pytest.raises(ValueError, match="broken step"):
        asyncio.run(keep_live(engine, streams=2, seconds=1.5, warmup_s=0.2))


def test_host_bench_writes_a_results_document(tmp_path):
    from omnivox.bench.host_bench import main
    from omnivox.bench.results import read_results

    main(["--streams", "2", "--seconds", "0.5", "--warmup", "0.2", "--out", str(tmp_path)])
    results = read_results(tmp_path / "host_bench.json")
    assert results["kind"] == "host" and results["config"]["streams"] == 2
    assert results["extra"]["iterations"] > 0 and "gen2" in results["extra"]["gc_pauses"]


def test_host_bench_with_the_device_and_the_loop_profiled(tmp_path):
    """With the step bodies kept (the tiny model on the CPU) the loop serves the streams for real, and the profile
    names the loop's own functions."""
    from omnivox.bench.host_bench import main
    from omnivox.bench.results import read_results

    main(["--streams", "2", "--seconds", "0.8", "--warmup", "0.3", "--with-device", "--profile", "15",
          "--out", str(tmp_path)])
    extra = read_results(tmp_path / "host_bench.json")["extra"]
    assert extra["iterations"] > 0 and extra["mean_rows"]["tts"] >= 1
    assert "scheduler.py" in extra["profile"] and "(step)" in extra["profile"]
