"""Model build and load benchmark (GPU): dummy build time and memory, full synthetic checkpoint cold/warm load.

    python3 -m omnivox.bench.load_bench --out OUT --ckpt /tmp/omnivox-full

1. `build_dummy_model` (released config, seeded random weights made on the device): seconds and GPU memory.
2. `make-checkpoint --size full` into --ckpt on the machine's local disk (skipped if it exists).
3. Cold load: the OS page cache is dropped first (needs root; reported if it could not be), then
   `load_speech_model` with its read / host-to-device / prepare breakdown; then a warm load (files cached).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(fn) -> tuple[object, float, int]:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - t0, torch.cuda.memory_allocated() - base


def main() -> None:
    from omnivox.models.loader import build_dummy_model, load_speech_model
    from omnivox.models.synthetic import write_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="out/load-bench")
    parser.add_argument("--ckpt", default="/tmp/omnivox-full")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype}

    model, seconds, memory = measure(lambda: build_dummy_model(device="cuda", dtype=dtype, seed=0))
    report["dummy_build"] = {"seconds": seconds, "gpu_bytes": memory, "params": model.param_counts()}
    del model

    ckpt = Path(args.ckpt)
    if not (ckpt / "model.safetensors.index.json").exists():
        t0 = time.perf_counter()
        write_checkpoint(ckpt, size="full", seed=0, dtype=torch.bfloat16, progress=True)
        report["write_full_s"] = time.perf_counter() - t0
    report["checkpoint_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())

    for name in ("cold", "warm"):
        dropped = drop_page_cache() if name == "cold" else None
        model, seconds, memory = measure(lambda: load_speech_model(ckpt, device="cuda", dtype=dtype, progress=True))
        report[f"load_{name}"] = {"seconds": seconds, "gpu_bytes": memory, "page_cache_dropped": dropped,
                                  **model.load_times}
        del model

    (out / "load_bench.json").write_text(json.dumps(report, indent=2))
    table = Table(title=f"speech path build / load on {report['device']} ({args.dtype}, dummy/synthetic weights)")
    for col in ("what", "seconds", "read", "h2d", "prepare", "GPU memory"):
        table.add_column(col, justify="right" if col != "what" else "left")
    d = report["dummy_build"]
    table.add_row("build_dummy_model (full)", f"{d['seconds']:.2f}", "", "", "", gib(d["gpu_bytes"]))
    if "write_full_s" in report:
        table.add_row(f"write full checkpoint ({gib(report['checkpoint_bytes'])})", f"{report['write_full_s']:.1f}",
                      "", "", "", "")
    for name in ("cold", "warm"):
        r = report[f"load_{name}"]
        label = f"load {name}" + (" (page cache NOT dropped)" if name == "cold" and not r["page_cache_dropped"] else "")
        table.add_row(label, f"{r['seconds']:.2f}", f"{r['read_s']:.2f}", f"{r['h2d_s']:.2f}", f"{r['prepare_s']:.2f}",
                      gib(r["gpu_bytes"]))
    console.print(table)
    print(json.dumps({k: v for k, v in report.items() if k != "dummy_build"}, default=str)[:2000])
    print(f"cpu count {os.cpu_count()}")


if __name__ == "__main__":
    main()
