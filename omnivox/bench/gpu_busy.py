"""How busy the GPU is under load, stream by stream.

An in-process engine serves open-loop Poisson chats of the standard workload (the arrivals and forced replies of
`omnivox capacity`, without HTTP); after a warm-up a profiler window records every kernel the device runs. The
report gives, for each CUDA stream (the loop's TTS steps, the LLM's, the vocoder's) and for all of them together,
the share of the window with a kernel running, the time two streams ran at once, and the kernels that took the
most time; and the engine loop's iterations and batch sizes over the same window. If the union is close to the
whole window the device is the bound and only less device work helps; gaps in it are time the loop left the GPU
idle.

    python -m omnivox.bench.gpu_busy --dummy-weights --device cuda --rate 14 --out OUT

On a CPU it runs the tiny model and records no kernels (a smoke test of the harness).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import ctypes.util
import glob
import os
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from omnivox.bench.capacity import poisson_arrivals
from omnivox.bench.results import build_results, write_results
from omnivox.engine.engine import Engine, EngineConfig, settle_heap
from omnivox.engine.forcing import ReplyScript
from omnivox.workload import load_workload, split_warmup

console = Console()


@dataclass(frozen=True)
class Kernel:
    stream: int
    start_us: float
    end_us: float
    name: str


def _merged(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def busy_report(kernels: list[Kernel], window_us: float, names: dict[int, str] | None = None,
                top: int = 15) -> dict[str, Any]:
    """Per stream: kernels, busy ms (its kernels' union) and the costliest kernels; for all streams: busy ms (the
    union over streams), overlap ms (two or more streams busy at once) and idle ms, over a window of `window_us`.
    Kernels are not clipped to the window (the profiler's clock is not the host's): one running across an edge
    counts whole, so the union may slightly exceed the window."""
    names = names or {}
    by_stream: defaultdict[int, list[Kernel]] = defaultdict(list)
    for k in kernels:
        by_stream[k.stream].append(k)
    streams, edges = {}, []
    for stream, ks in sorted(by_stream.items()):
        merged = _merged((k.start_us, k.end_us) for k in ks)
        edges += [(s, 1) for s, _ in merged] + [(e, -1) for _, e in merged]
        per_name: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # [µs, calls]
        for k in ks:
            per_name[k.name][0] += k.end_us - k.start_us
            per_name[k.name][1] += 1
        costliest = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
        streams[names.get(stream, f"stream {stream}")] = {
            "kernels": len(ks), "busy_ms": sum(e - s for s, e in merged) / 1e3,
            "top": [{"kernel": n, "ms": t / 1e3, "calls": c} for n, (t, c) in costliest]}
    busy = overlap = 0.0
    active, last = 0, None
    for at, delta in sorted(edges, key=lambda e: (e[0], e[1])):  # ends before starts at one instant
        if last is not None:
            busy += (at - last) if active >= 1 else 0.0
            overlap += (at - last) if active >= 2 else 0.0
        active += delta
        last = at
    window_ms = window_us / 1e3
    return {"window_ms": window_ms, "busy_ms": busy / 1e3, "overlap_ms": overlap / 1e3,
            "idle_ms": max(window_ms - busy / 1e3, 0.0), "streams": streams}


def device_kernels(prof) -> list[Kernel]:
    """Every kernel, copy and fill the profiler saw on the device (graph replays included, kernel by kernel)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        start = e.start_ns() / 1e3
        out.append(Kernel(int(e.device_resource_id()), start, start + e.duration_ns() / 1e3, e.name()))
    return out


