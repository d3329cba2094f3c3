"""The engine loop's own host time, with the device taken out: every step body (LLM and TTS steps and prefills,
DVAE + Vocos) is replaced by an instant stub that returns zeros of the right shape, so what is left is the Python
of an iteration (advancing requests, planning, packing step inputs, handing results back). On a GPU that time is
spent while the device waits for its next step, so it bounds the iteration rate however fast the steps get. The
garbage collector's pauses are timed too (the heap settled after start-up, as the server does): a long one stalls
every stream at once.

    python -m omnivox.bench.host_bench [--streams 96] [--seconds 20] [--out OUT] [--profile 40]
    python -m omnivox.bench.host_bench --with-device --device cuda --full-size --streams 200 --profile 40

`--with-device` keeps the step bodies: the loop's host time beside a real device (on a GPU, full-size random
weights with `--full-size`), where launches, copies and waits cost what they cost there; streams then wait for
their listener as in the server. `--profile N` samples the loop thread's stack every millisecond over the
measuring window and prints the N functions it was found in most, on themselves and anywhere on the stack.

A closed loop keeps `--streams` chats of the standard workload live (forced replies and lengths, the tiny model's
tokenizers and request state); streams are never held back for being ahead of their listener, so most of them
take part in most TTS steps. Writes OUT/host_bench.json and prints ms per iteration by part of the loop, and the
loop thread's own CPU time per iteration (on a busy 2-core machine wall time swings by a third from run to run; the
thread's CPU time leaves out the time it waited for a core).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from omnivox.bench.results import build_results, write_results
from omnivox.config import tiny_config
from omnivox.engine.engine import Engine, EngineConfig, settle_heap
from omnivox.engine.forcing import ReplyScript
from omnivox.models.loader import build_dummy_model
from omnivox.workload import load_workload, split_warmup

console = Console()


def stub_device(engine: Engine) -> None:
    """Replaces every step body by one that returns zeros at once (the loop's host code stays as it is)."""
    model = engine.model
    llm_hidden, tts_hidden, num_vq = model.config.llm.hidden_size, model.config.tts.hidden_size, engine.tts.num_vq
    eos = engine.tts.eos_code

    def llm_step(*_: Any, ints: torch.Tensor, **__: Any) -> torch.Tensor:
        return torch.zeros(ints.shape[0], dtype=torch.long)

    def llm_prefill(*_: Any, ids: torch.Tensor, **__: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(ids.shape[0], dtype=torch.long), torch.zeros(*ids.shape, llm_hidden)

    def llm_step_with_prompts(*_: Any, ints: torch.Tensor, ids: torch.Tensor, **__: Any):
        return torch.zeros(ints.shape[0], dtype=torch.long), torch.zeros(*ids.shape, llm_hidden)

    def tts_step(*_: Any, ints: torch.Tensor, **__: Any) -> torch.Tensor:
        codes = torch.zeros(ints.shape[0], num_vq, dtype=torch.long)
        codes[:, 0] = torch.where(ints[:, 4] != 0, eos, 0)  # forced EOS (column 4) ends a reply where it is told to
        return codes

    engine.llm._step, engine.llm._prefill_step, engine.tts._step = llm_step, llm_prefill, tts_step
    engine.llm._step_with_prompts = llm_step_with_prompts  # a decode step with prompts riding along
    engine.tts.prefill_text_rows = lambda *_, **__: None
    engine.tts.prefill_audio = lambda *_, **__: None
    engine.tts.project_speaker = lambda *_, **__: torch.zeros(tts_hidden)
    engine.vocoder._decode = lambda codes: torch.zeros(codes.shape[0], codes.shape[1] * 512)


class LoopSampler:
    """Where the loop thread is, sampled every `interval_s` while running (`sys._current_frames`): each function's
    share of samples on top of the stack (itself and the C calls it makes, sleeps included) and anywhere on it. It
    watches just that thread on any Python (cProfile records every thread since 3.12), and costs the loop only the
    moment the sampler holds the interpreter lock."""

    def __init__(self, engine: Engine, interval_s: float = 1e-3):
        self.engine, self.interval_s = engine, interval_s
        self.on_top: defaultdict[str, int] = defaultdict(int)
        self.on_stack: defaultdict[str, int] = defaultdict(int)
        self.samples = 0
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._sample, name="loop-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        if self._thread is not None:
            self._thread.join()

    def _sample(self) -> None:
        ident = self.engine.loop_thread.ident
        while self._running.is_set():
            frame = sys._current_frames().get(ident)
            if frame is not None:
                self.samples += 1
                self.on_top[_where(frame)] += 1
                for where in {_where(f) for f in _stack(frame)}:
                    self.on_stack[where] += 1
            time.sleep(self.interval_s)

    def top(self, n: int) -> str:
        lines = [f"{self.samples} samples of the loop thread, one every {1e3 * self.interval_s:g} ms"]
        for title, counts in (("on top of the stack", self.on_top), ("anywhere on the stack", self.on_stack)):
            lines += ["", f"  share  function ({title})"]
            for where, count in sorted(counts.items(), key=lambda kv: -kv[1])[:n]:
                lines.append(f"{100 * count / max(self.samples, 1):6.1f} %  {where}")
        return "\n".join(lines)


def _stack(frame: FrameType | None):
    while frame is not None:
        yield frame
        frame = frame.f_back


def _where(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    cut = path.rfind("omnivox/")
    return f"{path[cut:] if cut >= 0 else path.rsplit('/', 1)[-1]}:{code.co_firstlineno}({code.co_name})"


async def keep_live(engine: Engine, streams: int, seconds: float, warmup_s: float,
                    profile: LoopSampler | None = None) -> dict[str, Any]:
    """Runs `streams` chats at once for `warmup_s` + `seconds`, replacing each as it ends; returns the loop's host
    time by part over the last `seconds`, per iteration (profiled over them if `profile` is given)."""
    _, items = split_warmup(load_workload())
    script = ReplyScript(items)
    started = [0]
    rows: defaultdict[str, list[int]] = defaultdict(list)  # batch sizes by stage
    engine.on_batch = lambda stage, n: rows[stage].append(n)

    async def one_after_another() -> None:
        while not stop.is_set():
            item = items[started[0] % len(items)]
            started[0] += 1
            stream = engine.stream(item.prompt, seed=started[0], **script.chat(item.prompt))
            try:
                while await stream.next_async() is not None:
                    pass
            finally:
                stream.close()

    stop = asyncio.Event()
    tasks = [asyncio.create_task(one_after_another()) for _ in range(streams)]
    await asyncio.sleep(warmup_s)
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    started_at = [0.0]

    def time_collections(phase: str, info: dict) -> None:
        if phase == "start":
            started_at[0] = time.perf_counter()
        else:
            pauses[info["generation"]].append(time.perf_counter() - started_at[0])

    gc.callbacks.append(time_collections)
    scheduler = engine.scheduler
    cpu_clock = time.pthread_getcpuclockid(engine.loop_thread.ident)  # the loop thread's own CPU time
    cpu0 = time.clock_gettime(cpu_clock)
    parts0, iterations0, live = dict(scheduler.loop_seconds), scheduler.iterations, []
    for stage in rows:
        rows[stage].clear()
    if profile is not None:
        profile.start()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        live.append(len(scheduler.live))
        await asyncio.sleep(0.05)
    wall = time.perf_counter() - t0
    if profile is not None:
        profile.stop()
    # a stream's failure is raised below, not figures of a loop with fewer streams than asked (whose thread may have
    # gone idle and ended: its CPU clock is then gone)
    failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    cpu = 0.0 if failed else time.clock_gettime(cpu_clock) - cpu0
    gc.callbacks.remove(time_collections)
    parts = {k: v - parts0.get(k, 0.0) for k, v in scheduler.loop_seconds.items()}
    iterations = scheduler.iterations - iterations0
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    engine.shutdown()  # while this event loop still runs: the loop thread hands its last chunks to it
    if failed:
        raise failed[0]
    per_it = {k: 1e3 * v / max(iterations, 1) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
    return {"streams": streams, "wall_s": wall, "iterations": iterations, "iterations_per_s": iterations / wall,
            "live_mean": sum(live) / max(len(live), 1), "ms_per_iteration": per_it,
            "ms_per_iteration_total": sum(per_it.values()),
            "loop_cpu_ms_per_iteration": 1e3 * cpu / max(iterations, 1),
            "mean_rows": {k: sum(v) / len(v) for k, v in rows.items() if v},
            "gc_pauses": {f"gen{g}": {"count": len(v), "total_ms": 1e3 * sum(v), "max_ms": 1e3 * max(v, default=0.0)}
                          for g, v in pauses.items()}}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=int, default=96)
    p.add_argument("--seconds", type=float, default=20.0, help="measuring window")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--out", default=None)
    p.add_argument("--no-settle", action="store_true", help="leave the start-up heap unfrozen (the server freezes it)")
    p.add_argument("--with-device", action="store_true", help="keep the step bodies (streams wait for their listener)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (with --with-device)")
    p.add_argument("--full-size", action="store_true", help="the released model's sizes, random weights (GPU)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="sample the loop thread: the N functions it is found in most")
    args = p.parse_args(argv)
    if not args.with_device and (args.full_size or args.device != "cpu"):
        p.error("--full-size and --device are for --with-device runs (a stubbed device runs the tiny model on a CPU)")
    config = EngineConfig(max_concurrent_requests=args.streams)
    if args.full_size:
        engine = Engine.from_pretrained(None, device=args.device, dummy_weights=True, config=config)
    else:
        engine = Engine(build_dummy_model(tiny_config(), device=args.device, dtype=torch.float32, seed=0), config)
    if args.with_device:
        with console.status("warm-up (the shared prompt, the default voice, every step graph)"):
            engine.warm_up()
    else:
        engine.scheduler.config.ahead_limit_s = math.inf  # no stream waits for its listener: as many rows as can be
        stub_device(engine)
    profile = LoopSampler(engine) if args.profile else None
    if not args.no_settle:
        settle_heap()
    result = asyncio.run(keep_live(engine, args.streams, args.seconds, args.warmup, profile))
    device = f"{engine.device} device" if args.with_device else "device stubbed"
    table = Table(title=f"engine loop host time, {args.streams} streams live (mean {result['live_mean']:.1f}), "
                        f"{result['iterations_per_s']:.0f} iterations/s, {device}")
    table.add_column("part")
    table.add_column("ms / iteration", justify="right")
    for part, ms in result["ms_per_iteration"].items():
        table.add_row(part, f"{ms:.3f}")
    table.add_row("total", f"{result['ms_per_iteration_total']:.3f}")
    table.add_row("loop thread CPU time", f"{result['loop_cpu_ms_per_iteration']:.3f}")
    console.print(table)
    console.print("mean rows per batch:", {k: round(v, 1) for k, v in result["mean_rows"].items()})
    console.print("garbage collector:", ", ".join(f"{g}: {p['count']} pauses, longest {p['max_ms']:.1f} ms"
                                                  for g, p in result["gc_pauses"].items()))
    if profile is not None:
        result["profile"] = profile.top(args.profile)
        print(result["profile"])  # plain: rich would wrap the wide lines
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_results(out / "host_bench.json", build_results([], vars(args), kind="host", extra=result))


if __name__ == "__main__":
    main()
