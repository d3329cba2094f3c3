"""The capacity benchmark: its arithmetic on synthetic clocks, the `omnivox` request field on a live tiny server,
and a short sweep end to end (table, JSON, PNG)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from rich.console import Console

from omnivox import cli
from omnivox.bench.capacity import (
    PlaybackClock,
    failures,
    headline,
    poisson_arrivals,
    server_profile,
    streams_playing,
    summarize_rate,
)
from omnivox.bench.capacity_client import _answer, _gpu_memory, deal, metric_series, request_for
from omnivox.bench.capacity_report import capacity_table, headline_text, loop_table, milestone_table, plot_capacity
from omnivox.bench.results import build_results, read_results
from omnivox.bench.streamed_reply import audio_of
from omnivox.cli import main
from omnivox.engine.types import SAMPLE_RATE
from omnivox.server.app import build_app
from omnivox.server.serving import ServerConfig
from omnivox.workload import WorkloadItem

pytest_plugins = ("server_fixtures",)

SR = SAMPLE_RATE
ITEMS = [WorkloadItem("a", "Tell me a joke.", "Why did the chicken cross the road?", 0.6),
         WorkloadItem("b", "What time is it?", "It is late.", 0.9)]
CHAT = {"modalities": ["text", "audio"], "audio": {"voice": "default", "format": "pcm16"}, "stream": True}


# ------------------------------------------------------------------------------------------------ arrivals


def test_poisson_arrivals_are_seeded_open_loop_and_flag_the_warmup():
    a = poisson_arrivals(40.0, duration_s=20.0, warmup_s=5.0, items=ITEMS, endpoint="mix", seed=3)
    assert a == poisson_arrivals(40.0, duration_s=20.0, warmup_s=5.0, items=ITEMS, endpoint="mix", seed=3)
    assert [x.at_s for x in a] != [x.at_s for x in poisson_arrivals(40.0, 20.0, 5.0, ITEMS, "mix", seed=4)]
    times = np.array([x.at_s for x in a])
    assert np.all(np.diff(times) > 0) and 0 < times[0] and times[-1] < 25.0
    assert all(x.warmup == (x.at_s < 5.0) for x in a)
    # 1000 expected arrivals: a Poisson count is within 5 standard deviations (5 * sqrt(1000) = 158)
    assert abs(len(a) - 1000) < 158
    gaps = np.diff(times)  # exponential gaps: mean 1/rate, standard deviation = mean
    assert math.isclose(gaps.mean(), 1 / 40, rel_tol=0.15) and math.isclose(gaps.std(), 1 / 40, rel_tol=0.15)
    assert {x.endpoint for x in a} == {"chat", "speech"} and {x.item.id for x in a} == {"a", "b"}
    assert {x.endpoint for x in poisson_arrivals(5.0, 4.0, 0.0, ITEMS, "speech", 0)} == {"speech"}
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0.0, 1.0, 0.0, ITEMS)


# ------------------------------------------------------------------------------------- playback clocks


def test_playback_clock_ttfa_is_the_first_audible_chunk_and_a_stall_counts_once():
    clock = PlaybackClock(sent_at=100.0)
    clock.receive(SR // 2, audible=False, now=100.1)  # 0.5 s of silence: playback starts, not yet audible
    clock.receive(SR // 2, audible=True, now=100.3)  # in time (plays 100.6 .. 101.1)
    clock.receive(SR, audible=True, now=101.5)  # late by 0.4 s: the player stalled
    clock.receive(SR, audible=True, now=101.9)  # in time after the resume (plays 102.5 .. 103.5)
    clock.receive(0, audible=False, now=120.0)  # an empty event is not a chunk
    assert math.isclose(clock.ttfb_s, 0.1) and math.isclose(clock.ttfa_s, 0.3)
    assert clock.underruns == 1 and math.isclose(clock.stall_s, 0.4) and clock.audio_s == 3.0
    assert np.allclose(clock.segments, [[100.1, 101.1], [101.5, 103.5]])
    assert math.isclose(clock.min_slack_s, -0.4), "the least audio queued when a chunk came: the stall, negative"
    assert math.isnan(PlaybackClock(0.0).ttfa_s)
    smooth = PlaybackClock(0.0)
    for at in (0.1, 0.4, 0.7):
        smooth.receive(SR // 2, now=at)  # each half second arrives 0.2 s before the audio queued runs out
    assert math.isclose(smooth.min_slack_s, 0.2) and smooth.underruns == 0
    assert PlaybackClock(0.0).min_slack_s == math.inf, "no second chunk: no slack measured"


def test_streams_playing_mean_and_peak_on_a_fake_clock():
    clocks = []
    for sent, arrivals in ((0.0, [(1.0, 2.0)]),  # plays 1 .. 3
                           (0.0, [(2.0, 1.0), (4.0, 1.0)]),  # plays 2 .. 3, stalls, 4 .. 5
                           (0.0, [(3.0, 4.0)])):  # plays 3 .. 7: starts as the first two end
        clock = PlaybackClock(sent)
        for at, seconds in arrivals:
            clock.receive(int(seconds * SR), audible=True, now=at)
        clocks.append(clock)
    segments = [seg for c in clocks for seg in c.segments]
    mean, peak = streams_playing(segments, 0.0, 8.0)
    assert math.isclose(mean, (2 + 1 + 1 + 4) / 8) and peak == 2  # at 3.0 two end as one starts: never 3
    mean, peak = streams_playing(segments, 2.5, 4.5)  # clipped: 0.5 + 0.5 + 0.5 + 1.5 of playing
    assert math.isclose(mean, 3.0 / 2.0) and peak == 2
    assert streams_playing([], 0.0, 1.0) == (0.0, 0)


# ----------------------------------------------------------------------------------------- pass / fail


def _sample(ttfa: float, chunks: list[tuple[float, float]], **extra) -> dict:
    """A measured request sent at 0 whose chunks (arrival time, seconds of audio) all hold sound."""
    clock = PlaybackClock(0.0)
    for at, seconds in chunks:
        clock.receive(int(seconds * SR), audible=True, now=at)
    assert math.isclose(clock.ttfa_s, ttfa)
    return {"ttfa_s": clock.ttfa_s, "rtf": 0.5, "audio_s": clock.audio_s, "underruns": clock.underruns,
            "segments": clock.segments, "finish_reason": "eos", "warmup": False,
            "min_slack_s": clock.min_slack_s if math.isfinite(clock.min_slack_s) else None, **extra}


def test_a_late_chunk_an_error_or_an_incomplete_reply_fails_the_rate():
    good = [_sample(0.1, [(0.1, 1.0), (0.9, 1.0)]) for _ in range(5)]
    ok = summarize_rate(good, 1.0, (0.0, 3.0))
    assert ok["requests"] == ok["completed"] == 5 and failures(ok, 0.3) == []

    assert math.isclose(ok["min_slack_p5_s"], 0.2), "every reply's second chunk came 0.2 s before it was due"

    late = good[:4] + [_sample(0.1, [(0.1, 1.0), (1.2, 1.0)])]  # arrives 0.1 s after the first second ran out
    s = summarize_rate(late, 1.0, (0.0, 3.0))
    assert s["underruns"] == 1 and s["requests_with_underruns"] == 1
    assert s["min_slack_p5_s"] < 0, "the late reply pulls the 5th percentile below zero"
    assert failures(s, 0.3) == ["1 underruns in 1 requests"]

    errored = good[:4] + [{"ttfa_s": None, "rtf": None, "audio_s": 0.0, "underruns": 0, "segments": [],
                           "finish_reason": "error", "error": "HTTP 429: busy", "warmup": False}]
    s = summarize_rate(errored, 1.0, (0.0, 3.0))
    assert s["errors"] == 1 and s["error_kinds"] == {"HTTP 429": 1} and failures(s, 0.3) == ["1 errors"]

    cut = good[:4] + [_sample(0.1, [(0.1, 1.0)], finish_reason="cancelled")]
    assert failures(summarize_rate(cut, 1.0, (0.0, 3.0)), 0.3) == ["1 replies incomplete"]

    slow = good[:4] + [_sample(0.5, [(0.5, 1.0)])]
    assert failures(summarize_rate(slow, 1.0, (0.0, 3.0)), 0.3)[0].startswith("p95 TTFA")
    assert failures(summarize_rate(slow, 1.0, (0.0, 3.0)), 0.6) == []

    warm = good + [{**_sample(0.9, [(0.9, 1.0), (5.0, 1.0)]), "warmup": True, "error": "HTTP 500: x"}]
    s = summarize_rate(warm, 1.0, (0.0, 3.0))  # a warm-up request counts for streams playing only
    assert s["requests"] == 5 and failures(s, 0.3) == [] and s["streams_playing_peak"] == 6


def test_first_audio_milestones_per_rate_in_request_order():
    ways = [{"admitted": 0.01 * i, "decoding": 0.1 * i, "text": 0.2 * i, "speaking": 0.3 * i, "audio": 0.4 * i}
            for i in range(1, 21)]
    samples = [_sample(0.5, [(0.5, 1.0)], first_audio_milestones={k: ways[i][k] for k in reversed(list(ways[i]))})
               for i in range(20)]
    samples.append(_sample(0.5, [(0.5, 1.0)], first_audio_milestones={"admitted": 0.0, "speaking": 0.05,
                                                                      "audio": 0.1}))  # read aloud: no LLM
    samples.append({**_sample(0.5, [(0.5, 1.0)], first_audio_milestones={"audio": 99.0}), "error": "HTTP 500: x"})
    s = summarize_rate(samples, 2.0, (0.0, 3.0))
    got = s["first_audio_milestones_s"]
    assert list(got) == ["admitted", "decoding", "text", "speaking", "audio"], "the order a request reaches them"
    speaking = [0.3 * i for i in range(1, 21)] + [0.05]
    assert got["speaking"] == {"p50": float(np.percentile(speaking, 50)), "p95": float(np.percentile(speaking, 95))}
    assert got["audio"]["p95"] < 99.0, "a failed reply is left out"
    assert summarize_rate([_sample(0.5, [(0.5, 1.0)])], 2.0, (0.0, 3.0))["first_audio_milestones_s"] == {}
    config = {"endpoint": "chat", "duration_s": 3.0, "warmup_s": 0.0, "ttfa_bound_s": 1.0}
    results = build_results([], config, kind="capacity", extra={"rates": [{**s, "passed": True, "failures": []}],
                                                                "headline": None})
    console = Console(record=True, width=150)
    console.print(milestone_table(results))
    row = [line for line in console.export_text().splitlines() if line.startswith("│")][-1]
    assert [c.strip() for c in row.strip("│").split("│")][0] == "2"
    assert f"{1000 * got['audio']['p50']:.0f} / {1000 * got['audio']['p95']:.0f}" in row
    assert milestone_table(build_results([], config, kind="capacity", extra={
        "rates": [summarize_rate([_sample(0.5, [(0.5, 1.0)])], 2.0, (0.0, 3.0))], "headline": None})) is None


def test_headline_table_and_plot_from_synthetic_results(tmp_path):
    summaries = []
    for rate, ttfa in ((1.0, 0.1), (2.0, 0.2), (4.0, 0.5)):
        s = summarize_rate([_sample(ttfa, [(ttfa, 1.0)]) for _ in range(4)], rate, (0.0, 2.0))
        s.update(passed=not failures(s, 0.3), failures=failures(s, 0.3),
                 gpu_memory={"gpu_allocated_bytes": 3 * 2**30, "gpu_reserved_bytes": 4 * 2**30})
        summaries.append(s)
    assert headline(summaries)["rate"] == 2.0 and headline(summaries[2:]) is None
    config = {"endpoint": "chat", "duration_s": 2.0, "warmup_s": 0.0, "ttfa_bound_s": 0.3}
    results = build_results([], config, kind="capacity", extra={"rates": summaries, "headline": headline(summaries),
                                                                "skipped_rates": [8.0]})
    console = Console(record=True, width=250)
    console.print(capacity_table(results))
    text = console.export_text()
    assert "fail: p95 TTFA 500 ms > 300 ms" in text and "3.0/4.0" in text and "not run: 8 (stopped)" in text
    assert headline_text(results).startswith("capacity: 2 requests/s with 2.0 streams playing")
    png = plot_capacity(results, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_memory_is_read_from_the_metrics_gauges():
    text = ("# TYPE omnivox_gpu_memory_allocated_bytes gauge\nomnivox_gpu_memory_allocated_bytes 1.5e+09\n"
            "# TYPE omnivox_streams_active gauge\nomnivox_streams_active 3.0\n")
    assert _gpu_memory(metric_series(text)) == {"gpu_allocated_bytes": 1.5e9}


def _metrics_text(iterations: float, loop_s: dict[str, float], llm: tuple[float, float],
                  tts: tuple[float, float] | None, waiting: int) -> str:
    """/metrics as omnivox.server.metrics renders it: loop gauges, batch-size histograms (count, sum), queues."""
    lines = ["# HELP omnivox_loop_iterations Engine loop iterations since start-up",
             "# TYPE omnivox_loop_iterations gauge", f"omnivox_loop_iterations {iterations}",
             "# TYPE omnivox_loop_seconds gauge"]
    lines += [f'omnivox_loop_seconds{{part="{part}"}} {seconds}' for part, seconds in loop_s.items()]
    for stage, histogram in (("llm", llm), ("tts", tts)):
        if histogram is None:  # a server without this stage's histogram
            continue
        count, rows = histogram
        lines += [f"# TYPE omnivox_{stage}_batch_size histogram",
                  f'omnivox_{stage}_batch_size_bucket{{le="8.0"}} {count}',
                  f'omnivox_{stage}_batch_size_bucket{{le="+Inf"}} {count}',
                  f"omnivox_{stage}_batch_size_count {count}", f"omnivox_{stage}_batch_size_sum {rows}",
                  f"omnivox_{stage}_batch_size_created 1.7e+09"]
    lines += ["# TYPE omnivox_scheduler_waiting gauge", f'omnivox_scheduler_waiting{{work="tts_step"}} {waiting}',
              "# TYPE omnivox_stream_buffered_seconds gauge", 'omnivox_stream_buffered_seconds{stat="min"} 0.4']
    return "\n".join(lines) + "\n"


def test_server_profile_is_the_difference_of_two_scrapes():
    before = metric_series(_metrics_text(1000.0, {"advance": 1.0, "tts": 2.0}, (50.0, 300.0), (10.0, 10.0), 3))
    after = metric_series(_metrics_text(1200.0, {"advance": 1.2, "tts": 3.0, "audio": 0.5}, (80.0, 540.0),
                                        (10.0, 10.0), 5))
    profile = server_profile(before, after, 2.0)
    assert profile["window_s"] == 2.0 and profile["iterations_per_s"] == pytest.approx(100.0)  # 200 in 2 s
    # ms per iteration: 0.2 s / 200 = 1 ms; "audio" first ran in the window: it counts from zero
    assert profile["loop_ms_per_iteration"] == pytest.approx({"advance": 1.0, "tts": 5.0, "audio": 2.5})
    assert profile["batches"]["llm"] == pytest.approx({"per_s": 15.0, "mean_rows": 8.0})  # 30 batches, 240 rows
    assert profile["batches"]["tts"] == {"per_s": 0.0, "mean_rows": None}
    assert profile["at_end"] == {"waiting": {"tts_step": 5.0}, "buffered_s": {"min": 0.4}}
    assert server_profile(after, before, 2.0) is None, "counts going backwards: the server restarted"


def test_server_profile_leaves_out_what_the_server_does_not_expose():
    before = metric_series(_metrics_text(10.0, {}, (0.0, 0.0), None, 0))
    after = metric_series(_metrics_text(10.0, {}, (4.0, 8.0), None, 0))
    profile = server_profile(before, after, 4.0)  # no loop time reported, no iteration, no tts histogram
    assert profile["iterations_per_s"] == 0.0 and "loop_ms_per_iteration" not in profile
    assert set(profile["batches"]) == {"llm"} and profile["batches"]["llm"] == {"per_s": 1.0, "mean_rows": 2.0}
    old = metric_series("# TYPE omnivox_streams_active gauge\nomnivox_streams_active 3.0\n")
    assert server_profile(old, old, 1.0) == {"window_s": 1.0}
    assert server_profile(before, after, 0.0) is None


def test_engine_loop_table_fits_150_columns():
    profile = server_profile(
        metric_series(_metrics_text(1000.0, {"advance": 1.0, "tts": 2.0}, (50.0, 300.0), (10.0, 10.0), 3)),
        metric_series(_metrics_text(1200.0, {"advance": 1.2, "tts": 3.0, "audio": 0.5, "await_speech": 0.1,
                                             "relaunch_llm": 0.05, "wait_llm": 0.01}, (80.0, 540.0), (90.0, 1000.0),
                                    1)), 2.0)
    summaries = []
    for rate, ttfa in ((1.0, 0.1), (12.0, 0.2)):
        s = summarize_rate([_sample(ttfa, [(ttfa, 1.0)]) for _ in range(4)], rate, (0.0, 2.0))
        s.update(passed=True, failures=[], server_profile=profile if rate > 1 else None)
        summaries.append(s)
    config = {"endpoint": "chat", "duration_s": 2.0, "warmup_s": 0.0, "ttfa_bound_s": 0.3}
    results = build_results([], config, kind="capacity", extra={"rates": summaries, "headline": None})
    console = Console(record=True, width=150)
    console.print(capacity_table(results))
    text = console.export_text()
    loop = text[text.index("engine loop per rate"):]
    rows = [line for line in loop.splitlines() if line.startswith("│")]
    assert len(rows) == 1 and rows[0].startswith("│     12 │"), "the rate without a profile has no row"
    # 100 iterations/s, 9.3 ms per iteration: tts 5, audio 2.5 ... wait_llm in "other"; llm 15 batches/s of 8 rows,
    # tts 80 batches of 990 rows in 2 s; no vocoder or prefill histogram
    cells = [cell.strip() for cell in rows[0].strip("│").split("│")]
    assert cells == ["12", "100", "9.30", "5.00", "2.50", "1.00", "0.50", "0.25", "0.05", "15.0 × 8.0",
                     "40.0 × 12.4", "—", "—"]
    assert "await\nspeech" in [str(column.header) for column in loop_table(results).columns]
    assert max(map(len, text.splitlines())) <= 150
    assert loop_table({"extra": {"rates": summaries[:1]}}) is None, "no rate profiled: no second table"


# ------------------------------------------------------------------------------ the `omnivox` request field


def _pcm_seconds(response: httpx.Response) -> tuple[float, str]:
    """Seconds of audio and the transcript of an SSE reply (chat or speech)."""
    samples, transcript = 0, ""
    for line in response.iter_lines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            samples += len(audio_of(event)) // 2
            for choice in event.get("choices") or ():
                transcript += ((choice.get("delta") or {}).get("audio") or {}).get("transcript") or ""
    return samples / SR, transcript


def test_forced_reply_and_length_are_honoured_with_random_weights(server):
    reply = "Forced words from the client."
    body = {**CHAT, "messages": [{"role": "user", "content": "Anything at all?"}], "seed": 1,
            "omnivox": {"forced_reply": reply, "audio_seconds": 0.7}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        seconds, transcript = _pcm_seconds(response)
    assert abs(seconds - 0.7) <= 2 * 512 / SR and transcript.strip() == reply
    speech = {"input": "Read this.", "response_format": "pcm", "stream_format": "sse",
              "omnivox": {"audio_seconds": 1.3}}
    with httpx.stream("POST", server.url + "/v1/audio/speech", json=speech, timeout=60) as response:
        assert response.status_code == 200
        seconds, _ = _pcm_seconds(response)
    assert abs(seconds - 1.3) <= 2 * 512 / SR
    for bad, param in (({"forced_reply": "x"}, "omnivox"),  # speech speaks its input
                       ({"audio_seconds": 0}, "omnivox.audio_seconds"), ({"audio_second": 2}, "omnivox.audio_second")):
        r = httpx.post(server.url + "/v1/audio/speech", json={"input": "Hi.", "omnivox": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert server.wait_idle()["live_requests"] == 0


def test_forced_fields_are_refused_with_real_weights(server_engine, server_factory):
    with server_factory(build_app(server_engine, ServerConfig(dummy_weights=False, warmup=False))) as live:
        live.wait_ready()
        assert httpx.get(live.url + "/readyz").json()["engine"]["random_weights"] is False
        chat = {**CHAT, "messages": [{"role": "user", "content": "Hi"}], "omnivox": {"audio_seconds": 1.0}}
        for path, body in (("/v1/chat/completions", chat),
                           ("/v1/audio/speech", {"input": "Hi.", "omnivox": {"audio_seconds": 1.0}})):
            r = httpx.post(live.url + path, json=body)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "omnivox" and "random weights" in error["message"]
        assert server_engine.stats()["live_requests"] == 0  # refused before any engine work


# ------------------------------------------------------------------------------------------ end to end


def client_processes_running() -> list[int]:
    """This process's children running the capacity client program (from /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"omnivox.bench.capacity_client" in cmdline:
            found.append(int(proc.name))
    return found


