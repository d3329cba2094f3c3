"""The capacity contract's arithmetic (shared/docs/batching.md), free of any network or clock so tests can drive it.

A listener's player starts when a reply's first samples arrive and plays each chunk after the one before. A chunk
that arrives after the audio before it has finished playing is an underrun: the player stalls and resumes with
that chunk, so one slow chunk counts once, not once for every chunk after it. From the same clocks: TTFA (request
sent -> first chunk holding a sample that is not zero) and how many replies are playing at each moment.

A rate passes only with zero underruns, zero errors, every reply complete and p95 TTFA within the bound. Next to
the listener's figures, `server_profile` says what the server's engine loop did in the same window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from omnivox.engine.types import FIRST_AUDIO_MILESTONES, SAMPLE_RATE
from omnivox.server.metrics import BATCH_STAGES
from omnivox.workload import WorkloadItem

ENDPOINTS = ("chat", "speech", "mix")
COMPLETE_REASONS = ("eos", "length")  # the engine ended the reply itself (not cancelled, not failed)
Series = dict[str, dict[str, float]]  # one /metrics scrape: {sample name: {label values joined by ",": value}}


@dataclass(frozen=True)
class Arrival:
    at_s: float  # when to send, from the start of this rate's run (warm-up included)
    item: WorkloadItem
    endpoint: str  # "chat" | "speech"
    warmup: bool  # sent during the warm-up: served like any other, left out of the figures


def poisson_arrivals(rate: float, duration_s: float, warmup_s: float, items: Sequence[WorkloadItem],
                     endpoint: str = "chat", seed: int = 0) -> list[Arrival]:
    """Open-loop Poisson arrivals at `rate` per second over warm-up + duration, each with a prompt (and, for
    "mix", an endpoint) drawn at random. Seeded by (seed, rate): the same arguments give the same schedule."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
    if not items:
        raise ValueError("the workload has no items to draw prompts from")
    rng = np.random.default_rng([seed, round(rate * 1e6)])
    end, t, arrivals = warmup_s + duration_s, 0.0, []
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= end:
            return arrivals
        item = items[int(rng.integers(len(items)))]
        kind = endpoint if endpoint != "mix" else ("chat" if rng.random() < 0.5 else "speech")
        arrivals.append(Arrival(t, item, kind, warmup=t < warmup_s))


class PlaybackClock:
    """One reply as a listener hears it: call `receive` for each audio chunk with its arrival time. The one clock
    of `omnivox capacity` and `omnivox loadtest`, so both count underruns and TTFB the same way."""

    def __init__(self, sent_at: float):
        self.sent_at = sent_at
        self.first_at: float | None = None  # first chunk with samples: the player starts
        self.audible_at: float | None = None  # first chunk holding a sample that is not zero
        self.samples = 0
        self.underruns = 0
        self.stall_s = 0.0
        self.segments: list[list[float]] = []  # [start, end] of uninterrupted playback
        self.min_slack_s = math.inf  # least audio still queued when a later chunk arrived (< 0: it stalled that long)

    def receive(self, num_samples: int, now: float, audible: bool = True) -> None:
        """`audible`: the chunk holds a sample that is not zero (TTFA); a caller that does not time TTFA omits it."""
        if num_samples <= 0:
            return
        if audible and self.audible_at is None:
            self.audible_at = now
        seconds = num_samples / SAMPLE_RATE
        if self.first_at is None:
            self.first_at = now
            self.segments.append([now, now + seconds])
        else:
            queued = self.segments[-1][1] - now  # audio left to play when this chunk arrives
            self.min_slack_s = min(self.min_slack_s, queued)
            if queued < 0:  # the audio before this chunk has finished playing: a stall
                self.underruns += 1
                self.stall_s -= queued
                self.segments.append([now, now + seconds])
            else:
                self.segments[-1][1] += seconds
        self.samples += num_samples

    @property
    def ttfa_s(self) -> float:
        return self.audible_at - self.sent_at if self.audible_at is not None else math.nan

    @property
    def ttfb_s(self) -> float:
        return self.first_at - self.sent_at if self.first_at is not None else math.nan

    @property
    def audio_s(self) -> float:
        return self.samples / SAMPLE_RATE


def streams_playing(segments: Iterable[Sequence[float]], start: float, end: float) -> tuple[float, int]:
    """(mean, peak) number of replies playing at once over [start, end), from playback segments [s, e).
    Mean = total playing time inside the window / window length; peak from a sweep over segment edges (an end
    and a start at the same instant do not overlap)."""
    if not end > start:
        raise ValueError(f"the window must have a positive length, got [{start}, {end})")
    edges, playing = [], 0.0
    for seg_start, seg_end in segments:
        lo, hi = max(seg_start, start), min(seg_end, end)
        if hi > lo:
            playing += hi - lo
            edges += [(lo, 1), (hi, -1)]
    peak = now = 0
    for _, step in sorted(edges):  # at equal times -1 sorts before +1
        now += step
        peak = max(peak, now)
    return playing / (end - start), peak


