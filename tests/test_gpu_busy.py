"""The device-busy report: unions, overlap and idle time from kernel intervals, and the harness run end to end on
the tiny model (a CPU records no kernels, but the load, the window and the loop's figures are real)."""

import json

import pytest

from omnivox.bench.gpu_busy import Kernel, busy_report, main


def test_busy_time_is_the_union_over_streams_and_overlap_counts_two_at_once():
    kernels = [Kernel(1, 0, 10, "gemm"), Kernel(1, 5, 15, "gemm"), Kernel(1, 30, 32, "softmax"),
               Kernel(2, 10, 20, "conv"), Kernel(2, 20, 25, "conv")]
    r = busy_report(kernels, window_us=40, names={1: "loop"})
    assert r["window_ms"] == pytest.approx(0.040)
    assert r["busy_ms"] == pytest.approx(0.027)  # [0, 25] and [30, 32]
    assert r["overlap_ms"] == pytest.approx(0.005)  # [10, 15]
    assert r["idle_ms"] == pytest.approx(0.013)
    loop, other = r["streams"]["loop"], r["streams"]["stream 2"]
    assert (loop["kernels"], other["kernels"]) == (3, 2)
    assert loop["busy_ms"] == pytest.approx(0.017) and other["busy_ms"] == pytest.approx(0.015)
    assert [k["kernel"] for k in loop["top"]] == ["gemm", "softmax"]
    assert loop["top"][0]["ms"] == pytest.approx(0.020) and loop["top"][0]["calls"] == 2  # per kernel name


def test_kernels_that_touch_are_one_busy_stretch_and_no_kernels_is_all_idle():
    r = busy_report([Kernel(3, 0, 5, "a"), Kernel(4, 5, 9, "b")], window_us=10)
    assert r["busy_ms"] == pytest.approx(0.009) and r["overlap_ms"] == 0
    empty = busy_report([], window_us=2000)
    assert empty["busy_ms"] == 0 and empty["idle_ms"] == pytest.approx(2.0) and empty["streams"] == {}


def test_the_harness_serves_poisson_chats_and_reports_the_loop_over_its_window(tmp_path):
    main(["--rate", "3", "--warmup", "1.5", "--trace-seconds", "1.0", "--max-streams", "16", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "gpu_busy.json").read_text())
    assert doc["kind"] == "gpu_busy"
    (run,) = doc["extra"]["runs"]
    assert run["rate"] == 3 and run["window_ms"] >= 1000
    assert run["iterations_per_s"] > 0 and run["live_mean"] > 0
    assert run["batches_per_s"]["tts"] > 0 and run["mean_rows"]["tts"] >= 1
    assert run["streams"] == {} and run["busy_ms"] == 0  # no device kernels on a CPU
