"""The fast path's GPU suite: floors, micro-benchmarks, equivalence, the standard workload and the switch sweep.

    python3 -m omnivox.bench.gpu_suite --out OUT [--parts PART,...]   (floors validate determinism workload
                                                                     sweep micro profile kprofile cprofile)

Parts run in that order, one process. Each command should fit one device call (< 9 min): split the parts over
calls (bench/NOTES-fast-path.md lists a split). Everything runs on full-size dummy weights (seeded random, the
released shapes), so each step costs what it costs with the real model.

* floors: bytes a decode step must read, over the measured copy bandwidth.
* validate: fast vs reference on the same seed (LLM tokens, audio codes, PCM) in fp32 and bf16, incl. segment
  restarts and multi-part read-aloud; `sampling.draw` vs `torch.multinomial` on CUDA.
* determinism: each request twice on engines with and without streams and lookahead (what changes outputs).
* workload: the standard workload, reference then fast default, `--trials` trials (omnivox.bench.harness).
* sweep: the fast default (the engine's defaults: compile=auto, i.e. compile=default on a GPU) plus one switch
  at a time (`--sweep`), `--sweep-trials` trials, ratios to the default.
* micro: ms per LLM token, per TTS step, per DVAE+Vocos window, graph replay times, the reference alongside.
* profile: a torch.profiler Chrome trace of one fast request; kprofile / cprofile: where a step's time goes.

What comes back under OUT (the device tool returns at most 8 files): summary.json (every number),
results.tar.gz (each configuration's results.json), sweep.png, kprofile.txt, trace.tar.gz + profile.txt. The last
thing printed is a short table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import math
import tarfile
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omnivox.bench.harness import run_bench
from omnivox.bench.stats import compare, summarize
from omnivox.bench.workloads import load_workload, split_warmup
from omnivox.config import CONFIGS
from omnivox.engine.engine import Engine, EngineConfig, resolve_compile
from omnivox.engine.fast_runner import FastRunner
from omnivox.engine.pipeline import ASSISTANT_HEADER
from omnivox.engine.runner import EagerRunner
from omnivox.engine.sampling import draw
from omnivox.engine.session import Session
from omnivox.engine.types import SamplingParams
from omnivox.models.loader import build_dummy_model

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "tf32": torch.float32}
# the engine's own defaults: compile=auto is compile=default on a GPU and none on a CPU (micro: also fused=on|off)
DEFAULT = {"precision": "bf16", "compile": "auto", "attention": "sdpa", "overlap": "on"}
SWEEP = [  # one switch at a time from the default, then the seed's final choice
    {"compile": "none"}, {"compile": "reduce-overhead"}, {"compile": "max-autotune"},
    {"precision": "fp16"}, {"precision": "fp32"}, {"precision": "tf32"},
    {"attention": "efficient"}, {"attention": "math"}, {"attention": "cudnn"}, {"attention": "flash"},
    {"compile": "reduce-overhead", "precision": "tf32"}, {"overlap": "off"},
]  # fmt: skip
GOALS = {"ttfb_s": 0.080, "rtf": 0.04}  # issue 4's single-stream goals
LONG_REPLY = " ".join(
    f"Sentence number {i} talks about the sea, the wind and the small boats that sail home at night." for i in range(12)
)
READ_TEXT = " ".join(
    f"Paragraph {i} describes a quiet town by the river, where the bakers wake early." for i in range(20)
)


DEVICE = torch.device("cuda")
SIZE = "full"  # --size tiny runs the same code on the tiny model (a CPU smoke test of the suite itself)


T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def build_model(precision: str):
    return build_dummy_model(CONFIGS[SIZE](), device=DEVICE, dtype=DTYPES[precision], seed=0)


def set_precision_flags(precision: str) -> None:
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default; convolutions only


def label(cfg: dict[str, str]) -> str:
    changed = [f"{k}={v}" for k, v in cfg.items() if DEFAULT.get(k) != v]
    return "+".join(changed) or "default"


# ---- floors -----------------------------------------------------------------------------------------------------
def copy_bandwidth(gib: float = 2.0, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of `reps`)."""
    n = int(gib * 2**30) // 4
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(reps + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        sync()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    free_memory()
    return 2 * n * 4 / float(np.median(times))


def step_bytes(model, kv_positions_llm: int = 0, kv_positions_tts: int = 0) -> dict[str, float]:
    """Bytes a decode step must read: every weight except the embedding tables (one row each), plus the KV of the
    positions it attends to."""

    def weights(module, skip: tuple[str, ...]) -> int:
        return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if not n.startswith(skip))

    llm_cfg, tts_cfg = model.config.llm, model.config.tts
    elt = torch.tensor([], dtype=model.dtype).element_size()
    llm_kv = 2 * llm_cfg.num_hidden_layers * llm_cfg.num_key_value_heads * llm_cfg.head_dim * elt
    tts_kv = 2 * tts_cfg.num_hidden_layers * tts_cfg.hidden_size * elt
    return {
        "llm_weights": weights(model.llm, ("model.embed_tokens",)),
        "tts_weights": weights(model.tts, ("emb_text", "emb_code", "projector")),
        "llm_kv": llm_kv * kv_positions_llm,
        "tts_kv": tts_kv * kv_positions_tts,
    }


# ---- runner-level helpers ---------------------------------------------------------------------------------------
def prompt_ids(model) -> tuple[list[int], list[int]]:
    tok = model.tokenizer
    prompt = tok.encode(
        "<|im_start|>user\nUse the <reserved_53> voice.As an assistant, you will speak using this voice style."
        "<|im_end|>\n<|im_start|>user\nTell me something nice about the sea, please."
    )
    return prompt, tok.encode(ASSISTANT_HEADER)


