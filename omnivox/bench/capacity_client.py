"""`omnivox capacity`: how many realtime streams a running server holds (the contract in shared/docs/batching.md).

For each rate, lowest first: open-loop Poisson arrivals (capacity.poisson_arrivals) for a warm-up and then the
measuring window, every request streamed over SSE from asyncio (httpx, no thread per stream, no cap on connections:
a client-side queue would hide the server's). One Python process that reads every stream's chunks can fall behind
(on an H200 at 18–20/s, 160–180 streams at once, it sent requests up to 300 ms late; one late to send is likely
late to read too, which would look like the server's underruns), so the arrivals are dealt round-robin to
`client_processes` processes (this module run as a program, `python -m omnivox.bench.capacity_client TIMEOUT_S`:
one JSON line in and one out per rate, not for use by hand), each with its own event loop, all timed on the
machine's monotonic clock (`time.perf_counter`). Each reply is timed by a playback clock
(capacity.PlaybackClock); the server's GPU memory is read from /metrics once a second, and its engine loop's
counters as the measuring window starts and ends (capacity.server_profile). The sweep stops after two failing
rates. With a random-weight server every request carries its workload reply and length in the `omnivox` field, so
any workload replays with its own lengths.

The results file (bench schema, kind "capacity") holds every request, warm-up ones flagged, and per-rate summaries
under extra.rates; it is rewritten after each rate so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import resource
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from omnivox.bench.capacity import (
    Arrival,
    PlaybackClock,
    Series,
    failures,
    headline,
    poisson_arrivals,
    server_profile,
    summarize_rate,
)
from omnivox.bench.results import build_results, write_results
from omnivox.bench.streamed_reply import stream_reply
from omnivox.workload import WorkloadItem

GPU_GAUGES = {"omnivox_gpu_memory_allocated_bytes": "gpu_allocated_bytes",
              "omnivox_gpu_memory_reserved_bytes": "gpu_reserved_bytes",
              "omnivox_gpu_memory_peak_allocated_bytes": "gpu_peak_allocated_bytes"}
MEMORY_POLL_S = 1.0
SCRAPE_TIMEOUT_S = 10.0  # a window-edge scrape slower than this says nothing about that edge anyway
STOP_AFTER_FAILURES = 2
WORKER_LINE_LIMIT = 1 << 28  # bytes of one client process's answer (a rate's samples, as one JSON line)
WORKER_EXIT_S = 5.0  # a client process whose input closed gets this long to exit before it is killed
WORKER_START_S = 60.0  # ... and this long to start


def request_for(arrival: Arrival, seed: int, forced: bool, model: str | None = None) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of one arrival. Chat answers the workload prompt; speech reads the workload reply aloud
    (what a voice agent sends to TTS). `forced`: the server runs random weights, so say what to say and for how
    long."""
    item = arrival.item
    if arrival.endpoint == "chat":
        path = "/v1/chat/completions"
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": item.prompt}], "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"}, "stream": True, "seed": seed,
        }
        if forced:
            body["omnivox"] = {"forced_reply": item.reply, "audio_seconds": item.audio_seconds}
    else:
        path = "/v1/audio/speech"
        body = {"input": item.reply or item.prompt, "voice": "default", "response_format": "pcm",
                "stream_format": "sse", "seed": seed}
        if forced:
            body["omnivox"] = {"audio_seconds": item.audio_seconds}
    if model is not None:
        body["model"] = model
    return path, body


