"""The report's plots: training curves, over-optimization, intervals and reward histograms.

Drawn with matplotlib's Agg canvas (no display, no global pyplot state); each function returns
a `Figure`, which `png` turns into bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rlhfkit.eval.runs import TrainingRun

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")
# Panels in display order: a title and the keys drawn together in it.
PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss", "eval/loss", "eval_loss")),
    ("reward", ("reward", "reward/mean", "reward/proxy", "reward/rm", "reward/gold", "eval/reward")),
    ("accuracy", ("rewards/accuracy", "eval/rewards/accuracy", "eval_accuracy", "gold_accuracy")),
    ("reward margin", ("rewards/margin", "eval/rewards/margin", "eval_mean_margin")),
    ("chosen / rejected reward", ("rewards/chosen", "rewards/rejected")),
    ("KL to reference", ("kl", "kl_penalty", "kto/kl_reference", "approx_kl")),
    ("entropy", ("entropy",)),
    ("response length (tokens)", ("response_length",)),
    ("grad norm", ("grad_norm",)),
    ("learning rate", ("lr",)),
)
MAX_PANELS = 12
PROXY_KEYS = ("reward/proxy", "reward/rm")
GOLD_KEYS = ("reward/gold", "gold_accuracy")


def _figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 — matplotlib is slow to import
    from matplotlib.figure import Figure  # noqa: PLC0415 — matplotlib is slow to import

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _style(ax, title: str | None = None) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#9ca3af")
    ax.tick_params(colors="#374151", labelsize=8)
    ax.grid(True, color="#e5e7eb", linewidth=0.6)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, fontsize=10, loc="left", color="#111827")


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes, on a white background."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def _smooth(values: list[float]) -> list[float]:
    """A trailing moving average over ~1/15 of the points, so noisy RL curves show a trend."""
    window = max(1, len(values) // 15)
    if window == 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def training_curves_plot(run: TrainingRun) -> Figure | None:
    """A grid of small panels: the PANELS groups that exist, then any other logged number."""
    available = run.keys()
    panels: list[tuple[str, list[str]]] = []
    used: set[str] = set()
    for title, keys in PANELS:
        present = [k for k in keys if k in available]
        if present:
            panels.append((title, present))
            used.update(present)
    panels += [(k, [k]) for k in available if k not in used]
    panels = panels[:MAX_PANELS]
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(3.7 * cols, 2.5 * rows)
    for i, (title, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _style(ax, title)
        for j, key in enumerate(keys):
            steps, values = run.series(key)
            color = COLORS[j % len(COLORS)]
            if len(values) > 30:
                ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax.plot(steps, _smooth(values), color=color, linewidth=1.6, label=key)
            else:
                ax.plot(steps, values, color=color, linewidth=1.6, marker="o" if len(values) < 12 else None,
                        markersize=3, label=key)
        if len(keys) > 1:
            ax.legend(fontsize=7, frameon=False)
        ax.set_xlabel("step", fontsize=8, color="#4b5563")
    fig.tight_layout()
    return fig


def over_optimization_keys(run: TrainingRun) -> tuple[str, str] | None:
    """(proxy key, gold key) when the run logged a proxy reward, a gold reward and KL."""
    keys = set(run.keys())
    proxy = next((k for k in PROXY_KEYS if k in keys), None)
    gold = next((k for k in GOLD_KEYS if k in keys), None)
    return (proxy, gold) if proxy and gold and "kl" in keys else None


def binned_curve(x: Sequence[float], y: Sequence[float], bins: int = 12) -> tuple[list[float], list[float]]:
    """Means of x and y over `bins` equal-count groups of the points sorted by x: a trend line
    of y against x that noisy, non-monotone x (KL estimates per step) cannot tangle."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    groups = [order[round(k * len(order) / bins):round((k + 1) * len(order) / bins)] for k in range(bins)]
    groups = [g for g in groups if g]
    return ([sum(x[i] for i in g) / len(g) for g in groups], [sum(y[i] for i in g) / len(g) for g in groups])


