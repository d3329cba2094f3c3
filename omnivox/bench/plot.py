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
        ax.set_xticks(positions, labels, rotation=15 if len(labels) > 2 else 0)
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