async def stream_one(client: httpx.AsyncClient, url: str, arrival: Arrival, seed: int, forced: bool,
                     origin: float, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Send one request and listen to it to the end; the sample's times are seconds after `origin`."""
    path, body = request_for(arrival, seed, forced)
    sent = clock()
    playback = PlaybackClock(sent)
    sample: dict[str, Any] = {
        "request_id": None, "prompt_id": arrival.item.id, "trial": None, "seed": seed, "endpoint": arrival.endpoint,
        "warmup": arrival.warmup, "scheduled_s": arrival.at_s, "sent_s": sent - origin,
        "send_lag_s": sent - origin - arrival.at_s, "expected_audio_s": arrival.item.audio_seconds if forced else None,
    }
    sample["request_id"], error, server = await stream_reply(
        client, url, path, body, lambda pcm: playback.receive(pcm.size, clock(), audible=bool(np.any(pcm))))
    total = clock() - sent
    sample.update(
        ttfa_s=playback.ttfa_s, ttfb_s=playback.ttfb_s, total_s=total, audio_s=playback.audio_s,
        rtf=total / playback.audio_s if playback.samples else math.inf, underruns=playback.underruns,
        stall_s=playback.stall_s, segments=[[a - origin, b - origin] for a, b in playback.segments],
        min_slack_s=playback.min_slack_s if math.isfinite(playback.min_slack_s) else None,
        finish_reason=server.get("finish_reason", "error" if error else "incomplete"),
        server_ttfb_s=server.get("ttfb_s", math.nan), generation_s=server.get("generation_s", math.nan),
        first_audio_milestones=server.get("first_audio_milestones") or {},
    )
    if error is not None:
        sample.update(error=error, finish_reason="error")
    return sample


def metric_series(text: str) -> Series:
    """Every sample of a /metrics text: {sample name: {its label values joined by ",": value}}, "" for a sample
    without labels (series["omnivox_loop_seconds"]["tts"], series["omnivox_llm_batch_size_count"][""])."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series.setdefault(sample.name, {})[",".join(sample.labels.values())] = sample.value
    return series


def _gpu_memory(series: Series) -> dict[str, float]:
    return {key: series[name][""] for name, key in GPU_GAUGES.items() if "" in series.get(name, {})}


async def _scrape(client: httpx.AsyncClient, url: str) -> Series:
    response = await client.get(url + "/metrics", timeout=SCRAPE_TIMEOUT_S)
    return metric_series(response.raise_for_status().text)


async def _watch_memory(client: httpx.AsyncClient, url: str, peak: dict[str, float]) -> None:
    """Keep the largest value of each GPU memory gauge seen, once a second, until cancelled."""
    while True:
        try:
            for key, value in _gpu_memory(await _scrape(client, url)).items():
                peak[key] = max(peak.get(key, 0.0), value)
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(MEMORY_POLL_S)


async def _profile_window(client: httpx.AsyncClient, url: str, start: float, end: float) -> dict[str, Any] | None:
    """capacity.server_profile between scrapes at `start` and `end` (perf_counter times), each timed at the middle
    of its request; None when a scrape fails: a sweep never fails for want of the server's view."""
    scrapes = []
    for at in (start, end):
        await asyncio.sleep(max(0.0, at - time.perf_counter()))
        sent = time.perf_counter()
        try:
            series = await _scrape(client, url)
        except (httpx.HTTPError, ValueError):
            return None
        scrapes.append((series, (sent + time.perf_counter()) / 2))
    (before, started), (after, ended) = scrapes
    return server_profile(before, after, ended - started)


def default_client_processes() -> int:
    """One client process per four cores this process may use, at most 8 (the server needs cores too): 1 below 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores // 4))


def _client(timeout_s: float) -> httpx.AsyncClient:
    # idle connections are dropped well before the server's keep-alive timeout (uvicorn: 5 s): reusing one the server
    # is closing at that moment fails the request with a ReadError (seen once in a 94-request sweep)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=2.0)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0), limits=limits)


async def _listen(client: httpx.AsyncClient, url: str, share: list[tuple[int, Arrival]], seed: int, forced: bool,
                  origin: float) -> list[dict[str, Any]]:
    """Sends each (index, arrival) of `share` at its time after `origin` and listens to every reply to its end."""
    tasks = []
    for index, arrival in share:
        delay = origin + arrival.at_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(stream_one(client, url, arrival, seed + index, forced, origin)))
    return list(await asyncio.gather(*tasks))


def deal(arrivals: list[Arrival], hands: int) -> list[list[tuple[int, Arrival]]]:
    """Arrivals dealt round-robin to `hands` listeners, each with its index in the rate's order (its seed)."""
    return [list(enumerate(arrivals))[hand::hands] for hand in range(hands)]


async def run_rate(client: httpx.AsyncClient, url: str, rate: float, duration_s: float, warmup_s: float,
                   items: list[WorkloadItem], endpoint: str, seed: int, forced: bool,
                   origin: float | None = None,
                   workers: list[asyncio.subprocess.Process] | None = None) -> list[dict[str, Any]]:
    """Every request of one rate (warm-up ones flagged), in arrival order, on this rate's clock (0 = start of the
    warm-up, at perf_counter time `origin`, by default now). With `workers` (client processes, `_client_workers`),
    each sends and listens to a share of the arrivals; without, this event loop does it all."""
    arrivals = poisson_arrivals(rate, duration_s, warmup_s, items, endpoint, seed)
    origin = time.perf_counter() if origin is None else origin
    if not workers:
        return await _listen(client, url, deal(arrivals, 1)[0], seed, forced, origin)
    shares = deal(arrivals, len(workers))
    for worker, share in zip(workers, shares, strict=True):
        job = {"url": url, "seed": seed, "forced": forced, "origin": origin,
               "share": [[index, dataclasses.asdict(arrival)] for index, arrival in share]}
        worker.stdin.write(json.dumps(job).encode() + b"\n")
    await asyncio.gather(*(worker.stdin.drain() for worker in workers))
    answers = await asyncio.gather(*(_answer(worker) for worker in workers))  # the first failure raises at once
    by_index = {index: sample for share, answer in zip(shares, answers, strict=True)
                for (index, _), sample in zip(share, answer, strict=True)}
    return [by_index[i] for i in range(len(arrivals))]


async def _answer(worker: asyncio.subprocess.Process) -> list[dict[str, Any]]:
    line = await worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a capacity client process ended (exit code {await worker.wait()}) before answering")
    return json.loads(line)


@contextlib.asynccontextmanager
async def _client_workers(processes: int, timeout_s: float) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`processes` client processes (this module run as a program: `_worker`), started and ready before the first
    rate, ended with the sweep: their input closes, which also ends a rate they are in (and would if this process
    were killed); killed if they linger. None started for one: the sweep's own event loop listens."""
    workers: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(processes if processes > 1 else 0):
            workers.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "omnivox.bench.capacity_client", str(timeout_s), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, limit=WORKER_LINE_LIMIT))
        for worker in workers:
            try:
                ready = await asyncio.wait_for(worker.stdout.readline(), WORKER_START_S)
            except asyncio.TimeoutError:
                ready = b""
            if ready.strip() != b"ready":
                raise RuntimeError(f"a capacity client process did not start within {WORKER_START_S:g} s")
        yield workers
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.stdin.close()
        if workers:
            await asyncio.wait([asyncio.ensure_future(worker.wait()) for worker in workers], timeout=WORKER_EXIT_S)
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()


