"""`omnivox loadtest` against a live tiny server: bench-schema results that `bench --compare` reads."""

from __future__ import annotations

import argparse
import math

from rich.console import Console

from omnivox.bench.capacity import PlaybackClock
from omnivox.bench.loadtest import format_summary, loadtest_main, run_loadtest
from omnivox.bench.report import compare_table
from omnivox.bench.results import read_results
from omnivox.bench.workloads import WorkloadItem

pytest_plugins = ("server_fixtures",)

ITEMS = [WorkloadItem("short", "Hello there, friend.", "", 1.0),
         WorkloadItem("warmup-like", "Hi, how are you?", "", 1.0)]


def test_playback_counts_underruns_from_the_first_chunk():
    p = PlaybackClock(sent_at=10.0)
    p.receive(24000, now=10.2)  # first second of audio: plays 10.2 .. 11.2
    p.receive(12000, now=11.0)  # in time
    p.receive(12000, now=11.9)  # the audio before it ran out at 11.7: an underrun
    p.receive(0, now=20.0)  # empty deltas are not chunks
    assert math.isclose(p.ttfb_s, 0.2) and p.underruns == 1 and p.audio_s == 2.0


def test_loadtest_speech_and_chat_results_compare(server, tmp_path):
    runs = {}
    for endpoint, rate in (("speech", None), ("chat", 50.0)):
        results = run_loadtest(server.url, concurrency=3, requests=6, rate=rate, endpoint=endpoint, items=ITEMS,
                               seed=1, max_tokens=24)
        assert results["schema"] == "omnivox.bench/1" and results["kind"] == "loadtest"
        summary = results["extra"]["summary"]
        assert summary["ok"] == 6 and summary["errors"] == {}, summary
        for key in ("ttfb_s", "rtf"):
            assert all(v is not None and v > 0 for v in summary[key].values()), summary
        assert summary["ttfb_s"]["p50"] <= summary["ttfb_s"]["p95"] <= summary["ttfb_s"]["p99"]
        for sample in results["samples"]:
            assert sample["audio_s"] > 0 and sample["ttfb_s"] > 0 and sample["rtf"] > 0
            assert isinstance(sample["underruns"], int) and sample["finish_reason"] == "eos"
            assert sample["generation_s"] > 0 and sample["stages"]["tts"] > 0  # server metrics came along
            assert sample["request_id"] and sample["prompt_id"] in ("short", "warmup-like")
        assert "TTFB" in format_summary(summary)
        runs[endpoint] = results

    out = tmp_path / "lt" / "results.json"
    args = argparse.Namespace(url=server.url, concurrency=2, requests=4, rate=None, endpoint="speech", out=str(out),
                              seed=0, max_tokens=None, workload=None)
    assert loadtest_main(args) == 0
    written = read_results(out)
    assert written["kind"] == "loadtest" and len(written["samples"]) == 4

    console = Console(record=True, width=200)
    console.print(compare_table(runs["speech"], written))
    assert "ttfb_s" in console.export_text()
    assert server.wait_idle()["live_requests"] == 0


def test_loadtest_records_errors_without_failing(server):
    results = run_loadtest(server.url, concurrency=1, requests=2, endpoint="speech",
                           items=[WorkloadItem("empty", "   ", "", 1.0)])
    summary = results["extra"]["summary"]
    assert summary["ok"] == 0 and summary["errors"] == {"HTTP 400": 2}
    assert all(s["finish_reason"] == "error" and "input is empty" in s["error"] for s in results["samples"])