def test_sweep_against_a_live_server_writes_table_json_and_plot(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli.console, "width", 250)
    workload = tmp_path / "short.jsonl"
    workload.write_text("".join(json.dumps({"id": i.id, "prompt": i.prompt, "reply": i.reply,
                                            "audio_seconds": i.audio_seconds}) + "\n" for i in ITEMS))
    out, png = tmp_path / "cap" / "results.json", tmp_path / "cap.png"
    # a bound no reply can meet makes every rate fail, deterministically: two rates run, the third is skipped; two
    # client processes share each rate's arrivals
    argv = ["capacity", "--url", server.url, "--sweep", "4,1,2", "--duration", "1.5", "--warmup", "0.5",
            "--workload", str(workload), "--endpoint", "mix", "--seed", "5", "--ttfa-bound", "0.001",
            "--out", str(out), "--plot", str(png), "--client-processes", "2"]
    assert main(argv) == 0
    assert not client_processes_running(), "the client processes outlived the sweep"
    printed = capsys.readouterr().out
    assert "verdict" in printed and "capacity: no rate passed" in printed and "engine loop per rate" in printed

    results = read_results(out)
    assert results["kind"] == "capacity" and results["dummy_weights"] is True
    assert results["config"]["client_processes"] == 2
    rates = results["extra"]["rates"]
    assert [r["rate"] for r in rates] == [1.0, 2.0] and results["extra"]["skipped_rates"] == [4.0]
    assert results["extra"]["stop_reason"] == "2 rates failed" and results["extra"]["interrupted_rate"] is None
    assert all(not r["passed"] and any(f.startswith("p95 TTFA") for f in r["failures"]) for r in rates)
    for r in rates:
        expected = poisson_arrivals(r["rate"], 1.5, 0.5, ITEMS, "mix", seed=5)
        samples = [s for s in results["samples"] if s["rate"] == r["rate"]]
        assert [s["scheduled_s"] for s in samples] == pytest.approx([a.at_s for a in expected])
        assert [s["seed"] for s in samples] == [5 + i for i in range(len(expected))], "arrival order, own seeds"
        assert r["requests"] == sum(not a.warmup for a in expected) and r["gpu_memory"] is None
        profile = r["server_profile"]  # the engine loop ran through every window (warm-up replies play into it)
        assert profile is not None and profile["iterations_per_s"] > 0, profile
        assert 1.0 < profile["window_s"] < 2.0 and sum(profile["loop_ms_per_iteration"].values()) > 0
        assert set(profile["batches"]) == {"llm", "tts", "vocoder", "prefill"}
        assert r["completed"] == r["requests"] and r["errors"] == 0
        for s in samples:  # the server spoke each workload reply for the workload's length (`omnivox` field)
            assert abs(s["audio_s"] - s["expected_audio_s"]) <= 2 * 512 / SR and s["ttfa_s"] > 0
            assert s["segments"] and s["segments"][0][0] >= s["sent_s"]
    assert png.read_bytes()[:4] == b"\x89PNG"
    stats = server.wait_idle()
    assert stats["live_requests"] == 0 and stats["cache_bytes"] == 0, stats