def _worker(timeout_s: float) -> None:
    """A client process: for each job line on stdin (a rate's share of arrivals), sends and listens to every
    request in it and answers one line of samples. Its input closing ends it, within a rate too. Ctrl-C reaches
    the whole process group: the parent ends the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_open_files()
    asyncio.run(_serve_jobs(timeout_s))


async def _serve_jobs(timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    jobs = asyncio.StreamReader(limit=WORKER_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(jobs), sys.stdin)
    async with _client(timeout_s) as client:  # made before "ready": a rate's first arrivals go out on time
        print("ready", flush=True)
        next_line = asyncio.ensure_future(jobs.readline())
        while line := await next_line:
            job = json.loads(line)
            share = [(index, Arrival(a["at_s"], WorkloadItem(**a["item"]), a["endpoint"], a["warmup"]))
                     for index, a in job["share"]]
            rate = asyncio.ensure_future(_listen(client, job["url"], share, job["seed"], job["forced"], job["origin"]))
            next_line = asyncio.ensure_future(jobs.readline())  # the next job comes after the answer: or the end
            await asyncio.wait([rate, next_line], return_when=asyncio.FIRST_COMPLETED)
            if not rate.done():  # input closed mid-rate: the sweep ended
                rate.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await rate
                return
            print(json.dumps(rate.result()), flush=True)


async def _server_info(client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await client.get(url + "/readyz")
    except httpx.HTTPError as e:
        raise ConnectionError(f"no server at {url} ({type(e).__name__}); start one with `omnivox serve`") from e
    if response.status_code != 200:
        raise ConnectionError(f"the server at {url} is not ready ({response.status_code}: {response.text[:200]})")
    return response.json().get("engine") or {}


def _raise_open_files() -> None:
    """Hundreds of streams at once need hundreds of sockets: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard or hard == resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # a hard limit above the kernel's nr_open: keep the soft one
            pass


def rate_seconds(items: list[WorkloadItem], warmup_s: float, duration_s: float, timeout_s: float) -> float:
    """The longest one rate can take: warm-up, window, then a drain of three times the longest reply (at most one
    request timeout). A sweep with a budget starts a rate only when this much is left."""
    return warmup_s + duration_s + min(timeout_s, 3 * max(item.audio_seconds for item in items))