def percentiles(values: Iterable[float | None], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """{"p50": ..., ...} over the finite values (None when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    return {f"p{q}": float(np.percentile(x, q)) if x.size else None for q in qs}


def is_complete(sample: dict[str, Any]) -> bool:
    """A reply the listener got to the end of: no error, the server's own end of reply, some audio."""
    return not sample.get("error") and sample.get("finish_reason") in COMPLETE_REASONS and (sample.get("audio_s")
                                                                                            or 0) > 0


def summarize_rate(samples: list[dict[str, Any]], rate: float, window: tuple[float, float]) -> dict[str, Any]:
    """One rate's figures. `samples` are this rate's requests (warm-up ones flagged "warmup"), each with ttfa_s,
    rtf, audio_s, underruns, finish_reason, error (if any) and "segments" on the rate's clock; `window` is the
    measuring window on that clock. Streams playing counts every reply (a warm-up reply still playing in the
    window is load the measured ones share); everything else counts the measured requests only."""
    measured = [s for s in samples if not s.get("warmup")]
    complete = [s for s in measured if is_complete(s)]
    errors: dict[str, int] = {}
    for s in measured:
        if s.get("error"):
            kind = str(s["error"]).split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    mean, peak = streams_playing((seg for s in samples for seg in s.get("segments") or ()), *window)
    seconds = window[1] - window[0]
    return {
        "rate": rate,
        "requests": len(measured),
        "completed": len(complete),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "ttfa_s": percentiles(s.get("ttfa_s") for s in complete),
        "rtf": percentiles(s.get("rtf") for s in complete),
        "underruns": sum(int(s.get("underruns") or 0) for s in measured),
        # how close the replies came to an underrun: p5 of each reply's least audio queued when a chunk arrived
        "min_slack_p5_s": percentiles((s.get("min_slack_s") for s in complete), (5,))["p5"],
        "requests_with_underruns": sum(1 for s in measured if s.get("underruns")),
        "streams_playing_mean": mean,
        "streams_playing_peak": peak,
        "audio_s_per_s": sum(s.get("audio_s") or 0.0 for s in complete) / seconds,
        "window_s": seconds,
        "first_audio_milestones_s": first_audio_milestones(complete),
    }


def first_audio_milestones(samples: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Where the server's time to first audio went: for each milestone (RequestMetrics.first_audio_milestones,
    seconds from the request's start on the server) its p50 and p95 over the replies that reached it, in the order
    a request reaches them. Empty when the server reports none."""
    seen: dict[str, list[float]] = {}
    for s in samples:
        for name, at in (s.get("first_audio_milestones") or {}).items():
            seen.setdefault(name, []).append(at)
    order = {name: i for i, name in enumerate(FIRST_AUDIO_MILESTONES)}
    return {name: percentiles(seen[name], (50, 95)) for name in sorted(seen, key=lambda n: order.get(n, len(order)))}


def failures(summary: dict[str, Any], ttfa_bound_s: float) -> list[str]:
    """Why a rate fails, in words; an empty list means it passes."""
    reasons = []
    if summary["requests"] == 0:
        reasons.append("no request in the window")
    if summary["errors"]:
        reasons.append(f"{summary['errors']} errors")
    incomplete = summary["requests"] - summary["completed"] - summary["errors"]
    if incomplete > 0:
        reasons.append(f"{incomplete} replies incomplete")
    if summary["underruns"]:
        reasons.append(f"{summary['underruns']} underruns in {summary['requests_with_underruns']} requests")
    p95 = summary["ttfa_s"]["p95"]
    if p95 is None:
        reasons.append("no audible reply")
    elif p95 > ttfa_bound_s:
        reasons.append(f"p95 TTFA {p95 * 1000:.0f} ms > {ttfa_bound_s * 1000:.0f} ms")
    return reasons


def headline(summaries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The figure of merit: the highest passing rate and the streams playing at it (None if no rate passed)."""
    passing = [s for s in summaries if s.get("passed")]
    if not passing:
        return None
    best = max(passing, key=lambda s: s["rate"])
    return {"rate": best["rate"], "streams_playing_mean": best["streams_playing_mean"],
            "streams_playing_peak": best["streams_playing_peak"], "ttfa_p95_s": best["ttfa_s"]["p95"]}


def _delta(before: Series, after: Series, name: str, label: str = "") -> float | None:
    """How much a cumulative series grew between two scrapes; None if either lacks it."""
    if label not in before.get(name, {}) or label not in after.get(name, {}):
        return None
    return after[name][label] - before[name][label]


def server_profile(before: Series, after: Series, window_s: float) -> dict[str, Any] | None:
    """What the server's engine loop did between two /metrics scrapes `window_s` apart: iterations per second,
    host ms per iteration by part of the loop, and for each stage batches per second with their mean rows. These
    series count from start-up, so their difference is the window's; the queue depths and buffered audio are
    instantaneous and kept as read at the end. A series the server lacks (an older or a non-engine server) leaves
    its key out. None when the window is empty or a count went backwards (the server restarted in between)."""
    if not window_s > 0:
        return None
    profile: dict[str, Any] = {"window_s": window_s}
    iterations = _delta(before, after, "omnivox_loop_iterations")
    if iterations is not None:
        profile["iterations_per_s"] = iterations / window_s
        parts_before = before.get("omnivox_loop_seconds", {})  # a part shows up once the loop first spends time in it
        parts = {part: seconds - parts_before.get(part, 0.0)
                 for part, seconds in after.get("omnivox_loop_seconds", {}).items()}
        if iterations > 0 and parts:
            profile["loop_ms_per_iteration"] = {part: 1000 * s / iterations for part, s in parts.items()}
        if iterations < 0 or any(s < 0 for s in parts.values()):
            return None
    batches = {}
    for stage in BATCH_STAGES:
        count = _delta(before, after, f"omnivox_{stage}_batch_size_count")
        rows = _delta(before, after, f"omnivox_{stage}_batch_size_sum")
        if count is None or rows is None:
            continue
        if count < 0:
            return None
        batches[stage] = {"per_s": count / window_s, "mean_rows": rows / count if count else None}
    if batches:
        profile["batches"] = batches
    at_end = {key: dict(after[name]) for key, name in (("waiting", "omnivox_scheduler_waiting"),
                                                      ("buffered_s", "omnivox_stream_buffered_seconds"))
              if after.get(name)}
    if at_end:
        profile["at_end"] = at_end
    return profile
