"""Text and tables for bench results. Helpers return strings or rich Tables; the CLI prints them.

`aggregate_block` reproduces the original MiniCPM-o realtime benchmark's final block line for line (means and
population std, as it computed them with np.mean / np.std), so old logs and new runs can be read side by side.
The tables add what that block lacks: medians, p95 and confidence intervals, and a noise-aware comparison.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from rich.table import Table

from omnivox.bench.stats import compare, finite, summarize
from omnivox.engine.types import STAGES

Sample = dict[str, Any]


def _generation_s(s: Sample) -> float | None:
    if s.get("generation_s") is not None:
        return s["generation_s"]
    stages = s.get("stages") or {}
    return stages.get("llm", 0.0) + stages.get("tts", 0.0)


def _stage(name: str) -> Callable[[Sample], float | None]:
    return lambda s: (s.get("stages") or {}).get(name)


# (row label, how to read it from a sample, unit printed after the number)
METRICS: list[tuple[str, Callable[[Sample], float | None], str]] = [
    ("ttfb_s", lambda s: s.get("ttfb_s"), "s"),
    ("ttfb_official_framing_s", lambda s: s.get("ttfb_official_s"), "s"),
    ("rtf", lambda s: s.get("rtf"), ""),
    ("total_s", lambda s: s.get("total_s"), "s"),
    ("generation_s", _generation_s, "s"),
    ("audio processing", _stage("audio"), "s"),
]


def ok_samples(samples: list[Sample]) -> list[Sample]:
    """Samples of requests that did not fail: a failed request's timings describe the failure, not the engine."""
    return [s for s in samples if not s.get("error")]


def _values(samples: list[Sample], get: Callable[[Sample], float | None]) -> np.ndarray:
    return finite(get(s) for s in ok_samples(samples))


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else math.nan


def aggregate_block(samples: list[Sample]) -> str:
    """The original benchmark's AGGREGATE PERFORMANCE METRICS block (generation = stages llm + tts per request,
    audio processing = stages["audio"]; std is the population std, np.std, as the original printed)."""
    ttfb = _values(samples, lambda s: s.get("ttfb_s"))
    rtf = _values(samples, lambda s: s.get("rtf"))
    gen = _values(samples, _generation_s)
    audio = _values(samples, _stage("audio"))
    std = lambda x: float(x.std()) if len(x) else math.nan
    return "\n".join([
        "AGGREGATE PERFORMANCE METRICS:",
        f"   Average time to first byte: {_mean(ttfb):.3f}s",
        f"   Average realtime factor: {_mean(rtf):.3f}",
        f"   Average generation time: {_mean(gen):.3f}s",
        f"   Average audio processing time: {_mean(audio):.3f}s",
        f"   TTFB std dev: {std(ttfb):.3f}s",
        f"   Realtime factor std dev: {std(rtf):.3f}",
    ])


def _fmt(value: float, unit: str = "", digits: int = 3) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.{digits}f}{unit}"


def summary_table(samples: list[Sample], title: str = "Per-request metrics") -> Table:
    """n, median, p95, 95 % bootstrap CI of the median, mean and std (ddof=1) of each headline metric."""
    failed = len(samples) - len(ok_samples(samples))
    table = Table(title=title, caption=f"{failed} failed request(s) excluded" if failed else None)
    for column in ("metric", "n", "median", "p95", "95% CI of median", "mean", "std"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, get, unit in METRICS:
        s = summarize(_values(samples, get))
        ci = f"[{_fmt(s.ci95_low, unit)}, {_fmt(s.ci95_high, unit)}]" if s.n else "—"
        table.add_row(label, str(s.n), _fmt(s.median, unit), _fmt(s.p95, unit), ci, _fmt(s.mean, unit),
                      _fmt(s.std, unit))
    return table


def _per_step_ms(samples: list[Sample], stage: str, count_key: str) -> float:
    """Total stage time / total steps over all requests (step-weighted, so long replies count per step)."""
    time = sum(_stage(stage)(s) or 0.0 for s in ok_samples(samples))
    steps = sum(s.get(count_key) or 0 for s in ok_samples(samples))
    return 1000 * time / steps if steps else math.nan


def stage_table(samples: list[Sample], title: str = "Where the time goes (mean per request)") -> Table:
    """Mean of each stage in ms and its share of the mean request time, then the per-step costs."""
    total = _mean(_values(samples, lambda s: s.get("total_s")))
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("mean", justify="right")
    table.add_column("share of total_s", justify="right")
    for name in STAGES:
        mean_s = _mean(_values(samples, _stage(name)))
        once = name == "model_load"  # engine start-up, not part of a request's total
        share = "—" if once or not total > 0 else _fmt(100 * mean_s / total, " %", 1)
        table.add_row(name, _fmt(1000 * mean_s, " ms", 2), share)
    table.add_section()
    table.add_row("LLM, per token", _fmt(_per_step_ms(samples, "llm", "llm_tokens"), " ms", 2), "")
    table.add_row("TTS, per audio step", _fmt(_per_step_ms(samples, "tts", "tts_steps"), " ms", 2), "")
    return table


def results_label(results: dict[str, Any], fallback: str) -> str:
    """A run's name for tables and plots: config name, label, model or path, else the fallback."""
    config = results.get("config") or {}
    for key in ("name", "label", "model", "path"):
        if config.get(key):
            return str(config[key])
    return fallback


def compare_table(a_results: dict[str, Any], b_results: dict[str, Any],
                  labels: tuple[str, str] | None = None) -> Table:
    """B against A per metric: medians, ratio B/A with its bootstrap CI, Mann-Whitney p and a verdict.

    "faster"/"slower" only when the ratio CI excludes 1 and p < 0.05 (stats.is_noise), else "noise".
    """
    label_a, label_b = labels or (results_label(a_results, "A"), results_label(b_results, "B"))
    if label_a == label_b:
        label_a, label_b = f"{label_a} (A)", f"{label_b} (B)"
    notes = ["verdict: faster/slower only when the ratio CI excludes 1 and p < 0.05"]
    if a_results.get("dummy_weights") != b_results.get("dummy_weights"):
        notes.append("one run used dummy weights and the other did not")
    devices = {(r.get("environment") or {}).get("device") for r in (a_results, b_results)}
    if len(devices) > 1:
        notes.append(f"different devices ({', '.join(map(str, devices))}): timings do not compare")
    table = Table(title=f"{label_b} vs {label_a}", caption="; ".join(notes))
    for column in ("metric", f"A median ({label_a})", f"B median ({label_b})", "B/A [95% CI]", "p (Mann-Whitney)",
                   "verdict"):
        table.add_column(column, justify="left" if column in ("metric", "verdict") else "right")
    colors = {"faster": "green", "slower": "red"}
    for label, get, unit in METRICS:
        a, b = _values(a_results["samples"], get), _values(b_results["samples"], get)
        if len(a) == 0 or len(b) == 0:
            table.add_row(label, _fmt(_median(a), unit), _fmt(_median(b), unit), "—", "—", "n/a")
            continue
        c = compare(a, b)
        verdict = f"[{colors[c.verdict]}]{c.verdict}[/]" if c.verdict in colors else c.verdict
        table.add_row(label, _fmt(_median(a), unit), _fmt(_median(b), unit),
                      f"{_fmt(c.ratio)} [{_fmt(c.ratio_low)}, {_fmt(c.ratio_high)}]", f"{c.p_value:.3g}", verdict)
    return table


def _median(x: np.ndarray) -> float:
    return float(np.median(x)) if len(x) else math.nan