async def sweep_async(url: str, rates: list[float], *, items: list[WorkloadItem], duration_s: float = 60.0,
                      warmup_s: float = 10.0, endpoint: str = "chat", seed: int = 0, ttfa_bound_s: float = 0.3,
                      timeout_s: float = 120.0, budget_s: float | None = None, out: str | Path | None = None,
                      on_rate: Callable[[dict[str, Any]], None] | None = None,
                      client_processes: int = 1) -> dict[str, Any]:
    """Run the sweep; returns the results document (bench schema, kind "capacity"). `budget_s`: start no rate
    that might not end within this many seconds of the start (warm-up + window + a drain of three times the
    longest reply, at most one request timeout). `client_processes`: processes that send and listen (1: this
    one's event loop)."""
    if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
        raise ValueError(f"rates must be positive requests per second, got {rates}")
    if client_processes < 1:
        raise ValueError(f"client_processes must be 1 or more, got {client_processes}")
    if not (duration_s > 0 and warmup_s >= 0):
        raise ValueError(f"duration must be positive and warm-up not negative, got {duration_s} and {warmup_s}")
    url = url.rstrip("/")
    _raise_open_files()
    started = time.perf_counter()
    per_rate_s = rate_seconds(items, warmup_s, duration_s, timeout_s)
    config = {"url": url, "rates": sorted(rates), "duration_s": duration_s, "warmup_s": warmup_s,
              "endpoint": endpoint, "seed": seed, "ttfa_bound_s": ttfa_bound_s, "timeout_s": timeout_s,
              "prompt_ids": sorted({item.id for item in items}), "client_processes": client_processes}
    samples: list[dict[str, Any]] = []
    summaries: list[dict[str, Any]] = []
    skipped: list[float] = []
    interrupted: list[float] = []
    stop_reason: list[str] = []
    async with _client_workers(client_processes, timeout_s) as workers:
        async with _client(timeout_s) as client:
            info = await _server_info(client, url)
            forced = bool(info.get("random_weights", info.get("dummy_weights", False)))

            def document() -> dict[str, Any]:
                return build_results(samples, config, kind="capacity", dummy_weights=forced, extra={
                    "rates": summaries, "headline": headline(summaries), "skipped_rates": skipped,
                    "stop_reason": stop_reason[0] if stop_reason else None,
                    "interrupted_rate": interrupted[0] if interrupted else None, "server": info,
                    "wall_s": time.perf_counter() - started})

            if out is not None:  # a file from the start: `--show` works even if the first rate never ends
                write_results(out, document())
            for rate in sorted(rates):
                failed = sum(1 for s in summaries if not s["passed"])
                elapsed = time.perf_counter() - started
                if not stop_reason and failed >= STOP_AFTER_FAILURES:
                    stop_reason.append(f"{STOP_AFTER_FAILURES} rates failed")
                elif not stop_reason and budget_s is not None and elapsed + per_rate_s > budget_s:
                    stop_reason.append(f"out of time (budget {budget_s:g} s)")
                if stop_reason:
                    skipped.append(rate)
                    continue
                memory: dict[str, float] = {}
                origin = time.perf_counter()
                watcher = asyncio.create_task(_watch_memory(client, url, memory))
                profiler = asyncio.create_task(_profile_window(client, url, origin + warmup_s,
                                                               origin + warmup_s + duration_s))
                try:
                    rate_samples = await run_rate(client, url, rate, duration_s, warmup_s, items, endpoint, seed,
                                                  forced, origin, workers)
                    profile = await profiler  # the replies may all end before the window does
                except asyncio.CancelledError:  # Ctrl-C or a time limit: keep the rates that finished
                    interrupted.append(rate)
                    if out is not None:
                        write_results(out, document())
                    raise
                finally:
                    watcher.cancel()
                    profiler.cancel()
                for s in rate_samples:
                    s["rate"] = rate
                summary = summarize_rate(rate_samples, rate, (warmup_s, warmup_s + duration_s))
                reasons = failures(summary, ttfa_bound_s)
                summary.update(passed=not reasons, failures=reasons,
                               warmup_requests=len(rate_samples) - summary["requests"],
                               client_lag_max_s=max((s["send_lag_s"] for s in rate_samples), default=0.0),
                               gpu_memory=memory or None, server_profile=profile)
                samples += rate_samples
                summaries.append(summary)
                if out is not None:
                    write_results(out, document())
                if on_rate is not None:
                    on_rate(summary)
            results = document()
    if out is not None:
        write_results(out, results)
    return results


def sweep(url: str, rates: list[float], **kwargs: Any) -> dict[str, Any]:
    """Run a capacity sweep against the server at `url` (see `sweep_async`)."""
    return asyncio.run(sweep_async(url, rates, **kwargs))


if __name__ == "__main__":
    _worker(float(sys.argv[1]))