def llm_tokens(runner, model, n: int, sampling: SamplingParams, seed: int) -> list[int]:
    """n tokens the way the pipeline asks for them (3-token calls, header first), terminators ignored."""
    prompt, header = prompt_ids(model)
    session = Session(cache=runner.new_llm_cache(), capacity=runner.llm_capacity)
    try:
        runner.llm_forward(session, prompt)
        gen = torch.Generator(device=model.device).manual_seed(seed)
        inputs, out = header, []
        while len(out) < n:
            window, chunk = list(inputs), []
            for step in range(3):
                feed = inputs if step == 0 else chunk[-1:]
                token, _ = runner.llm_step(session, feed, window, sampling, gen)
                chunk.append(token)
                window.append(token)
            out += chunk
            inputs = chunk[-1:]
        return out[:n]
    finally:
        runner.release_llm_cache(session.cache)


def time_llm(runner, model, n: int = 96, warm: int = 12) -> float:
    """ms per decode token through llm_step (host read-back of each token included, as the pipeline does)."""
    prompt, header = prompt_ids(model)
    session = Session(cache=runner.new_llm_cache(), capacity=runner.llm_capacity)
    try:
        runner.llm_forward(session, prompt)
        gen = torch.Generator(device=model.device).manual_seed(0)
        token, _ = runner.llm_step(session, header, list(header), SamplingParams(), gen)
        window = [token]
        for i in range(warm + n):
            if i == warm:
                sync()
                t0 = time.perf_counter()
            token, _ = runner.llm_step(session, [token], window[-3:], SamplingParams(), gen)
            window.append(token)
        sync()
        return 1e3 * (time.perf_counter() - t0) / n
    finally:
        runner.release_llm_cache(session.cache)


def tts_state_ready(runner, model):
    state = runner.new_tts_state()
    tts_tok = model.tts_tokenizer
    ids = tts_tok.encode("[Stts][spk_emb]" + "hello there, this is a test of the speech path" + "[Etts]")
    speaker = torch.nn.functional.normalize(torch.randn(model.config.tts.hidden_size, device=model.device), dim=0)
    runner.tts_prefill_text(state, ids, 0, speaker.to(model.dtype))
    return state, len(ids) - 3


def time_tts(runner, model, calls: int = 8) -> float:
    """ms per audio step through tts_generate (25-step calls, EOS banned; one read-back per call included). The
    same calls run twice and the second pass is timed, so graph captures of every bucket stay out of it."""
    for _ in range(2):
        state, num_text = tts_state_ready(runner, model)
        gen = torch.Generator(device=model.device).manual_seed(0)
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            runner.tts_generate(state, 25, num_text, SamplingParams(), gen, eos_after=10**6)
        sync()
        elapsed = time.perf_counter() - t0
        runner.release_tts_state(state)
    return 1e3 * elapsed / (25 * calls)


def time_audio(runner, model, reps: int = 20) -> float:
    """ms per DVAE + Vocos window of 29 tokens (4 of context + 25 new), PCM on the host included."""
    codes = torch.randint(0, 625, (29, model.config.tts.num_vq), device=model.device)
    for _ in range(3):
        runner.decode_audio(codes)
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        runner.decode_audio(codes)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def graph_replay_ms(runner, model, reps: int = 50) -> dict[str, float]:
    """Device time of one captured LLM and one TTS step (back-to-back replays timed with events)."""
    out = {}
    if not getattr(runner, "use_graphs", False):
        return out
    for pool, name in ((runner.llm_pool, "llm"), (runner.tts_pool, "tts")):
        slot = next((s for s in pool.slots if s.graphs), None)
        if slot is None:
            continue
        graph = next(iter(slot.graphs.values()))
        sync()
        with torch.cuda.stream(graph.stream):  # a graph replays on the stream it was captured on (graphs.py)
            saved = slot.io["buf"].clone()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for _ in range(5):
                graph.graph.replay()
                slot.io["buf"].copy_(saved)
            start.record()
            for _ in range(reps):
                graph.graph.replay()
                if name == "tts":
                    slot.io["buf"].copy_(saved)  # keep the position fixed (a 34-element copy)
            end.record()
        sync()
        out[f"{name}_replay_ms"] = start.elapsed_time(end) / reps
        slot.io["buf"].copy_(saved)
    return out


# ---- engine-level equivalence -----------------------------------------------------------------------------------
class Recorder:
    """Wraps a runner's decode_audio_launch and tts_prefill_audio to record every decoded window and restart."""

    def __init__(self, runner):
        self.windows: list[torch.Tensor] = []
        self.restarts = 0
        decode, prefill_audio = runner.decode_audio_launch, runner.tts_prefill_audio

        def rec_decode(codes):
            self.windows.append(codes.detach().cpu())
            return decode(codes)

        def rec_prefill_audio(*args, **kwargs):
            self.restarts += 1
            return prefill_audio(*args, **kwargs)

        runner.decode_audio_launch, runner.tts_prefill_audio = rec_decode, rec_prefill_audio


def run_request(engine: Engine, kind: str, seed: int, sampling: SamplingParams) -> dict[str, Any]:
    """One request to the end; `kind` "short" | "restart" | "read" (multi-part read-aloud)."""
    rec = Recorder(engine.runner)
    if kind == "read":
        stream = engine.read_aloud(READ_TEXT, seed=seed, sampling=sampling, forced_audio_seconds=6.0)
    else:
        reply = "Glad to hear that. The sea is calm today." if kind == "short" else LONG_REPLY
        stream = engine.stream(
            "Tell me about the sea.",
            seed=seed,
            sampling=sampling,
            forced_reply=reply,
            forced_audio_seconds=4.0 if kind == "short" else 20.0,  # the long reply restarts the TTS segment once
        )
    pcm = np.concatenate([c.pcm for c in stream] or [np.zeros(0, np.float32)])
    codes = torch.cat(rec.windows) if rec.windows else torch.zeros(0, 4, dtype=torch.long)
    for name in ("decode_audio_launch", "tts_prefill_audio"):
        delattr(engine.runner, name)
    return {
        "pcm": pcm,
        "codes": codes,
        "text": stream.metrics.reply_text,
        "restarts": rec.restarts,
        "tts_steps": stream.metrics.tts_steps,
    }


def compare_requests(a: dict, b: dict) -> dict[str, Any]:
    same_codes = a["codes"].shape == b["codes"].shape and bool(torch.equal(a["codes"], b["codes"]))
    n = min(len(a["codes"]), len(b["codes"]))
    agree = float((a["codes"][:n] == b["codes"][:n]).all(-1).float().mean()) if n else math.nan
    out = {
        "codes_identical": same_codes,
        "code_rows_agree": agree,
        "rows": [len(a["codes"]), len(b["codes"])],
        "restarts": [a["restarts"], b["restarts"]],
        "tts_steps": [a["tts_steps"], b["tts_steps"]],
    }
    if len(a["pcm"]) == len(b["pcm"]) and len(a["pcm"]):
        diff = np.abs(a["pcm"] - b["pcm"])
        out["pcm_max_abs"] = float(diff.max())
        out["pcm_rel_l2"] = float(np.linalg.norm(a["pcm"] - b["pcm"]) / max(np.linalg.norm(a["pcm"]), 1e-12))
    else:
        out["pcm_lengths"] = [len(a["pcm"]), len(b["pcm"])]
    return out


