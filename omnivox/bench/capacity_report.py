"""A capacity sweep shown: the per-rate table and what the server's engine loop did at each rate, the headline
sentence and the PNG (p95 TTFA, underruns and streams playing against the rate). Reads only the results document,
so an old sweep redraws without rerunning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.console import Group, RenderableType
from rich.table import Table

from omnivox.server.metrics import BATCH_STAGES

LOOP_PARTS_SHOWN = 5  # the parts of the loop with the most time over the sweep get a column each, the rest "other"


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _gib(memory: dict[str, float] | None, key: str) -> str:
    return "—" if not memory or key not in memory else f"{memory[key] / 2**30:.1f}"


def capacity_table(results: dict[str, Any]) -> RenderableType:
    """One row per measured rate; the verdict column says why a rate failed. Followed by `milestone_table` and
    `loop_table` when the sweep recorded the server's view."""
    config = results["config"]
    bound = config["ttfa_bound_s"]
    table = Table(title=f"capacity: open-loop Poisson, {config['endpoint']}, {config['duration_s']:g} s window "
                        f"after {config['warmup_s']:g} s warm-up, pass = no underrun/error/incomplete and p95 TTFA "
                        f"<= {bound * 1000:.0f} ms",
                  caption=_caption(results))
    for column in ("rate/s", "requests", "done", "errors", "TTFA p50", "p95", "p99 ms", "RTF p50", "underruns (reqs)",
                   "slack p5 ms", "playing mean", "peak", "GPU GiB alloc/resv", "verdict"):
        table.add_column(column, justify="left" if column == "verdict" else "right")
    for s in results["extra"]["rates"]:
        t = s["ttfa_s"]
        rtf = s["rtf"]["p50"]
        verdict = "[green]pass[/]" if s["passed"] else "[red]fail[/]: " + "; ".join(s["failures"])
        table.add_row(
            f"{s['rate']:g}", str(s["requests"]), str(s["completed"]), str(s["errors"]), _ms(t["p50"]), _ms(t["p95"]),
            _ms(t["p99"]), "—" if rtf is None else f"{rtf:.2f}",
            f"{s['underruns']} ({s['requests_with_underruns']})", _ms(s.get("min_slack_p5_s")),
            f"{s['streams_playing_mean']:.1f}",
            str(s["streams_playing_peak"]),
            f"{_gib(s.get('gpu_memory'), 'gpu_allocated_bytes')}/{_gib(s.get('gpu_memory'), 'gpu_reserved_bytes')}",
            verdict,
        )
    extra = [t for t in (milestone_table(results), loop_table(results)) if t is not None]
    return Group(table, *extra) if extra else table


def milestone_table(results: dict[str, Any]) -> Table | None:
    """Where each rate's time to first audio went on the server: p50 / p95 ms from the request's start to each
    milestone (capacity.first_audio_milestones). None if the server reported none."""
    rates = [(s["rate"], s.get("first_audio_milestones_s") or {}) for s in results["extra"]["rates"]]
    names = list(dict.fromkeys(name for _, milestones in rates for name in milestones))
    if not names:
        return None
    table = Table(title="time to first audio on the server: ms from request start to each milestone, p50 / p95")
    table.add_column("rate/s", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for rate, milestones in rates:
        cells = [milestones.get(name) for name in names]
        table.add_row(f"{rate:g}", *("—" if c is None else f"{_ms(c['p50'])} / {_ms(c['p95'])}" for c in cells))
    return table


def _figure(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _batches(profile: dict[str, Any], stage: str) -> str:
    """'batches/s × mean rows' of one stage; "—" where the server does not report the stage."""
    batch = (profile.get("batches") or {}).get(stage)
    if batch is None:
        return "—"
    rows = batch["mean_rows"]
    return f"{_figure(batch['per_s'])} × {'—' if rows is None else f'{rows:.1f}'}"


def loop_table(results: dict[str, Any]) -> Table | None:
    """Where the server's engine loop spent each rate's window (capacity.server_profile): iterations/s, host ms per
    iteration in all and in its busiest parts, and each stage's batches/s × mean rows. None if no rate has one."""
    profiled = [(s["rate"], s["server_profile"]) for s in results["extra"]["rates"] if s.get("server_profile")]
    if not profiled:
        return None
    share: dict[str, float] = {}  # seconds of loop time per second of window, summed over the rates
    for _, profile in profiled:
        for part, ms in (profile.get("loop_ms_per_iteration") or {}).items():
            share[part] = share.get(part, 0.0) + ms * profile.get("iterations_per_s", 0.0) / 1000
    parts = sorted(share, key=share.get, reverse=True)[:LOOP_PARTS_SHOWN]
    table = Table(title="engine loop per rate (server /metrics over each window; ms = host time per iteration; "
                        "stages: batches/s × mean rows)")
    for column in ("rate/s", "iter/s", "ms/iter", *(p.replace("_", "\n", 1) for p in parts), "other"):  # narrow
        table.add_column(column, justify="right")
    for stage in BATCH_STAGES:
        table.add_column(stage, justify="right")
    for rate, profile in profiled:
        ms = profile.get("loop_ms_per_iteration")  # absent: no iteration in the window, or no loop reported
        shown = [ms.get(part, 0.0) if ms else None for part in parts]
        total = sum(ms.values()) if ms else None
        other = total - sum(shown) if ms else None
        table.add_row(f"{rate:g}", _figure(profile.get("iterations_per_s")), _figure(total), *map(_figure, shown),
                      _figure(other), *(_batches(profile, stage) for stage in BATCH_STAGES))
    return table


def _caption(results: dict[str, Any]) -> str | None:
    notes = []
    skipped = results["extra"].get("skipped_rates") or []
    if skipped:
        reason = results["extra"].get("stop_reason") or "stopped"
        notes.append(f"not run: {', '.join(f'{r:g}' for r in skipped)} ({reason})")
    if results["extra"].get("interrupted_rate") is not None:
        notes.append(f"rate {results['extra']['interrupted_rate']:g} was interrupted and is not shown")
    lag = max((s.get("client_lag_max_s") or 0.0 for s in results["extra"]["rates"]), default=0.0)
    if lag > 0.05:
        notes.append(f"the client sent up to {lag * 1000:.0f} ms late: it may be the bottleneck")
    return "; ".join(notes) or None


def headline_text(results: dict[str, Any]) -> str:
    best = results["extra"].get("headline")
    bound_ms = results["config"]["ttfa_bound_s"] * 1000
    where = (results.get("environment") or {}).get("device", "this machine")
    if best is None:
        return (f"capacity: no rate passed (zero underruns, errors and incomplete replies, "
                f"p95 TTFA <= {bound_ms:.0f} ms)")
    return (f"capacity: {best['rate']:g} requests/s with {best['streams_playing_mean']:.1f} streams playing on "
            f"average (peak {best['streams_playing_peak']}), p95 TTFA {best['ttfa_p95_s'] * 1000:.0f} ms "
            f"<= {bound_ms:.0f} ms, zero underruns ({where})")


def plot_capacity(results: dict[str, Any], path: str | Path) -> Path:
    """Three panels against the rate (log axis): p95 TTFA with the bound, underruns and the requests that had
    one, streams playing (mean and peak). Passing rates are filled markers, failing ones hollow."""
    rates_data = results["extra"]["rates"]
    if not rates_data:
        raise ValueError("plot_capacity needs at least one measured rate")
    rate = np.array([s["rate"] for s in rates_data], dtype=float)
    passed = np.array([s["passed"] for s in rates_data])
    p95 = np.array([np.nan if s["ttfa_s"]["p95"] is None else 1000 * s["ttfa_s"]["p95"] for s in rates_data])
    bound_ms = 1000 * results["config"]["ttfa_bound_s"]
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_ttfa, ax_under, ax_play = fig.subplots(1, 3)

    def points(ax, y, label: str, color: str) -> None:
        ax.plot(rate, y, color=color, linewidth=1, label=label)
        ax.scatter(rate[passed], y[passed], color=color, zorder=3)
        ax.scatter(rate[~passed], y[~passed], facecolors="none", edgecolors=color, zorder=3)

    points(ax_ttfa, p95, "p95 TTFA", "tab:blue")
    ax_ttfa.axhline(bound_ms, color="tab:red", linestyle="--", linewidth=1, label=f"bound {bound_ms:.0f} ms")
    ax_ttfa.set_ylabel("p95 TTFA (ms)")
    points(ax_under, np.array([s["underruns"] for s in rates_data], float), "underruns", "tab:red")
    points(ax_under, np.array([s["requests_with_underruns"] for s in rates_data], float), "requests with one",
           "tab:orange")
    ax_under.set_ylabel("count (requests sent in the window)")
    ax_under.yaxis.set_major_locator(MaxNLocator(integer=True))
    points(ax_play, np.array([s["streams_playing_mean"] for s in rates_data]), "mean", "tab:green")
    points(ax_play, np.array([s["streams_playing_peak"] for s in rates_data], float), "peak", "tab:olive")
    ax_play.set_ylabel("streams playing at once (in the window)")
    ax_play.yaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, title in ((ax_ttfa, "First audio"), (ax_under, "Underruns"), (ax_play, "Streams playing")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(rate, [f"{r:g}" for r in rate])
        ax.set_xlabel("arrival rate (requests/s); hollow = rate failed")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    fig.suptitle(headline_text(results) + (" — random weights" if results.get("dummy_weights") else ""),
                 fontsize="medium")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