def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime torch loaded (for cudaStreamGetId, the stream number the profiler reports)."""
    candidates = [ctypes.util.find_library("cudart")]
    for root in {os.path.dirname(torch.__file__), *map(os.path.dirname, glob.glob(
            os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "*", "lib")))}:
        candidates += glob.glob(os.path.join(root, "**", "libcudart.so*"), recursive=True)
    for path in filter(None, candidates):
        try:
            lib = ctypes.CDLL(path)
            lib.cudaStreamGetId  # noqa: B018  (CUDA 12+)
            return lib
        except (OSError, AttributeError):
            continue
    return None


STREAM_STAGES = {"loop (TTS steps)": ("tts",), "LLM": ("llm", "prefill"), "vocoder": ("vocoder",)}  # batches on each


def stream_names(engine: Engine) -> dict[int, str]:
    """The profiler's stream numbers of the engine's streams, where the CUDA runtime can say them."""
    lib = _cudart()
    if lib is None or engine.device.type != "cuda":
        return {}
    named = dict(zip(STREAM_STAGES, (engine.cuda_stream, engine.llm.stream, engine.vocoder.stream), strict=True))
    out = {}
    for name, stream in named.items():
        if stream is None:
            continue
        sid = ctypes.c_ulonglong()
        if lib.cudaStreamGetId(ctypes.c_void_p(stream.cuda_stream), ctypes.byref(sid)) == 0:
            out[sid.value] = name
    return out


async def serve_and_trace(engine: Engine, rate: float, warmup_s: float, trace_s: float, seed: int = 0) -> dict:
    """Poisson chats at `rate` for `warmup_s`, then a profiler window of `trace_s` while they go on."""
    from torch.profiler import ProfilerActivity, profile

    _, items = split_warmup(load_workload())
    script = ReplyScript(items)
    arrivals = poisson_arrivals(rate, trace_s + 1.0, warmup_s, items, seed=seed)
    rows: dict[str, list[int]] = {stage: [] for stages in STREAM_STAGES.values() for stage in stages}  # made up front:
    engine.on_batch = lambda stage, n: rows.setdefault(stage, []).append(n)  # the loop thread appends while we read
    t0 = time.perf_counter()

    async def one(i: int, at_s: float, prompt: str) -> None:
        await asyncio.sleep(max(at_s - (time.perf_counter() - t0), 0.0))
        stream = engine.stream(prompt, seed=i, **script.chat(prompt))
        try:
            while await stream.next_async() is not None:
                pass
        finally:
            stream.close()

    tasks = [asyncio.create_task(one(i, a.at_s, a.item.prompt)) for i, a in enumerate(arrivals)]
    await asyncio.sleep(warmup_s)
    scheduler = engine.scheduler
    parts0, iterations0 = dict(scheduler.loop_seconds), scheduler.iterations
    for stage in rows:
        rows[stage].clear()
    live: list[int] = []
    cuda = engine.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        w0 = time.perf_counter()
        while time.perf_counter() - w0 < trace_s:
            live.append(len(scheduler.live))
            await asyncio.sleep(0.02)
        if cuda:
            torch.cuda.synchronize(engine.device)
        window_s = time.perf_counter() - w0
    iterations = scheduler.iterations - iterations0
    parts = {k: v - parts0.get(k, 0.0) for k, v in scheduler.loop_seconds.items()}
    window_rows = {k: list(v) for k, v in rows.items()}  # the batches of the window (not of the drain after it)
    for task in tasks:  # the requests still arriving or playing are cancelled: the next rate starts from idle
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.to_thread(engine.wait_idle, 30.0)
    report = busy_report(device_kernels(prof), window_s * 1e6, stream_names(engine))
    for name, stream in report["streams"].items():  # the kernels of one batch of that stream's work, on average
        batches = sum(len(window_rows.get(stage, ())) for stage in STREAM_STAGES.get(name, ()))
        stream["kernels_per_batch"] = stream["kernels"] / batches if batches else None
    return report | {
        "rate": rate, "iterations_per_s": iterations / window_s, "live_mean": sum(live) / max(len(live), 1),
        "ms_per_iteration": {k: 1e3 * v / max(iterations, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])},
        "batches_per_s": {k: len(v) / window_s for k, v in window_rows.items()},
        "mean_rows": {k: sum(v) / len(v) for k, v in window_rows.items() if v}}


def print_report(r: dict) -> None:
    window = r["window_ms"]
    table = Table(title=f"device busy at {r['rate']:g}/s over {window:.0f} ms: union {100 * r['busy_ms'] / window:.0f}"
                        f" %, two or more streams {100 * r['overlap_ms'] / window:.0f} %, idle "
                        f"{100 * r['idle_ms'] / window:.0f} %")
    for col in ("stream", "kernels / s", "kernels / batch", "busy ms / s", "costliest kernels (ms / s)"):
        table.add_column(col, justify="left" if col in ("stream", "costliest kernels (ms / s)") else "right")
    per_s = 1e3 / window
    for name, s in r["streams"].items():
        top = "; ".join(f"{k['kernel'][:48]} {k['ms'] * per_s:.0f}" for k in s["top"][:3])
        per_batch = "" if s.get("kernels_per_batch") is None else f"{s['kernels_per_batch']:.0f}"
        table.add_row(name, f"{s['kernels'] * per_s:.0f}", per_batch, f"{s['busy_ms'] * per_s:.0f}", top)
    console.print(table)
    console.print(f"loop: {r['iterations_per_s']:.0f} iterations/s, {r['live_mean']:.1f} requests live; batches/s × "
                  "mean rows: " + ", ".join(f"{k} {r['batches_per_s'][k]:.1f} × {m:.1f}"
                                            for k, m in r["mean_rows"].items()))
    console.print("ms per iteration: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_iteration"].items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, nargs="+", default=[14.0], help="requests per second (one run each)")
    p.add_argument("--warmup", type=float, default=8.0, help="seconds of load before the window")
    p.add_argument("--trace-seconds", type=float, default=1.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dummy-weights", action="store_true")
    p.add_argument("--max-streams", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    config = EngineConfig(max_concurrent_requests=args.max_streams)
    engine = Engine.from_pretrained(None, device=args.device, dummy_weights=args.dummy_weights, config=config)
    engine.warm_up()
    settle_heap()  # as the server does before it is ready

    async def every_rate() -> list[dict]:
        reports = []
        for rate in args.rate:
            reports.append(await serve_and_trace(engine, rate, args.warmup, args.trace_seconds))
            print_report(reports[-1])
        engine.shutdown()  # while this event loop runs: the loop thread hands its last events to it
        return reports

    results = asyncio.run(every_rate())
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out / "gpu_busy.json", build_results([], vars(args), kind="gpu_busy",
                                                       dummy_weights=args.dummy_weights, extra={"runs": results}))


if __name__ == "__main__":
    main()