def over_optimization_plot(run: TrainingRun, proxy: str, gold: str) -> Figure:
    """Proxy and gold reward against KL to the reference, one point per logged step, with a
    trend line of each: the proxy keeps rising while the gold reward peaks and falls when the
    policy over-optimizes."""
    rows = [r for r in run.rows if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                       and math.isfinite(r[k]) for k in (proxy, gold, "kl"))]
    kl = [float(r["kl"]) for r in rows]
    fig = _figure(7.2, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    _style(ax, f"{run.label}: proxy vs gold reward as KL grows")
    twin = ax.twinx()
    twin.spines["top"].set_visible(False)
    twin.tick_params(colors="#374151", labelsize=8)
    for axis, key, color, name in ((ax, proxy, COLORS[0], "proxy"), (twin, gold, COLORS[1], "gold")):
        values = [float(r[key]) for r in rows]
        axis.scatter(kl, values, s=9, color=color, alpha=0.3, linewidths=0)
        axis.plot(*binned_curve(kl, values, bins=min(12, max(2, len(rows) // 4))), color=color, linewidth=2,
                  marker="o", markersize=3.5, label=f"{name} ({key})")
        axis.set_ylabel(key, fontsize=8, color=color)
    ax.set_xlabel("KL(π ‖ π_ref), nats", fontsize=8, color="#4b5563")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, frameon=False, loc="lower right",
              bbox_to_anchor=(1.0, 1.0), ncol=2, borderaxespad=0.2)  # above the axes: no point hidden
    fig.tight_layout()
    return fig


def interval_plot(rows: Sequence[tuple[str, float, float, float]], *, title: str, xlabel: str,
                  reference_line: float | None = None, second: Sequence[tuple[float, float, float] | None] = (),
                  second_label: str = "") -> Figure:
    """Horizontal point-and-interval plot: rows of (label, mean, low, high), best read top-down."""
    fig = _figure(7.2, 0.45 * len(rows) + 1.1)
    ax = fig.add_subplot(1, 1, 1)
    _style(ax, title)
    ys = list(range(len(rows)))[::-1]
    for y, (_label, mean, low, high) in zip(ys, rows):
        ax.plot([low, high], [y, y], color=COLORS[0], linewidth=2.2, solid_capstyle="round")
        ax.plot([mean], [y], "o", color=COLORS[0], markersize=6)
    for y, extra in zip(ys, second):
        if extra is not None:
            mean, low, high = extra
            ax.plot([low, high], [y - 0.22, y - 0.22], color=COLORS[2], linewidth=1.4, alpha=0.8)
            ax.plot([mean], [y - 0.22], "D", color=COLORS[2], markersize=4, label=second_label)
    if reference_line is not None:
        ax.axvline(reference_line, color="#6b7280", linestyle="--", linewidth=1)
    ax.set_yticks(ys)
    ax.set_yticklabels([r[0] for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlim(-0.02, 1.02)
    ax.xaxis.set_major_formatter(_percent_formatter())
    ax.set_xlabel(xlabel, fontsize=8, color="#4b5563")
    if any(s is not None for s in second):
        handles, labels = ax.get_legend_handles_labels()
        ax.legend(handles[:1], labels[:1], fontsize=7, frameon=False, loc="lower right")
    fig.tight_layout()
    return fig


def _percent_formatter():
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415 — matplotlib is slow to import

    return FuncFormatter(lambda v, _pos: f"{v:.0%}")


def histogram_plot(hist: dict[str, list[float]], title: str) -> Figure | None:
    edges, chosen, rejected = hist.get("edges") or [], hist.get("chosen") or [], hist.get("rejected") or []
    if len(edges) < 2 or len(chosen) != len(edges) - 1:
        return None
    fig = _figure(5.2, 2.6)
    ax = fig.add_subplot(1, 1, 1)
    _style(ax, title)
    ax.stairs(chosen, edges, color=COLORS[2], linewidth=1.6, label="chosen", fill=False)
    ax.stairs(rejected, edges, color=COLORS[1], linewidth=1.6, label="rejected", fill=False)
    ax.set_xlabel("reward", fontsize=8, color="#4b5563")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig
