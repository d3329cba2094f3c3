"""`omnivox loadtest`: an async client that measures a running server the way a listener would.

Each request streams a reply over SSE (`/v1/chat/completions` or `/v1/audio/speech`) and records, on the client:
TTFB (request sent -> first audio bytes), total time, audio seconds, RTF (total / audio) and underruns (an audio
chunk that arrives after the audio received before it would have finished playing; the player resumes with it, so
one slow chunk counts once). Replies are read and timed by the same code as `omnivox capacity`
(bench.streamed_reply, capacity.PlaybackClock), so the two commands count alike. Requests start at `rate` per
second (Poisson arrivals, seeded) or all at once, with at most `concurrency` in flight. The results file is the
bench schema (kind "loadtest"), so `omnivox bench --compare` reads it; the server's own per-request metrics
(stages, generation time) ride along from the final SSE event.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from pathlib import Path
from typing import Any

import httpx

from omnivox.bench.capacity import PlaybackClock, percentiles
from omnivox.bench.results import build_results, write_results
from omnivox.bench.streamed_reply import stream_reply
from omnivox.bench.workloads import WorkloadItem, load_workload, split_warmup

ENDPOINTS = ("chat", "speech")


def _request(endpoint: str, item: WorkloadItem, seed: int, max_tokens: int | None, model: str | None) -> tuple:
    if endpoint == "chat":
        body: dict[str, Any] = {
            "messages": [{"role": "user", "content": item.prompt}], "modalities": ["text", "audio"],
            "audio": {"voice": "default", "format": "pcm16"}, "stream": True,
            "stream_options": {"include_usage": True}, "seed": seed,
        }
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        path = "/v1/chat/completions"
    else:
        body = {"input": item.prompt, "voice": "default", "response_format": "pcm", "stream_format": "sse",
                "seed": seed}
        path = "/v1/audio/speech"
    if model is not None:
        body["model"] = model
    return path, body


async def _one(client: httpx.AsyncClient, url: str, endpoint: str, item: WorkloadItem, trial: int, seed: int,
               max_tokens: int | None, model: str | None) -> dict[str, Any]:
    path, body = _request(endpoint, item, seed, max_tokens, model)
    sample: dict[str, Any] = {"request_id": None, "prompt_id": item.id, "trial": trial, "seed": seed}
    sent = time.perf_counter()
    playback = PlaybackClock(sent)
    sample["request_id"], error, server = await stream_reply(
        client, url, path, body, lambda pcm: playback.receive(pcm.size, time.perf_counter()))
    total = time.perf_counter() - sent
    sample.update(
        ttfb_s=playback.ttfb_s, total_s=total, audio_s=playback.audio_s,
        rtf=total / playback.audio_s if playback.samples else math.inf,
        generation_s=server.get("generation_s", math.nan), stages=server.get("stages", {}),
        server_ttfb_s=server.get("ttfb_s", math.nan), finish_reason=server.get("finish_reason", "error"),
        underruns=playback.underruns,
    )
    if error is not None:
        sample.update(error=error, finish_reason="error")
    return sample


def summarize(samples: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if "error" not in s]
    errors: dict[str, int] = {}
    for s in samples:
        if "error" in s:
            kind = s["error"].split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    audio_s = sum(s["audio_s"] for s in ok)
    return {
        "requests": len(samples), "ok": len(ok), "errors": errors,
        "ttfb_s": percentiles([s["ttfb_s"] for s in ok]), "rtf": percentiles([s["rtf"] for s in ok]),
        "underruns": sum(s["underruns"] for s in ok),
        "requests_with_underruns": sum(1 for s in ok if s["underruns"]),
        "wall_s": wall_s, "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "audio_s_per_s": audio_s / wall_s if wall_s > 0 else None,
    }


async def run_loadtest_async(url: str, concurrency: int, requests: int, rate: float | None = None,
                             endpoint: str = "speech", *, items: list[WorkloadItem] | None = None, seed: int = 0,
                             max_tokens: int | None = None, model: str | None = None,
                             timeout_s: float = 300.0) -> dict[str, Any]:
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")
    if concurrency < 1 or requests < 1:
        raise ValueError(f"concurrency and requests must be at least 1, got {concurrency} and {requests}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    url = url.rstrip("/")
    if items is None:
        _, items = split_warmup(load_workload())
    rng = random.Random(seed)
    limit = asyncio.Semaphore(concurrency)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        dummy = await _server_dummy_weights(client, url)

        async def run(index: int) -> dict[str, Any]:
            async with limit:
                item = items[index % len(items)]
                return await _one(client, url, endpoint, item, index // len(items), seed + index, max_tokens, model)

        started = time.perf_counter()
        tasks = []
        for index in range(requests):
            tasks.append(asyncio.create_task(run(index)))
            if rate is not None and index + 1 < requests:
                await asyncio.sleep(rng.expovariate(rate))
        samples = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - started
    config = {"url": url, "endpoint": endpoint, "concurrency": concurrency, "requests": requests, "rate": rate,
              "seed": seed, "max_tokens": max_tokens, "prompt_ids": sorted({item.id for item in items})}
    return build_results(samples, config, kind="loadtest", dummy_weights=dummy,
                         extra={"summary": summarize(samples, wall), "wall_s": wall})


async def _server_dummy_weights(client: httpx.AsyncClient, url: str) -> bool:
    try:
        ready = (await client.get(url + "/readyz")).json()
    except (httpx.HTTPError, ValueError):
        return False
    return bool((ready.get("engine") or {}).get("dummy_weights", False))


def run_loadtest(url: str, concurrency: int, requests: int, rate: float | None = None, endpoint: str = "speech",
                 **kwargs: Any) -> dict[str, Any]:
    """Run a load test against a server at `url`; returns the results document (bench schema, kind "loadtest")."""
    return asyncio.run(run_loadtest_async(url, concurrency, requests, rate, endpoint, **kwargs))


def format_summary(summary: dict[str, Any]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f} ms"

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    t, r = summary["ttfb_s"], summary["rtf"]
    errors = ", ".join(f"{k} x{v}" for k, v in summary["errors"].items()) or "none"
    return "\n".join([
        f"requests   {summary['ok']}/{summary['requests']} ok in {summary['wall_s']:.1f} s "
        f"({num(summary['throughput_rps'])} req/s, {num(summary['audio_s_per_s'])} audio s/s)",
        f"TTFB       p50 {ms(t['p50'])}  p95 {ms(t['p95'])}  p99 {ms(t['p99'])}",
        f"RTF        p50 {num(r['p50'])}  p95 {num(r['p95'])}  p99 {num(r['p99'])}",
        f"underruns  {summary['underruns']} in {summary['requests_with_underruns']} requests",
        f"errors     {errors}",
    ])


def loadtest_main(args: Any) -> int:
    """CLI entry: args has url, concurrency, requests, rate, endpoint, out, seed, max_tokens, workload (optional)."""
    workload = getattr(args, "workload", None)
    _, items = split_warmup(load_workload(workload))
    results = run_loadtest(args.url, args.concurrency, args.requests, args.rate, getattr(args, "endpoint", "speech"),
                           items=items, seed=getattr(args, "seed", 0), max_tokens=getattr(args, "max_tokens", None))
    out = Path(getattr(args, "out", None) or "out/loadtest/results.json")
    if out.suffix != ".json":
        out = out / "results.json"
    write_results(out, results)
    print(format_summary(results["extra"]["summary"]))
    print(f"results: {out}")
    return 0 if results["extra"]["summary"]["ok"] == len(results["samples"]) else 1