def test_arrivals_are_dealt_round_robin_with_their_index():
    arrivals = poisson_arrivals(8.0, 1.0, 0.5, ITEMS, "chat", seed=1)
    hands = deal(arrivals, 3)
    assert [len(h) for h in hands] == [len(arrivals[i::3]) for i in range(3)]
    assert sorted(i for hand in hands for i, _ in hand) == list(range(len(arrivals)))
    assert all(arrivals[i] is a for hand in hands for i, a in hand)
    assert all([i for i, _ in hand] == sorted(i for i, _ in hand) for hand in hands), "each hand in time order"
    assert deal(arrivals, 1) == [list(enumerate(arrivals))]


def test_a_client_process_ends_when_its_input_closes_mid_rate():
    """A worker in the middle of a rate (its one arrival far in the future) exits as soon as its input closes: a
    sweep that ends, or a parent that dies, leaves no client sending to the server."""
    arrival = poisson_arrivals(8.0, 2.0, 0.0, ITEMS, "chat", seed=1)[0]
    job = {"url": "http://127.0.0.1:9", "seed": 0, "forced": True, "origin": time.perf_counter() + 600,
           "share": [[0, dataclasses.asdict(arrival)]]}
    worker = subprocess.Popen([sys.executable, "-m", "omnivox.bench.capacity_client", "30"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    try:
        assert worker.stdout.readline().strip() == b"ready"
        worker.stdin.write(json.dumps(job).encode() + b"\n")
        worker.stdin.flush()
        time.sleep(0.5)
        assert worker.poll() is None, "the worker waits for its arrival's time"
        worker.stdin.close()
        assert worker.wait(timeout=10) == 0 and worker.stdout.read() == b"", "no answer for a rate cut short"
    finally:
        worker.kill()
        worker.wait()


def test_a_client_process_that_dies_is_reported_with_its_exit_code():
    async def answer_of_a_dead_process() -> None:
        dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(3)",
                                                    stdout=asyncio.subprocess.PIPE)
        await _answer(dead)

    with pytest.raises(RuntimeError, match=r"ended \(exit code 3\) before answering"):
        asyncio.run(answer_of_a_dead_process())


def test_client_processes_must_be_a_positive_number(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["capacity", "--client-processes", "0"])
    assert exit_.value.code == 2 and "use 1 or more" in capsys.readouterr().err


def test_request_body_carries_the_workload_only_for_random_weights():
    from omnivox.bench.capacity import Arrival

    arrival = Arrival(0.0, ITEMS[0], "chat", False)
    _, forced = request_for(arrival, 5, forced=True)
    _, plain = request_for(arrival, 5, forced=False)
    assert forced["omnivox"] == {"forced_reply": ITEMS[0].reply, "audio_seconds": 0.6} and "omnivox" not in plain
    path, speech = request_for(Arrival(0.0, ITEMS[0], "speech", False), 5, forced=True)
    assert path == "/v1/audio/speech" and speech["input"] == ITEMS[0].reply and speech["omnivox"] == {
        "audio_seconds": 0.6}


def test_gpu_script_refuses_a_budget_that_cannot_hold_one_rate(tmp_path):
    """bench/capacity_gpu.sh says so before it starts a server: a device call would otherwise spend its start-up
    and measure nothing."""
    import os
    import subprocess
    import sys

    from omnivox.workload import load_workload, split_warmup

    _, items = split_warmup(load_workload(None))
    rate_s = 4 + 15 + min(60, 3 * max(item.audio_seconds for item in items))
    printed = subprocess.run([sys.executable, "-m", "omnivox.cli", "capacity", "--rate-seconds", "--duration", "15",
                              "--warmup", "4", "--timeout", "60"], capture_output=True, text=True, check=True)
    assert float(printed.stdout) == pytest.approx(rate_s, abs=0.05)
    env = {**os.environ, "PYTHON": sys.executable, "BUDGET": "112", "DURATION": "15", "WARMUP": "4",
           "MODEL_ARGS": "--device cpu"}
    run = subprocess.run(["bash", "bench/capacity_gpu.sh", str(tmp_path / "out")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2, run.stdout + run.stderr
    assert f"give at least {int(60 + rate_s + 20 + 0.999)} s" in run.stdout
    assert not (tmp_path / "out" / "server.log").exists(), "no server was started"
