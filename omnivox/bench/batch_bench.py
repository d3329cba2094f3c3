"""Batched-engine measurements: step time against batch size, batched-vs-reference equivalence, one stream.

    python -m omnivox.bench.batch_bench --dummy-weights --device cuda --out OUT [--parts steps,equivalence,single]

* steps: one LLM decode step, one TTS step, one vocoder batch (29-token windows) and one LLM prefill (32 tokens a
  row) at each batch size, timed over the executors' captured graphs (device-synchronised medians, host work
  included). A figure here is per step, not per stream.
* equivalence: the same requests through the fast path (all at once, batched) and the reference path (eager, one
  row at a time); reports how many replies are identical and, where they part, at which audio token. Run it in
  fp32 (the exactness claim) and in bf16 (agreement rate).
* single: one stream at a time over the standard workload (TTFB / RTF medians), for the single-stream regression.
* profile: the GPU kernels of one LLM decode step, TTS step and vocoder batch at each batch size (run eagerly
  under torch.profiler, the same kernels the graphs replay): where a step's time goes.
Writes `batch_bench.json` under --out and prints a table per part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from omnivox.bench.plot import plot_steps
from omnivox.bench.workloads import STANDARD_WORKLOAD, load_workload, split_warmup
from omnivox.engine.engine import Engine, EngineConfig, settle_heap
from omnivox.engine.llm_executor import RIDING_PROMPTS, LLMRow, LLMSampling, PrefillRow
from omnivox.engine.tts_executor import TTSRow, TTSSampling
from omnivox.engine.types import SamplingParams

console = Console()
PROMPT_TOKENS = 32  # a user turn plus the reply header, about


def _sync(engine: Engine) -> None:
    if engine.cuda_stream is not None:
        engine.cuda_stream.synchronize()


def _time(engine: Engine, fn, repeats: int) -> float:
    """Median seconds of `fn()` (after one untimed call)."""
    fn()
    _sync(engine)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(engine)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@contextlib.contextmanager
def _step_rows(engine: Engine, batch: int, position: int):
    """`batch` active rows in each pool, every row at `position`: (LLM handles, LLM rows, TTS rows, 29-token vocoder
    windows); the rows are given back on exit."""
    num_vq = engine.model.config.tts.num_vq
    llm_handles = [engine.llm.slots.acquire(active=True) for _ in range(batch)]
    tts_handles = [engine.tts.slots.acquire(active=True) for _ in range(batch)]
    try:
        ls = LLMSampling(0.7, 100, 0.8, 1.05, False, 1, 0)
        llm_rows = [LLMRow(h.row, 100 + i, position, [1, 2, 3], ls) for i, h in enumerate(llm_handles)]
        ts = TTSSampling((0.1, 0.3, 0.1, 0.3), 0.7, 20, False, 1)
        codes = np.ones(num_vq, np.int64)
        tts_rows = [TTSRow(h.row, 302 + position // 4, codes, 40, False, False, ts, 0) for h in tts_handles]
        yield llm_handles, llm_rows, tts_rows, [np.ones((29, num_vq), np.int64) for _ in range(batch)]
    finally:
        for h in llm_handles:
            engine.llm.slots.release(h)
        for h in tts_handles:
            engine.tts.slots.release(h)


def part_steps(engine: Engine, batches: list[int], position: int, repeats: int) -> list[dict]:
    """Step times with `b` active rows, every row at `position` (keys read: the bucket that holds it); with two
    prompts of PROMPT_TOKENS ids, a decode step they ride along with against their prefill of their own."""
    rows_out = []
    with engine.on_device():
        for b in batches:
            with _step_rows(engine, b, position) as (llm_handles, llm_rows, tts_rows, windows):
                llm_s = _time(engine, lambda rows=llm_rows: engine.llm.decode(rows).get(), repeats)
                prompts = [PrefillRow(h.row, 100, list(range(1000, 1000 + PROMPT_TOKENS))) for h in llm_handles]
                prefill_s = _time(engine, lambda rows=prompts: engine.llm.prefill(rows).get(), max(repeats // 4, 3))
                # two new turns' prompts: a prefill of their own, or riding along with the decode step
                pair = prompts[:RIDING_PROMPTS] if b >= RIDING_PROMPTS else []
                pair_s = _time(engine, lambda rows=pair: engine.llm.prefill(rows).get(), repeats) if pair else 0.0
                riding_s = (_time(engine, lambda rows=llm_rows, p=pair: engine.llm.decode(rows, p).get(), repeats)
                            if pair else 0.0)
                tts_s = _time(engine, lambda rows=tts_rows: engine.tts.step(rows).get(), repeats)
                # one stream's TTS text prefill (a 10-token chunk and its framing) while `b` rows are active
                text = [(tts_rows[0].row, list(range(1, 13)), 0, None)]
                text_s = _time(engine, lambda t=text: engine.tts.prefill_text_rows(t), repeats)
                voc_s = _time(engine, lambda w=windows: engine.vocoder.decode(w).get(), max(repeats // 4, 3))
            row = {"batch": b, "llm_ms": 1e3 * llm_s, "tts_ms": 1e3 * tts_s, "vocoder_ms": 1e3 * voc_s,
                   "prefill_ms": 1e3 * prefill_s, "prefill_pair_ms": 1e3 * pair_s, "llm_riding_ms": 1e3 * riding_s,
                   "tts_text_ms": 1e3 * text_s,
                   # realtime streams one GPU could feed from the TTS step alone (46.875 steps per audio second)
                   "tts_stream_bound": b / (46.875 * tts_s)}
            rows_out.append(row)
            console.print(row)
    table = Table(title=f"step time vs batch size (positions ~{position})")
    for col in ("batch", "LLM ms", f"LLM + {RIDING_PROMPTS} prompts riding ms", "TTS ms", "TTS text prefill ms (1 row)",
                "vocoder ms (29 tok)", f"LLM prefill ms ({PROMPT_TOKENS} tok/row)", f"prefill of {RIDING_PROMPTS} ms",
                "TTS-bound streams"):
        table.add_column(col, justify="right")
    for r in rows_out:
        table.add_row(str(r["batch"]), f"{r['llm_ms']:.2f}", f"{r['llm_riding_ms']:.2f}", f"{r['tts_ms']:.2f}",
                      f"{r['tts_text_ms']:.2f}", f"{r['vocoder_ms']:.2f}", f"{r['prefill_ms']:.2f}",
                      f"{r['prefill_pair_ms']:.2f}", f"{r['tts_stream_bound']:.0f}")
    console.print(table)
    return rows_out


def _kernel_table(engine: Engine, fn, steps: int) -> list[dict]:
    """Device time per step of each kernel `fn` launches, most expensive first (on a CPU: each op's own time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = engine.device.type == "cuda"
    fn()
    _sync(engine)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
        _sync(engine)

    def spent(e) -> float:
        return e.device_time_total if cuda else e.self_cpu_time_total

    kernels = sorted((e for e in prof.key_averages() if spent(e) > 0), key=spent, reverse=True)
    return [{"kernel": e.key[:90], "ms": spent(e) / 1e3 / steps, "calls": e.count / steps} for e in kernels]


def part_profile(engine: Engine, batches: list[int], position: int, steps: int, top: int = 8) -> dict:
    """Kernels per step of each stage at each batch size, with the graphs off (the kernels are the same)."""
    saved = [cache.enabled for cache in engine.graphs]
    for cache in engine.graphs:
        cache.enabled = False
    report: dict = {}
    try:
        with engine.on_device():
            for b in batches:
                with _step_rows(engine, b, position) as (_, llm_rows, tts_rows, windows):
                    stages = {"llm": lambda r=llm_rows: engine.llm.decode(r).get(),
                              "tts": lambda r=tts_rows: engine.tts.step(r).get(),
                              "vocoder": lambda w=windows: engine.vocoder.decode(w).get()}
                    for stage, fn in stages.items():
                        kernels = _kernel_table(engine, fn, steps)
                        total = sum(k["ms"] for k in kernels)
                        report[f"{stage}@{b}"] = {"kernel_ms": total, "kernels": kernels[:30]}
                        table = Table(title=f"{stage}, batch {b}: {total:.2f} ms of kernels per step")
                        for col in ("kernel", "ms/step", "calls/step", "share"):
                            table.add_column(col, justify="right" if col != "kernel" else "left")
                        for k in kernels[:top]:
                            table.add_row(k["kernel"][:70], f"{k['ms']:.3f}", f"{k['calls']:.0f}",
                                          f"{100 * k['ms'] / total:.0f} %")
                        console.print(table)
    finally:
        for cache, enabled in zip(engine.graphs, saved, strict=True):
            cache.enabled = enabled
    return report


def _drain_all(streams) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each stream to its end -> (PCM, audio codes [T, num_vq] in the order the TTS drew them)."""
    out: list = [None] * len(streams)

    def drain(i: int, s) -> None:
        pcm = np.concatenate([c.pcm for c in s] or [np.zeros(0, np.float32)])
        out[i] = (pcm, np.array(s.live.reply.codes_drawn))

    threads = [threading.Thread(target=drain, args=(i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def part_equivalence(engine: Engine, requests: int, seconds: float, stagger_s: float = 0.0) -> dict:
    """Fast path, all requests at once (or `stagger_s` apart, so later prompts ride along with earlier replies'
    decode steps), vs the reference path one by one; greedy and seeded."""
    items = split_warmup(load_workload(STANDARD_WORKLOAD))[1]
    reference = engine.with_config(path="reference")

    report = {}
    for mode, sampling in (("greedy", SamplingParams(greedy=True)), ("seeded", SamplingParams())):
        def open_all(eng: Engine, stagger_s: float = 0.0, sampling=sampling):
            streams = []
            for i in range(requests):
                if i and stagger_s:
                    time.sleep(stagger_s)
                streams.append(eng.stream(items[i % len(items)].prompt, seed=i, sampling=sampling,
                                          forced_reply=items[i % len(items)].reply, forced_audio_seconds=seconds))
            return streams
        riding = engine.loop_stats().get("prompts_riding", 0)
        batched = _drain_all(open_all(engine, stagger_s))
        riding = engine.loop_stats().get("prompts_riding", 0) - riding
        alone = [_drain_all([s])[0] for s in open_all(reference)]
        parted, pcm_same, agree = [], 0, []
        for (pcm_a, codes_a), (pcm_b, codes_b) in zip(batched, alone, strict=True):
            pcm_same += len(pcm_a) == len(pcm_b) and bool(np.array_equal(pcm_a, pcm_b))
            n = min(len(codes_a), len(codes_b))
            rows_differ = np.nonzero((codes_a[:n] != codes_b[:n]).any(axis=-1))[0] if n else np.zeros(0, int)
            first = int(rows_differ[0]) if len(rows_differ) else (None if len(codes_a) == len(codes_b) else n)
            parted.append(first)
            agree.append(n if first is None else first)
        same = sum(p is None for p in parted)
        total = sum(max(len(c), 1) for _, c in alone)
        report[mode] = {"requests": requests, "identical_codes": same, "identical_pcm": pcm_same,
                        "first_differing_audio_token": parted, "agreeing_prefix_share": sum(agree) / total,
                        "stagger_s": stagger_s, "prompts_riding": riding}
        console.print(f"{mode}: codes identical in {same}/{requests} replies, PCM in {pcm_same}/{requests}; first "
                      f"differing audio token {parted}; {100 * sum(agree) / total:.0f} % of tokens before the split; "
                      f"{riding} prompts rode along with decode steps")
    reference.shutdown()
    return report


def loop_profile(engine: Engine) -> dict[str, float]:
    """Host time per loop iteration, by part (waits on the LLM's stream included), since the engine started."""
    n = max(engine.scheduler.iterations, 1)
    return {part: round(1e3 * seconds / n, 3) for part, seconds in sorted(engine.scheduler.loop_seconds.items())}


def part_single(engine: Engine, trials: int) -> dict:
    """One stream at a time over the standard workload."""
    warm, items = split_warmup(load_workload(STANDARD_WORKLOAD))
    list(engine.stream(warm.prompt, seed=0, forced_reply=warm.reply, forced_audio_seconds=warm.audio_seconds))
    ttfb, rtf = [], []
    for t in range(trials):
        for i, it in enumerate(items):
            s = engine.stream(it.prompt, seed=100 * t + i, forced_reply=it.reply, forced_audio_seconds=it.audio_seconds)
            for _ in s:
                pass
            ttfb.append(s.metrics.ttfb_s)
            rtf.append(s.metrics.rtf)
    result = {"n": len(ttfb), "ttfb_p50_ms": 1e3 * statistics.median(ttfb), "rtf_p50": statistics.median(rtf),
              "ttfb_ms": [1e3 * x for x in ttfb], "rtf": rtf, "loop_ms_per_iteration": loop_profile(engine)}
    console.print(f"loop, ms per iteration: {result['loop_ms_per_iteration']}")
    console.print(f"single stream: n={result['n']} TTFB p50 {result['ttfb_p50_ms']:.1f} ms, RTF p50 "
                  f"{result['rtf_p50']:.4f}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="steps,equivalence,single")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dummy-weights", action="store_true")
    p.add_argument("--precision", default=None)
    p.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    p.add_argument("--position", type=int, default=400, help="LLM position of every row in the step part")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--requests", type=int, default=8, help="requests in the equivalence part")
    p.add_argument("--seconds", type=float, default=2.0, help="forced audio length in the equivalence part")
    p.add_argument("--stagger-ms", type=float, default=0.0,
                   help="equivalence part: open the batched requests this far apart (later prompts then ride along "
                        "with earlier replies' decode steps); 0: all at once")
    p.add_argument("--trials", type=int, default=3, help="passes over the workload in the single part")
    p.add_argument("--max-session-tokens", type=int, default=2048)
    p.add_argument("--attention", default="auto", help="EngineConfig.attention (auto, products, sdpa, ...)")
    p.add_argument("--compile", default="auto", help="EngineConfig.compile (auto, on, off)")
    p.add_argument("--plot-steps", nargs="+", metavar="LABEL=FILE.json",
                   help="draw the steps parts of earlier runs (batch_bench.json files) into --out/steps.png; runs "
                   "nothing")
    args = p.parse_args(argv)
    if args.plot_steps:
        runs = {}
        for entry in args.plot_steps:
            label, _, file = entry.partition("=")
            runs[label] = json.loads(Path(file).read_text())["steps"]
        path = plot_steps(runs, Path(args.out) / "steps.png", "step time against batch size")
        console.print(f"wrote {path}")
        return 0
    parts = args.parts.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    slots = max(batches) if {"steps", "profile"} & set(parts) else 16
    config = EngineConfig(max_concurrent_requests=slots, max_session_tokens=args.max_session_tokens, max_sessions=0,
                          attention=args.attention, compile=args.compile)
    t0 = time.perf_counter()
    engine = Engine.from_pretrained(None, device=args.device, dtype=args.precision, dummy_weights=args.dummy_weights,
                                    config=config)
    console.print(f"engine built in {time.perf_counter() - t0:.1f} s: {engine.stream_slots} stream slots, "
                  f"{engine.model.dtype}, {engine.device}")
    results: dict = {"device": str(engine.device), "dtype": str(engine.model.dtype), "torch": torch.__version__,
                     "attention": args.attention,
                     "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None}
    if "steps" in parts:
        results["steps"] = part_steps(engine, batches, args.position, args.repeats)
    if "profile" in parts:
        results["profile"] = part_profile(engine, batches, args.position, max(args.repeats // 4, 3))
    if "equivalence" in parts:
        results["equivalence"] = part_equivalence(engine, args.requests, args.seconds, args.stagger_ms / 1e3)
    if "single" in parts:
        t0 = time.perf_counter()
        engine.warm_up()
        settle_heap()  # as the server does before it is ready
        console.print(f"warm-up (graphs for every bucket) {time.perf_counter() - t0:.1f} s")
        results["single"] = part_single(engine, args.trials)
    engine.shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_bench.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