def part_determinism(
    summary: dict, precision: str, kinds: list[str], names: list[str], attention: str, deterministic: bool
) -> None:
    """Whether a request's outputs repeat, and whether the overlap changes them: each request twice on engines that
    differ only in streams (three, or one for all) and lookahead (8 chunks, or none), graphs captured lazily; each
    run's codes against the first run of the first engine (first differing window row; -1: identical).
    `deterministic`: under torch.use_deterministic_algorithms(warn_only=True), whose warnings name the ops that
    have no deterministic kernel."""
    set_precision_flags(precision)
    model = build_model(precision)
    variants = {"sequential": (False, 0), "lookahead": (False, 8), "streams": (True, 0), "overlap": (True, 8)}
    res: dict[str, Any] = {}
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in kinds:
            base = None
            for name in names:
                streams, lookahead = variants[name]
                config = EngineConfig(path="fast", max_concurrent_requests=2, compile="none", attention=attention,
                                      overlap=streams, llm_lookahead=lookahead)  # fmt: skip
                engine = Engine(model, config)
                # overlap=False also turns the lookahead off: put it back on the one-stream runner it built
                engine.config = dataclasses.replace(engine.config, overlap=True)
                for run in (1, 2):
                    out = run_request(engine, kind, seed=11, sampling=SamplingParams())
                    base = base or out
                    res[f"{kind} {name} run{run}"] = first_difference(base["codes"], out["codes"])
                del engine
                free_memory()
    torch.use_deterministic_algorithms(False)
    key = f"{precision} attention={attention}" + (" deterministic" if deterministic else "")
    res["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught if deterministic})
    summary.setdefault("determinism", {})[key] = res
    log(f"determinism {key}: {json.dumps(res)}")
    del model
    free_memory()


def first_difference(a: torch.Tensor, b: torch.Tensor) -> int:
    """First row where two code tensors differ (-1: identical; the shorter length when one is a prefix)."""
    n = min(len(a), len(b))
    rows = (a[:n] != b[:n]).any(-1).nonzero()
    if len(rows):
        return int(rows[0])
    return -1 if len(a) == len(b) else n


def first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def part_validate(summary: dict, precisions: list[str], kinds: list[str], compiled: bool, warm: bool) -> None:
    """fast vs reference (and vs static for LLM tokens); the fast path with overlap vs without (must be identical:
    same kernels, other streams); with `compiled`, the fast path with compile=default against both."""
    dev = DEVICE
    # torch.multinomial and sampling.draw draw the same ids from the same generator state (CUDA)
    probs = torch.rand(4, 626, device=dev).softmax(-1)
    g1, g2 = torch.Generator(device=dev).manual_seed(3), torch.Generator(device=dev).manual_seed(3)
    same = all(torch.equal(torch.multinomial(probs, 1, generator=g1).squeeze(-1), draw(probs, g2)) for _ in range(50))
    summary["validate"] = {"draw_equals_multinomial_cuda": same}
    for precision in precisions:
        set_precision_flags(precision)
        model = build_model(precision)
        res: dict[str, Any] = {}
        ref = Engine(model, EngineConfig(path="reference", max_concurrent_requests=2))
        static = Engine(model, EngineConfig(path="static", max_concurrent_requests=2))
        fast = Engine(model, EngineConfig(path="fast", max_concurrent_requests=2, compile="none"))
        sequential = Engine(model, EngineConfig(path="fast", max_concurrent_requests=2, compile="none", overlap=False))
        others = {"sequential": sequential}
        if compiled:
            others["compiled"] = Engine(model, EngineConfig(path="fast", max_concurrent_requests=2, compile="default"))
        if warm:  # capture every graph before the first request (as a served engine does)
            for engine in (fast, *others.values()):
                engine.runner.warm_up()
        for greedy in (False, True):
            sampling = SamplingParams(greedy=greedy)
            toks = {
                name: llm_tokens(e.runner, model, 48, sampling, seed=5)
                for name, e in (("reference", ref), ("static", static), ("fast", fast))
            }
            key = "greedy" if greedy else "sampled"
            res[f"llm_{key}"] = {
                "fast_vs_reference_first_divergence": first_divergence(toks["fast"], toks["reference"]),
                "fast_vs_static_first_divergence": first_divergence(toks["fast"], toks["static"]),
                "n": 48,
            }
        if compiled:
            toks = [llm_tokens(e.runner, model, 48, SamplingParams(), seed=5) for e in (ref, fast, others["compiled"])]
            res["llm_compiled"] = {
                "vs_reference_first_divergence": first_divergence(toks[2], toks[0]),
                "vs_fast_first_divergence": first_divergence(toks[2], toks[1]),
                "n": 48,
            }
        for kind in kinds:
            outs = {
                name: run_request(e, kind, seed=11, sampling=SamplingParams())
                for name, e in (("reference", ref), ("fast", fast), *others.items())
            }
            res[f"request_{kind}"] = compare_requests(outs["reference"], outs["fast"])
            for name in others:
                res[f"request_{kind}_{name}_vs_fast"] = compare_requests(outs["fast"], outs[name])
            if compiled:
                res[f"request_{kind}_compiled_vs_reference"] = compare_requests(outs["reference"], outs["compiled"])
        res["slots_free_after"] = fast.runner.stats()
        res["warmed_up"] = warm
        summary["validate"][precision] = res
        log(f"validate {precision}: {json.dumps(res)}")
        del ref, static, fast, sequential, others, model
        free_memory()


# ---- micro-benchmarks -------------------------------------------------------------------------------------------
def part_micro(summary: dict, bandwidth: float, configs: list[dict[str, str]], out: Path) -> None:
    model, model_precision = None, None
    summary.setdefault("micro", {})
    for cfg in configs:
        cfg = {**DEFAULT, **cfg}
        name = label(cfg)
        set_precision_flags(cfg["precision"])
        if model_precision != DTYPES[cfg["precision"]]:
            model = None
            free_memory()
            model = build_model(cfg["precision"])
            model_precision = DTYPES[cfg["precision"]]
        floors = step_bytes(model)
        row: dict[str, Any] = {}
        try:
            t0 = time.perf_counter()
            fused = {"auto": None, "on": True, "off": False}[cfg.get("fused", "auto")]
            compile = resolve_compile(cfg["compile"], DEVICE)
            fast = FastRunner(model, llm_slots=1, tts_slots=1, compile=compile, attention=cfg["attention"],
                              fused=fused)  # fmt: skip
            row["llm_ms"] = time_llm(fast, model)
            row["tts_ms"] = time_tts(fast, model)
            row["audio_ms"] = time_audio(fast, model)
            row.update(graph_replay_ms(fast, model))
            row["setup_and_measure_s"] = time.perf_counter() - t0
            del fast
        except Exception as e:  # a switch that cannot run is a result, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        if {k for k, v in cfg.items() if DEFAULT.get(k) != v} <= {"precision"}:  # once per dtype: the reference
            ref = EagerRunner(model, cache="growing")
            row["ref_llm_ms"] = time_llm(ref, model, n=24, warm=3)
            row["ref_tts_ms"] = time_tts(ref, model, calls=2)
            row["ref_audio_ms"] = time_audio(ref, model, reps=5)
            del ref
        row["llm_floor_ms"] = 1e3 * floors["llm_weights"] / bandwidth
        row["tts_floor_ms"] = 1e3 * floors["tts_weights"] / bandwidth
        if "llm_ms" in row:
            row["llm_x_floor"] = row["llm_ms"] / row["llm_floor_ms"]
        summary["micro"][name] = row
        log(f"micro {name}: {json.dumps(row)}")
        write_summary(out, summary)
        free_memory()
    del model
    free_memory()


# ---- workload ---------------------------------------------------------------------------------------------------
def workload_items(max_items: int | None):
    items = load_workload()
    warmup, measured = split_warmup(items)
    measured = measured[:max_items] if max_items else measured
    return ([warmup] if warmup else []) + measured


def bench_config(model, cfg: dict[str, str], path: str, items, trials: int, tmp: Path) -> dict[str, Any]:
    name = f"{path}-{label(cfg)}" if path == "fast" else "reference"
    engine = Engine(
        model,
        EngineConfig(
            path=path,
            max_concurrent_requests=2,
            compile=cfg["compile"],
            attention=cfg["attention"],
            overlap=cfg["overlap"] == "on",
        ),
    )
    results = run_bench(
        engine,
        items,
        trials,
        tmp / name,
        seed=0,
        dummy_weights=True,
        progress=True,
        config={"name": name, "path": path, **cfg},
    )
    del engine
    free_memory()
    return results


def summarize_results(results: dict[str, Any]) -> dict[str, Any]:
    ok = [s for s in results["samples"] if not s.get("error")]
    out = {"n": len(ok), "errors": len(results["samples"]) - len(ok)}
    for key in ("ttfb_s", "rtf"):
        s = summarize(x[key] for x in ok)
        out[key] = {"median": s.median, "ci95": [s.ci95_low, s.ci95_high], "p95": s.p95, "mean": s.mean}
    for stage, count in (("llm", "llm_tokens"), ("tts", "tts_steps"), ("audio", "tts_calls")):
        total = sum(x["stages"].get(stage, 0.0) for x in ok)
        steps = sum(x[count] for x in ok)
        out[f"{stage}_ms_per_{count}"] = 1e3 * total / steps if steps else math.nan
    return out


def part_workload(
    summary: dict,
    configs: list[dict[str, str]],
    include_reference: bool,
    trials: int,
    max_items: int | None,
    tmp: Path,
    out: Path,
    kept: list[dict[str, Any]],
) -> None:
    """Each configuration's raw samples are added to `kept` and written to `out` as soon as it finishes, so a run
    stopped at its time limit still returns every configuration it completed."""
    items = workload_items(max_items)
    all_results = []
    model, model_precision = None, None
    summary.setdefault("workload", {})
    runs = ([("reference", {**DEFAULT})] if include_reference else []) + [("fast", {**DEFAULT, **c}) for c in configs]
    for path, cfg in runs:
        set_precision_flags(cfg["precision"])
        if model_precision != DTYPES[cfg["precision"]]:
            model = None
            free_memory()
            model = build_model(cfg["precision"])
            model_precision = DTYPES[cfg["precision"]]
        name = f"{path}-{label(cfg)}" if path == "fast" else "reference"
        log(f"workload {name}: {trials} trials x {len(items) - 1} requests")
        try:
            results = bench_config(model, cfg, path, items, trials, tmp)
        except Exception as e:
            summary["workload"][name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            log(f"workload {name} failed: {summary['workload'][name]['error']}")
            continue
        all_results.append(results)
        kept.append(results)
        summary["workload"][name] = summarize_results(results)
        log(f"workload {name}: {json.dumps(summary['workload'][name])}")
        write_results(out, kept)
        write_summary(out, summary)
    base = next((r for r in all_results if r["config"]["name"] == "fast-default"), None)
    ref = next((r for r in all_results if r["config"]["name"] == "reference"), None)
    for r in all_results:
        entry = summary["workload"][r["config"]["name"]]
        for other, key in ((base, "vs_fast_default"), (ref, "vs_reference")):
            if other is None or other is r:
                continue
            entry[key] = {}
            for metric in ("ttfb_s", "rtf"):
                c = compare([s[metric] for s in other["samples"]], [s[metric] for s in r["samples"]])
                entry[key][metric] = {
                    "ratio": c.ratio,
                    "ci95": [c.ratio_low, c.ratio_high],
                    "p": c.p_value,
                    "verdict": c.verdict,
                }
    del model
    free_memory()


# ---- profile ----------------------------------------------------------------------------------------------------
def part_profile(out: Path, cfg: dict[str, str]) -> None:
    cfg = {**DEFAULT, **cfg}
    set_precision_flags(cfg["precision"])
    model = build_model(cfg["precision"])
    engine = Engine(model, EngineConfig(path="fast", compile=cfg["compile"], attention=cfg["attention"]))
    item = workload_items(1)[-1]
    for i in range(2):
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ctx = torch.profiler.profile(activities=activities) if i else contextlib.nullcontext()
        with ctx as prof:
            stream = engine.stream(item.prompt, seed=0, forced_reply=item.reply, forced_audio_seconds=3.0)
            for _ in stream:
                pass
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, tarfile.open(out / "trace.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("trace.json")
        data = f.read()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    trace.unlink()
    (out / "profile.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    del engine, model
    free_memory()


# ---- diagnosis: where a decode step's time goes -----------------------------------------------------------------
def events_ms(fn, reps: int = 50, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    if DEVICE.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1e3 * (time.perf_counter() - t0) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    sync()
    return start.elapsed_time(end) / reps


def graph_ms(fn, inner: int = 20, reps: int = 10, generators: tuple = ()) -> float:
    """Device time of one `fn()` inside a CUDA graph of `inner` back-to-back calls (launch gaps as in our graphs)."""
    if DEVICE.type != "cuda":
        return events_ms(fn, reps=reps)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return events_ms(graph.replay, reps=reps, warm=2) / inner


def gemv_us(n: int, k: int) -> dict[str, float]:
    """x @ W^T with W [n, k] bf16: as the model calls it (x [1, 1, k]: a matrix-matrix kernel) and as a
    matrix-vector product; weights rotated over > 200 MB so that L2 never holds one."""
    copies = max(1, int(2e8 // (n * k * 2)))
    weights = [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(1, 1, k, device=DEVICE, dtype=torch.bfloat16)
    out = {}
    for name, op in (("mm", lambda w: torch.nn.functional.linear(x, w)), ("mv", lambda w: torch.mv(w, x.view(k)))):

        def run(op=op):
            for w in weights:
                op(w)

        us = 1e3 * graph_ms(run, inner=max(1, 20 // copies)) / copies
        out[name] = round(us, 2)
        out[f"{name}_tb_s"] = round(n * k * 2 / (us * 1e-6) / 1e12, 3)
    return out


def attention_us() -> dict[str, Any]:
    """Device time of one decode-step attend() per backend: LLM (28 q heads over 4 kv heads, 128) and TTS
    (12 heads, 64), 512 keys of a larger cache, boolean mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from omnivox.models.layers import attend

    out = {}
    for name, heads, kv_heads, dim, cap in (("llm", 28, 4, 128, 4096), ("tts", 12, 12, 64, 2560)):
        q = torch.randn(1, heads, 1, dim, device=DEVICE, dtype=torch.bfloat16)
        k, v = (torch.randn(1, kv_heads, cap, dim, device=DEVICE, dtype=torch.bfloat16)[:, :, :512] for _ in "kv")
        mask = (torch.arange(512, device=DEVICE) <= 300)[None, None, None]
        for backend in ("default", "EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION"):
            ctx = contextlib.nullcontext() if backend == "default" else sdpa_kernel([getattr(SDPBackend, backend)])
            try:
                with ctx:
                    out[f"{name} {backend}"] = round(1e3 * graph_ms(lambda: attend(q, k, v, mask, dim**-0.5)), 2)  # noqa: B023
            except RuntimeError as e:
                out[f"{name} {backend}"] = f"error: {str(e).splitlines()[0][:80]}"
    return out


def step_replay_ms(model, fused: bool, attention: str = "sdpa") -> dict[str, float]:
    """One captured LLM step and one captured TTS step of a FastRunner, replay time (device)."""
    runner = FastRunner(model, llm_slots=1, tts_slots=1, fused=fused, attention=attention)
    llm_slot, tts_slot = runner.llm_pool.slots[0], runner.tts_pool.slots[0]
    llm_slot.io["buf"].copy_(torch.tensor([100, 300] + [5] * 32))
    tts_slot.io["buf"][:8].copy_(torch.tensor([400, 0, 40, 10, 1 << 40, 0, 0, 0]))
    sampling, gen = SamplingParams(), torch.Generator(device=DEVICE).manual_seed(0)
    saved = tts_slot.io["buf"].clone()

    def tts_step():
        runner._tts_step_fn(tts_slot, 512, sampling, False, gen)
        tts_slot.io["buf"].copy_(saved)

    with torch.inference_mode(), runner._attention():
        return {
            "llm": round(graph_ms(lambda: runner._llm_step_fn(llm_slot, 512, sampling, gen), 5, generators=(gen,)), 3),
            "tts": round(graph_ms(tts_step, inner=20, generators=(gen,)), 3),
        }


def part_kprofile(summary: dict, out: Path, bandwidth: float) -> None:
    """Where a decode step's device time goes (bf16): weight-shape GEMV bandwidth (matrix-matrix vs
    matrix-vector kernels), attention per backend, sampling, whole captured steps with each choice, and a
    per-kernel profile of one eager LLM and one eager TTS step."""
    from omnivox.engine.sampling import sample_llm_token

    res: dict[str, Any] = {"gemv_us": {}}
    shapes = {"llm q/o": (3584, 3584), "llm k/v": (512, 3584), "llm gate/up": (18944, 3584),
              "llm down": (3584, 18944), "llm lm_head": (151700, 3584), "llm qkv fused": (4608, 3584),
              "llm gate+up fused": (37888, 3584), "tts q/k/v/o": (768, 768), "tts gate/up": (3072, 768),
              "tts down": (768, 3072), "tts head": (626, 768)}  # fmt: skip
    for name, (n, k) in shapes.items() if SIZE == "full" else ():
        res["gemv_us"][name] = gemv_us(n, k)
    log(f"gemv: {json.dumps(res['gemv_us'])}")
    logits = torch.randn(151700, device=DEVICE) * 3
    window = torch.randint(0, 151700, (32,), device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    res["llm_sampling_us"] = 1e3 * graph_ms(
        generators=(gen,),
        fn=lambda: sample_llm_token(
            logits, window, temperature=0.7, top_k=100, top_p=0.8, repetition_penalty=1.05, greedy=False, generator=gen
        ),
    )
    res["attention_us"] = attention_us() if SIZE == "full" else {}
    log(f"attention: {json.dumps(res['attention_us'])}")
    model = build_model("bf16")
    for fused in (False, True):
        for attention in ("sdpa", "efficient") if DEVICE.type == "cuda" else ("sdpa",):
            res[f"step_replay_ms fused={fused} {attention}"] = step_replay_ms(model, fused, attention)
    log(f"steps: {json.dumps({k: v for k, v in res.items() if k.startswith('step')})}")
    res.update(profile_steps(FastRunner(model, llm_slots=1, tts_slots=1, fused=True), out / "kprofile.txt"))
    summary["kprofile"] = res
    log(f"kprofile: {json.dumps(res, indent=1)}")


NOT_KERNELS = ("aten::", "Torch-Compiled", "CompiledFunction", "TorchDynamo", "## ", "Memcpy", "Memset")


def profile_steps(runner: FastRunner, path: Path, warm: int = 3) -> dict[str, Any]:
    """Per-kernel device time of one LLM and one TTS decode step run eagerly (compiled bodies included: with
    --parts cprofile the runner's bodies are torch.compile'd), bf16, 512 keys."""
    res: dict[str, Any] = {}
    llm_slot, tts_slot = runner.llm_pool.slots[0], runner.tts_pool.slots[0]
    llm_slot.io["buf"].copy_(torch.tensor([100, 300] + [5] * 32))
    tts_slot.io["buf"][:8].copy_(torch.tensor([400, 0, 40, 10, 1 << 40, 0, 0, 0]))
    sampling, gen = SamplingParams(), torch.Generator(device=DEVICE).manual_seed(0)

    def llm_step():
        runner._llm_step_fn(llm_slot, 512, sampling, gen)

    def tts_step():
        tts_slot.io["buf"][:2].copy_(torch.tensor([400, 0], device=DEVICE))
        runner._tts_step_fn(tts_slot, 512, sampling, False, gen)

    with torch.inference_mode(), runner._attention():
        tables = []
        for name, fn in (("llm", llm_step), ("tts", tts_step)):
            for _ in range(warm):
                fn()
            sync()
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(5):
                    fn()
                sync()
            kernels = [e for e in prof.key_averages() if e.device_time_total > 0 and not e.key.startswith(NOT_KERNELS)]
            res[f"{name}_kernels_per_step"] = sum(e.count for e in kernels) / 5
            res[f"{name}_kernel_us_per_step"] = sum(e.device_time_total for e in kernels) / 5
            res[f"{name}_top"] = [
                (e.key[:60], e.count // 5, round(e.device_time_total / 5, 1))
                for e in sorted(kernels, key=lambda e: -e.device_time_total)[:16]
            ]
            tables.append(f"== {name} ==\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=50))
        path.write_text("\n".join(tables))
    return res


def part_cprofile(summary: dict, out: Path, cfg: dict[str, str]) -> None:
    """profile_steps for a compiled configuration (default: compile=default)."""
    cfg = {**DEFAULT, "compile": "default", **cfg}
    set_precision_flags(cfg["precision"])
    model = build_model(cfg["precision"])
    compile = resolve_compile(cfg["compile"], DEVICE)
    runner = FastRunner(model, llm_slots=1, tts_slots=1, compile=compile, attention=cfg["attention"])
    res = profile_steps(runner, out / f"cprofile-{label(cfg).replace('=', '-').replace('+', '_')}.txt")
    summary.setdefault("cprofile", {})[label(cfg)] = res
    log(f"cprofile {label(cfg)}: {json.dumps(res, indent=1)}")


# ---- main -------------------------------------------------------------------------------------------------------
def parse_sweep(spec: str) -> list[dict[str, str]]:
    """'compile=default;precision=fp32;...' or 'all' (SWEEP) -> configs."""
    if spec == "all":
        return list(SWEEP)
    configs = []
    for part in filter(None, spec.split(";")):
        configs.append(dict(kv.split("=", 1) for kv in part.split("+")))
    return configs


def final_table(summary: dict) -> str:
    lines = [
        f"device {summary['device']}  torch {summary['torch']}  copy bandwidth "
        f"{summary.get('bandwidth_tb_s', math.nan):.2f} TB/s"
    ]
    for name, row in summary.get("micro", {}).items():
        if "error" in row:
            lines.append(f"micro  {name:<32} ERROR {row['error'][:80]}")
            continue
        lines.append(
            f"micro  {name:<32} llm {row['llm_ms']:.2f} ms ({row['llm_x_floor']:.2f}x floor "
            f"{row['llm_floor_ms']:.2f}) tts {row['tts_ms']:.3f} ms audio {row['audio_ms']:.2f} ms"
            + (
                f" | ref llm {row['ref_llm_ms']:.1f} tts {row['ref_tts_ms']:.2f} audio {row['ref_audio_ms']:.1f}"
                if "ref_llm_ms" in row
                else ""
            )
            + (f" | replay llm {row.get('llm_replay_ms', math.nan):.2f} tts {row.get('tts_replay_ms', math.nan):.3f}")
        )
    for name, row in summary.get("workload", {}).items():
        if "error" in row:
            lines.append(f"bench  {name:<32} ERROR {row['error'][:80]}")
            continue
        vs = row.get("vs_fast_default", {}).get("rtf")
        lines.append(
            f"bench  {name:<32} n={row['n']:<3} TTFB p50 {1e3 * row['ttfb_s']['median']:.1f} ms "
            f"[{1e3 * row['ttfb_s']['ci95'][0]:.1f}, {1e3 * row['ttfb_s']['ci95'][1]:.1f}]  RTF p50 "
            f"{row['rtf']['median']:.4f}" + (f"  RTF/default {vs['ratio']:.3f} {vs['verdict']}" if vs else "")
        )
    for precision, res in summary.get("determinism", {}).items():
        rows = ", ".join(f"{k} {v}" for k, v in res.items() if k != "warnings")
        lines.append(f"determ {precision} (first differing row vs the first run, -1 = same): {rows}")
        lines += [f"       warning: {w}" for w in res.get("warnings", [])]
    v = summary.get("validate", {})
    for precision in ("fp32", "bf16", "fp16", "tf32"):
        if precision in v:
            r = v[precision]
            parts = [
                f"llm sampled div@{r['llm_sampled']['fast_vs_reference_first_divergence']}"
                f"/{r['llm_sampled']['fast_vs_static_first_divergence']}",
                f"greedy div@{r['llm_greedy']['fast_vs_reference_first_divergence']}"
                f"/{r['llm_greedy']['fast_vs_static_first_divergence']} of 48",
            ]
            for kind in ("short", "restart", "read"):
                if f"request_{kind}" in r:
                    q = r[f"request_{kind}"]
                    parts.append(
                        f"{kind}: codes {'==' if q['codes_identical'] else 'DIFF'} "
                        f"({q['code_rows_agree']:.3f}) pcm max {q.get('pcm_max_abs', math.nan):.2e}"
                    )
            for name in ("sequential", "compiled"):
                same = [
                    f"{kind} {'==' if r[key]['codes_identical'] else 'DIFF'} ({r[key]['code_rows_agree']:.3f})"
                    for kind in ("short", "restart", "read")
                    if (key := f"request_{kind}_{name}_vs_fast") in r
                ]
                if same:
                    parts.append(f"fast vs {name}: " + ", ".join(same))
            if "llm_compiled" in r:
                c = r["llm_compiled"]
                parts.append(f"compiled llm div@{c['vs_reference_first_divergence']}/{c['vs_fast_first_divergence']}")
            lines.append(f"equiv  {precision}: " + "; ".join(parts))
    if "validate" in summary:
        lines.append(f"equiv  draw == multinomial on CUDA: {summary['validate']['draw_equals_multinomial_cuda']}")
    return "\n".join(lines)


def write_results(out: Path, results: list[dict[str, Any]]) -> None:
    """Every finished configuration's raw samples, one results.json each, in one archive (rewritten each time)."""
    with tarfile.open(out / "results.tar.gz", "w:gz") as tar:
        for r in results:
            data = json.dumps(r, indent=1).encode()
            info = tarfile.TarInfo(f"{r['config']['name']}/results.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_summary(out: Path, summary: dict) -> None:
    """Written after each part, so a run stopped at its time limit still returns what it measured."""
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--parts",
        default="floors,validate,micro",
        help="any of floors,validate,determinism,workload,sweep,micro,profile,kprofile,cprofile",
    )
    p.add_argument("--trials", type=int, default=5, help="workload trials for reference and fast-default")
    p.add_argument("--sweep-trials", type=int, default=3)
    p.add_argument("--items", type=int, default=None, help="use only the first N workload requests")
    p.add_argument("--sweep", default="all", help="'all' or e.g. 'compile=default;precision=fp32'")
    p.add_argument("--micro-configs", default="default", help="'default' (the engine's defaults), 'all' or a spec")
    p.add_argument("--validate-precisions", default="fp32,bf16")
    p.add_argument("--validate-kinds", default="short,restart,read")
    p.add_argument("--validate-compile", action="store_true", help="validate: also the compile=default fast path")
    p.add_argument("--validate-warm", action="store_true", help="validate: warm_up() the fast engines first")
    p.add_argument("--determinism-engines", default="sequential,lookahead,streams,overlap")
    p.add_argument("--determinism-attention", default="sdpa", help="determinism: attention backends, comma list")
    p.add_argument("--determinism-both", action="store_true", help="determinism: also deterministic algorithms")
    p.add_argument("--workload-configs", default="", help="workload part: fast configs besides the default (spec)")
    p.add_argument("--no-reference", action="store_true", help="workload part: skip the reference path")
    p.add_argument("--profile-config", default="", help="sweep spec of the profiled configuration")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the suite with --size tiny")
    p.add_argument("--size", default="full", choices=["full", "tiny"])
    args = p.parse_args(argv)
    global DEVICE, SIZE
    DEVICE, SIZE = torch.device(args.device), args.size
    cuda = DEVICE.type == "cuda"
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "args": vars(args) | {"out": str(args.out)},
    }
    summary["bandwidth_tb_s"] = copy_bandwidth() / 1e12 if cuda else 0.05
    bandwidth = summary["bandwidth_tb_s"] * 1e12
    if "floors" in parts:
        model = build_model("bf16")
        b = step_bytes(model, kv_positions_llm=100, kv_positions_tts=400)
        summary["floors"] = {k: v / 1e9 for k, v in b.items()} | {
            "llm_floor_ms": 1e3 * b["llm_weights"] / bandwidth,
            "tts_floor_ms": 1e3 * b["tts_weights"] / bandwidth,
            "note": "GB per step, bf16; kv at 100 LLM / 400 TTS positions",
        }
        log(f"floors: {json.dumps(summary['floors'])}")
        del model
        free_memory()
    tmp = Path(tempfile.mkdtemp())
    all_results: list[dict[str, Any]] = []
    if "validate" in parts:
        kinds = args.validate_kinds.split(",")
        part_validate(summary, args.validate_precisions.split(","), kinds, args.validate_compile, args.validate_warm)
        write_summary(args.out, summary)
    if "determinism" in parts:
        names, kinds = args.determinism_engines.split(","), args.validate_kinds.split(",")
        for precision in args.validate_precisions.split(","):
            for attention in args.determinism_attention.split(","):
                for deterministic in (False, True) if args.determinism_both else (False,):
                    part_determinism(summary, precision, kinds, names, attention, deterministic)
        write_summary(args.out, summary)
    if "workload" in parts:
        configs = [{}] + parse_sweep(args.workload_configs)
        part_workload(summary, configs, not args.no_reference, args.trials, args.items, tmp, args.out, all_results)
        write_summary(args.out, summary)
    if "sweep" in parts:
        configs = parse_sweep(args.sweep)
        if "workload" not in parts:
            configs = [{}] + configs
        part_workload(summary, configs, False, args.sweep_trials, args.items, tmp, args.out, all_results)
        write_summary(args.out, summary)
    if all_results:
        with contextlib.suppress(Exception):
            from omnivox.bench.plot import plot_distributions

            plot_distributions(all_results, [r["config"]["name"] for r in all_results], args.out / "sweep.png")
        with contextlib.suppress(Exception):
            from omnivox.bench.plot import plot_medians

            title = f"{summary['device']}, full-size dummy weights: medians and 95 % CIs"
            plot_medians(summary["workload"], args.out / "medians.png", title, GOALS)
    if "micro" in parts:
        spec = args.micro_configs
        configs = [{}] + ([] if spec == "default" else parse_sweep(spec))
        part_micro(summary, bandwidth, configs, args.out)
    if "profile" in parts:
        cfg = parse_sweep(args.profile_config)[0] if args.profile_config else {}
        part_profile(args.out, cfg)
    if "cprofile" in parts:
        part_cprofile(summary, args.out, parse_sweep(args.profile_config)[0] if args.profile_config else {})
        write_summary(args.out, summary)
    if "kprofile" in parts:
        part_kprofile(summary, args.out, bandwidth)
        write_summary(args.out, summary)
        free_memory()
    summary["wall_s"] = time.perf_counter() - started
    write_summary(args.out, summary)
    print("\n" + final_table(summary), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
