"""One PNG that shows whether two configurations really differ: every request as a point, over a box plot.

Drawn on a bare Agg canvas (no pyplot), so it works without a display and never changes the process-wide
matplotlib backend of whoever imported us.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from omnivox.bench.report import ok_samples, results_label
from omnivox.bench.stats import finite


def plot_distributions(results_list: list[dict[str, Any]], labels: list[str] | None, path: str | Path) -> Path:
    """Write a two-panel PNG (TTFB in ms, RTF) with a box plot and jittered points per configuration."""
    if not results_list:
        raise ValueError("plot_distributions needs at least one results document")
    labels = list(labels) if labels else [results_label(r, f"run {i + 1}") for i, r in enumerate(results_list)]
    if len(labels) != len(results_list):
        raise ValueError(f"{len(labels)} labels for {len(results_list)} results; give one label per results file")
    panels = [("Time to first byte", "TTFB (ms)", lambda s: s.get("ttfb_s"), 1000.0),
              ("Realtime factor", "RTF (total time / audio time)", lambda s: s.get("rtf"), 1.0)]
    fig = Figure(figsize=(5 + 1.2 * len(results_list), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    rng = np.random.default_rng(0)  # seeded jitter: the same results always draw the same picture
    positions = np.arange(1, len(results_list) + 1)
    for ax, (name, ylabel, get, scale) in zip(fig.subplots(1, 2), panels, strict=True):
        data = [scale * finite(get(s) for s in ok_samples(r["samples"])) for r in results_list]
        ax.boxplot([d if len(d) else [np.nan] for d in data], positions=positions, widths=0.5, showfliers=False,
                   medianprops={"color": "black"})
        for x, d in zip(positions, data, strict=True):
            ax.scatter(x + rng.uniform(-0.15, 0.15, len(d)), d, s=14, alpha=0.6, zorder=3)
        if name == "Realtime factor":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="realtime (RTF = 1)")
            ax.legend(loc="best", fontsize="small")
        crowded = len(labels) > 2
        ax.set_xticks(positions, labels, rotation=25 if crowded else 0, ha="right" if crowded else "center")
        ax.set_ylim(bottom=0)  # ratios read honestly only from a zero baseline
        ax.set_xlabel("configuration")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(axis="y", alpha=0.3)
    devices = sorted({str((r.get("environment") or {}).get("device", "?")) for r in results_list})
    title = f"omnivox bench: per-request distributions ({', '.join(devices)})"
    if any(r.get("dummy_weights") for r in results_list):
        title += " — dummy weights"
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_medians(
    workload: dict[str, dict[str, Any]], path: str | Path, title: str, goals: dict[str, float] | None = None
) -> Path:
    """Medians with their 95 % CIs, TTFB and RTF, one bar per configuration, on a log axis (a reference path
    and a path 10x faster stay readable side by side). `workload` maps configuration names to summaries:
    {name: {"ttfb_s": {"median", "ci95"}, "rtf": {...}}}; entries that failed (no "rtf") are left out. `goals`
    ({"ttfb_s": 0.08, "rtf": 0.04}) are drawn as dashed lines."""
    names = [n for n, entry in workload.items() if "rtf" in entry]
    if not names:
        raise ValueError("plot_medians needs at least one configuration with measured TTFB and RTF")
    fig = Figure(figsize=(5 + 1.1 * len(names), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(names))
    for ax, (key, ylabel, scale) in zip(
        fig.subplots(1, 2), [("ttfb_s", "TTFB p50 (ms)", 1000.0), ("rtf", "RTF p50 (total / audio time)", 1.0)],
        strict=True,
    ):
        med = np.array([scale * workload[n][key]["median"] for n in names])
        low, high = (np.array([scale * workload[n][key]["ci95"][i] for n in names]) for i in (0, 1))
        ax.bar(x, med, color="tab:blue", alpha=0.7)
        ax.errorbar(x, med, yerr=[med - low, high - med], fmt="none", ecolor="black", capsize=4, label="95 % CI")
        for xi, m, h in zip(x, med, high, strict=True):
            ax.annotate(f"{m:.3g}", (xi, h), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        goal = (goals or {}).get(key)
        if goal is not None:
            ax.axhline(scale * goal, color="tab:red", linestyle="--", linewidth=1, label=f"goal {scale * goal:g}")
        ax.set_yscale("log")
        floor = min(low.min(), scale * goal if goal is not None else np.inf)
        ax.set_ylim(bottom=10 ** np.floor(np.log10(floor)))  # bars start at a whole decade
        ax.set_xticks(x, names, rotation=20, ha="right")
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_steps(runs: dict[str, list[dict[str, float]]], path: str | Path, title: str) -> Path:
    """Step time against batch size, one panel per stage (LLM, TTS, DVAE + Vocos), one line per run. `runs` maps a
    label to `batch_bench --parts steps` rows ({"batch", "llm_ms", "tts_ms", "vocoder_ms"})."""
    fig = Figure(figsize=(12, 4), layout="constrained")
    FigureCanvasAgg(fig)
    stages = [("llm_ms", "LLM decode step"), ("tts_ms", "TTS step"), ("vocoder_ms", "DVAE + Vocos (29-token windows)")]
    for ax, (key, name) in zip(fig.subplots(1, 3), stages, strict=True):
        for label, rows in runs.items():
            ax.plot([r["batch"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (rows)")
        ax.set_ylabel("ms per step")
        ax.set_title(name)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
