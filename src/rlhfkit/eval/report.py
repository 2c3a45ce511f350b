"""`rlhf report RUN...`: one self-contained HTML page comparing every model of one or more runs.

What it reads, under each RUN folder (and its immediate sub-folders, e.g. the demo's
`sft/`, `rm/`, `dpo/`):
  * `metrics.jsonl` (one per training run) → training curves (loss, reward, KL, entropy,
    length and whatever else was logged) and, when a run logged a proxy reward
    (`reward/proxy` or `reward/rm`), a gold reward (`reward/gold` or `gold_accuracy`) and
    `kl`, the over-optimization plot: both rewards against KL;
  * `eval.json` (written by `rlhf eval`) → summary, win-rate, diversity tables, samples;
  * `stages/*.json` (the demo pipeline) → gold accuracy per stage, reward model, samples,
    wall time per stage.

The page has no script and references nothing outside itself: plots are PNGs drawn with
matplotlib's Agg canvas (no display, no global pyplot state) and embedded as base64; every
piece of text that came from a user or a model is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import typer

from rlhfkit.data.errors import DataError

REPORT_FILE = "report.html"
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04")
# Sub-runs in the order the loop produces them; others follow alphabetically.
RUN_ORDER = ("sft", "rm", "dpo", "cdpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto", "ppo", "grpo",
             "rloo", "remax", "reinforce", "best_of_n", "expert_iter")
# Logged every step but not worth a panel: bookkeeping, not learning.
NOT_PLOTTED = {"step", "units", "tokens_per_s", "epoch", "samples_per_s", "time", "wall_s"}
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


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


# ----------------------------------------------------------------------------- reading runs

STAGE_LABELS = {"eval_base": "embedded model (before)", "eval_sft": "after SFT"}


def model_rows(stages: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage key, label) of every demo stage that measured exact-match accuracy, in run order."""
    return [(k, STAGE_LABELS.get(k, f"after {k.upper()}")) for k, r in stages.items()
            if isinstance(r, dict) and "per_family" in r]


@dataclass
class TrainingRun:
    label: str
    path: Path
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `key`, skipping rows without it and non-finite values."""
        steps, values = [], []
        for row in self.rows:
            v = row.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            steps.append(float(row.get("step", len(steps))))
            values.append(float(v))
        return steps, values

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for k, v in row.items():
                if k not in NOT_PLOTTED and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen.setdefault(k, None)
        return [k for k in seen if self.series(k)[1]]


@dataclass
class ReportData:
    runs: list[Path]
    training: list[TrainingRun] = field(default_factory=list)
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # demo: stage name → results


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"not valid JSON ({e.msg})", path=str(path), line=n) from None
        if not isinstance(row, dict):
            raise DataError("expected a JSON object per line", path=str(path), line=n)
        rows.append(row)
    return rows


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", path=str(path), line=e.lineno) from None


def _is_eval(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("models"), list) and "prompts" in data


def _run_sort_key(p: Path) -> tuple[int, str]:
    return (RUN_ORDER.index(p.name) if p.name in RUN_ORDER else len(RUN_ORDER), p.name)


def collect(run_dirs: Sequence[str | Path]) -> ReportData:
    """Everything the report shows, from RUN folders (see the module docstring)."""
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise DataError("give at least one run folder")
    data = ReportData(runs)
    many = len(runs) > 1
    for run in runs:
        if not run.is_dir():
            raise DataError("no such run folder", path=str(run))
        prefix = f"{run.name}/" if many else ""
        folders = [run] + sorted((p for p in run.iterdir() if p.is_dir() and p.name != "stages"), key=_run_sort_key)
        for folder in folders:
            metrics = folder / "metrics.jsonl"
            if metrics.is_file():
                rows = _read_metrics(metrics)
                if rows:
                    label = run.name if folder == run else prefix + folder.name
                    data.training.append(TrainingRun(label, folder, rows))
            evaluation = folder / "eval.json"
            if evaluation.is_file():
                content = _read_json(evaluation)
                if not _is_eval(content):
                    raise DataError("not an eval.json written by `rlhf eval` (no 'models' list)",
                                    path=str(evaluation))
                data.evals.append((run.name if folder == run else prefix + folder.name, content))
        stage_dir = run / "stages"
        if stage_dir.is_dir():
            # Stage files are written in pipeline order: keep it.
            for marker in sorted(stage_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
                content = _read_json(marker)
                if _is_eval(content):
                    data.evals.append((prefix + marker.stem, content))
                elif isinstance(content, dict):
                    data.stages[prefix + marker.stem] = content
    if not (data.training or data.evals or data.stages):
        raise DataError("nothing to report: no metrics.jsonl, eval.json or stages/*.json in "
                        + ", ".join(str(r) for r in runs))
    return data


# ----------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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


def _png(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", facecolor="white")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="{_e(alt)}">'


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


def training_curves_plot(run: TrainingRun) -> str | None:
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
    return _png(fig, f"training curves of {run.label}")


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


def over_optimization_plot(run: TrainingRun, proxy: str, gold: str) -> str:
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
    return _png(fig, f"over-optimization plot of {run.label}")


def interval_plot(rows: Sequence[tuple[str, float, float, float]], *, title: str, xlabel: str,
                  reference_line: float | None = None, second: Sequence[tuple[float, float, float] | None] = (),
                  second_label: str = "") -> str:
    """Horizontal point-and-interval plot: rows of (label, mean, low, high), best read top-down."""
    fig = _figure(7.2, 0.45 * len(rows) + 1.1)
    ax = fig.add_subplot(1, 1, 1)
    _style(ax, title)
    ys = list(range(len(rows)))[::-1]
    for y, (label, mean, low, high) in zip(ys, rows):
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
    return _png(fig, title)


def _percent_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:.0%}")


def histogram_plot(hist: dict[str, list[float]], title: str) -> str | None:
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
    return _png(fig, title)


# ----------------------------------------------------------------------------- HTML pieces

CSS = """
*{box-sizing:border-box}
body{font:14px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1f2937;background:#f3f4f6;margin:0}
main{max-width:1180px;margin:0 auto;padding:28px 24px 48px}
header h1{font-size:1.7em;margin:0 0 4px;color:#111827}
header p{margin:2px 0;color:#6b7280}
section{background:#fff;border:1px solid #e5e7eb;border-radius:10px;padding:16px 20px;margin:18px 0}
section h2{font-size:1.15em;margin:0 0 10px;color:#111827}
section h3{font-size:1em;margin:16px 0 6px;color:#374151}
p.note{color:#6b7280;margin:4px 0 10px;font-size:.93em}
table{border-collapse:collapse;margin:6px 0 10px;font-size:.93em;width:auto}
div.wide{overflow-x:auto}
th,td{padding:5px 9px;border-bottom:1px solid #e5e7eb;text-align:left;vertical-align:top}
th{background:#f9fafb;font-weight:600;color:#374151}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
span.ci{color:#6b7280;font-size:.9em}
table.samples{width:100%;table-layout:fixed}
table.samples td{font-size:.9em}
table.samples pre{white-space:pre-wrap;word-break:break-word;margin:0;font:12.5px/1.45 ui-monospace,Menlo,Consolas,monospace}
.ok{color:#15803d;font-weight:600}.bad{color:#b91c1c;font-weight:600}
img.plot{max-width:100%;height:auto;display:block;margin:6px 0}
nav{margin:10px 0 0;font-size:.92em}
nav a{color:#2563eb;text-decoration:none;margin-right:14px}
"""


def _ci(block: dict | None, *, pct: bool = True) -> str:
    if not block or block.get("mean") is None:
        return "–"
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")
    low, high = block.get("ci_low"), block.get("ci_high")
    interval = f' <span class="ci">[{f(low)}, {f(high)}]</span>' if low is not None and high is not None else ""
    return f"{f(block['mean'])}{interval}"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return fmt.format(x)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, numeric_from: int = 1,
           cls: str = "") -> str:
    """An HTML table; `head` is escaped here, cells must already be HTML."""
    # Non-breaking hyphens: a narrow column wraps "distinct-2" between words, never inside one.
    th = "".join(f"<th>{_e(h).replace('-', chr(0x2011))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i >= numeric_from else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f'<div class="wide"><table{klass}><tr>{th}</tr>{body}</table></div>'


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{note_html}{body}</section>'


def _eval_models(data: ReportData) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(display label, model block, its eval) over every eval.json; the eval's folder is added
    to the label when there are several evals."""
    out = []
    for source, result in data.evals:
        for m in result["models"]:
            label = m["name"] if len(data.evals) == 1 else f"{m['name']} ({source})"
            out.append((label, m, result))
    return out


def summary_section(data: ReportData) -> str:
    models = _eval_models(data)
    if not models:
        return ""
    refs = {r["reference"]["name"] for _, _, r in models if r.get("reference")}
    vs = f"vs {', '.join(sorted(refs))}" if refs else "vs reference"
    rows = []
    for label, m, _ in models:
        em = m.get("exact_match")
        kl = m.get("kl")
        div = m.get("diversity") or {}
        reward = m.get("reward")
        rows.append([_e(label) + (' <span class="ci">(reference)</span>' if m.get("is_reference") else ""),
                     _ci({"mean": em["accuracy"], "ci_low": em["ci_low"], "ci_high": em["ci_high"]}) if em else "–",
                     _ci(m.get("gold_win_rate")), _ci(m.get("win_rate")), _ci(m.get("lc_win_rate")),
                     _num(kl["mean"]) if kl else "–", _num((m.get("length") or {}).get("mean_tokens"), "{:.1f}"),
                     _num(div.get("distinct_2")), _num(div.get("within_prompt_self_similarity")),
                     _num(reward["mean"]) if reward else "–"])
    table = _table(["model", "exact match", f"gold win rate {vs}", f"judged win rate {vs}", "length-controlled",
                    "KL (nats)", "mean tokens",
                    "distinct-2", "self-similarity", "RM score"], rows)
    plot = ""
    golden = [(label, m["gold_win_rate"]) for label, m, _ in models if m.get("gold_win_rate")]
    if golden:
        plot += interval_plot([(label, g["mean"], g["ci_low"], g["ci_high"]) for label, g in golden],
                              title=f"gold win rate {vs} on the checkable tasks (95% CI)",
                              xlabel="win rate (exact checker; both right or both wrong = ½)", reference_line=0.5)
    judged = [(label, m) for label, m, _ in models if m.get("win_rate")]
    if judged:
        plot += interval_plot([(label, m["win_rate"]["mean"], m["win_rate"]["ci_low"], m["win_rate"]["ci_high"])
                              for label, m in judged],
                              title=f"judged win rate {vs} (95% CI; ◆ length-controlled)",
                              xlabel="win rate (tie = ½)", reference_line=0.5,
                              second=[(m["lc_win_rate"]["mean"], m["lc_win_rate"]["ci_low"],
                                       m["lc_win_rate"]["ci_high"]) if m.get("lc_win_rate") else None
                                      for _, m in judged], second_label="length-controlled")
    note = ("Exact match on held-out checkable tasks (greedy); gold win rate: the same answers compared with "
            "the reference's prompt by prompt by the exact checkers; judged win rates: an LLM judge, pairwise in "
            "both orders on held-out open prompts, tie = ½; KL on each model's own samples; self-similarity of "
            "several samples for one prompt (near 1 = mode collapse).")
    return _section("summary", "Models at a glance", table + plot, _e(note))


def accuracy_section(data: ReportData) -> str:
    entries: list[tuple[str, dict[str, Any]]] = [(label, data.stages[key]) for key, label in model_rows(data.stages)]
    # A demo stage already measured its model; the eval of the same model (named after the
    # stage) is a second greedy decode of it, not another model: list each model once.
    entries += [(label, m["exact_match"]) for label, m, _ in _eval_models(data)
                if m.get("exact_match") and m["name"] not in data.stages]
    if not entries:
        return ""
    families = sorted({f for _, r in entries for f in r.get("per_family", {})})
    rows = []
    for label, r in entries:
        fam = [_num(r.get("per_family", {}).get(f), "{:.0%}") for f in families]
        rows.append([_e(label), f"<b>{r['accuracy']:.1%}</b>",
                     f'<span class="ci">[{r["ci_low"]:.1%}, {r["ci_high"]:.1%}]</span>', str(r["n"]), *fam,
                     _num(r.get("mean_response_words"), "{:.1f}")])
    table = _table(["model", "exact match", "95% CI", "test prompts", *families, "mean words"], rows)
    plot = interval_plot([(label, r["accuracy"], r["ci_low"], r["ci_high"]) for label, r in entries],
                         title="held-out exact-match accuracy (95% CI)", xlabel="exact match")
    return _section("accuracy", "Gold accuracy per stage", table + plot,
                    "Greedy decoding on held-out prompts that no training stage saw, scored by exact checkers.")


def win_rate_section(data: ReportData) -> str:
    rows = []
    for label, m, result in _eval_models(data):
        gold = m.get("gold_win_rate")
        if gold:
            ref = (result.get("reference") or {}).get("name", "–")
            rows.append([_e(label), _e(ref), "exact checker (checkable tasks)", str(gold["n"]),
                         f"{gold['wins']} / {gold['ties']} / {gold['losses']}", _ci(gold), "–", "–", "–", "–"])
    for label, m, result in _eval_models(data):
        wr, lc = m.get("win_rate"), m.get("lc_win_rate")
        if not wr:
            continue
        ref = (result.get("reference") or {}).get("name", "–")
        judge_info = result.get("judge") or {}
        judge = judge_info.get("name", "–") + (f" ({judge_info['mode']})" if judge_info.get("mode") else "")
        rows.append([_e(label), _e(ref), _e(judge), str(wr["n"]), f"{wr['wins']} / {wr['ties']} / {wr['losses']}",
                     _ci(wr), _ci(lc), _num(lc.get("length_coef") if lc else None, "{:+.2f}"),
                     str(wr.get("inconsistent", "–")), _num(wr.get("position_bias"), "{:.0%}")])
    if not rows:
        return ""
    table = _table(["model", "vs", "judge", "prompts", "W / T / L", "win rate [95% CI]",
                    "length-controlled", "length coef", "order flips", "bias to A"],
                   rows, numeric_from=3)
    return _section("win-rates", "Win rates", table,
                    "Exact-checker rows compare each model's greedy answer with the reference's on the same "
                    "checkable prompt: a win when only the model is right, a tie when both or neither are. "
                    "LLM-judge rows: each pair is judged twice, once in each order; if the two orders disagree "
                    "(an order flip) "
                    "the pair is a tie, and 'bias to A' is how often the judge picked whichever answer it saw "
                    "first in both orders. A judge marked (logprob) is read from its log-probabilities, "
                    "log P(A) − log P(B) after 'Verdict:', with the batch's mean preference for the first answer "
                    "(its position offset) subtracted before the two orders vote. "
                    "Bootstrap percentile intervals over prompts. The length-controlled rate is the win rate a "
                    "logistic fit predicts at equal answer length (a positive length coefficient means the judge "
                    "favoured longer answers).")


def reward_model_section(data: ReportData) -> str:
    rows, plots = [], []
    rm = data.stages.get("rm")
    if isinstance(rm, dict) and ("eval_accuracy" in rm or "eval_ece" in rm):
        prefs = data.stages.get("preferences") or {}
        train = prefs.get("train", {})
        rows.append(["reward model (demo)", _num(rm.get("eval_accuracy"), "{:.1%}"), _num(rm.get("eval_ece")),
                     _e(rm.get("eval_pairs", "–")), _e(rm.get("train_pairs", train.get("pairs", "–")))])
        if rm.get("histogram"):
            plot = histogram_plot(rm["histogram"], "held-out rewards: chosen vs rejected")
            if plot:
                plots.append(plot)
    for source, result in data.evals:
        r = result.get("reward_model")
        if r:
            rows.append([_e(r.get("path", source)), _num(r.get("accuracy"), "{:.1%}"), _num(r.get("ece")),
                         _e(r.get("num_pairs", "–")), "–"])
    if not rows:
        return ""
    table = _table(["reward model", "held-out accuracy (non-tie)", "calibration error (ECE)", "held-out pairs",
                    "training pairs"], rows)
    return _section("reward-model", "Reward model", table + "".join(plots),
                    "Accuracy on held-out pairs the reward model never saw; ties reported apart.")


def over_optimization_section(data: ReportData) -> str:
    plots = []
    for run in data.training:
        keys = over_optimization_keys(run)
        if keys:
            plots.append(over_optimization_plot(run, *keys))
    if not plots:
        return ""
    return _section("over-optimization", "Reward over-optimization", "".join(plots),
                    "The proxy (learned) reward the policy optimizes and the gold reward it stands for, against "
                    "the KL from the reference. When the proxy keeps rising while the gold reward falls, the "
                    "policy is exploiting the reward model.")


def training_section(data: ReportData) -> str:
    parts = []
    for run in data.training:
        plot = training_curves_plot(run)
        if plot:
            parts.append(f"<h3>{_e(run.label)}</h3>"
                         f'<p class="note">{_e(str(run.path))} · {len(run.rows)} logged rows</p>{plot}')
    if not parts:
        return ""
    return _section("training", "Training curves", "".join(parts),
                    "From each run's metrics.jsonl; long noisy curves are drawn with a moving average over the "
                    "faint raw values.")


def diversity_section(data: ReportData) -> str:
    rows = []
    for label, m, _ in _eval_models(data):
        div, length, kl, cal = m.get("diversity") or {}, m.get("length") or {}, m.get("kl"), m.get("calibration")
        rows.append([_e(label), _num(length.get("mean_words"), "{:.1f}"), _num(length.get("mean_tokens"), "{:.1f}"),
                     _num(length.get("open_truncated"), "{:.0%}"),
                     _num(div.get("distinct_1")), _num(div.get("distinct_2")),
                     _num(div.get("within_prompt_self_similarity")), _num(div.get("across_prompt_self_similarity")),
                     _ci(kl, pct=False) if kl else "–", _num(kl.get("per_token_k3") if kl else None, "{:.4f}"),
                     f"{_num(cal['ece'])} (n={cal['n_stated']})" if cal else "–"])
    if not rows:
        return ""
    table = _table(["model", "mean words", "mean tokens", "truncated", "distinct-1", "distinct-2",
                    "self-sim (same prompt)", "self-sim (across prompts)", "KL nats [95% CI]", "KL/token (k3)",
                    "stated-confidence ECE"], rows)
    return _section("side-effects", "Length, diversity, KL", table,
                    "Side effects of preference optimization: answers growing longer, samples collapsing onto one "
                    "answer (self-similarity → 1, distinct-n → 0), drift from the reference (KL).")


def _cell(text: str, correct: bool | None = None) -> str:
    mark = "" if correct is None else (' <span class="ok">✓</span>' if correct else ' <span class="bad">✗</span>')
    return f"<pre>{_e(text)}</pre>{mark}"


def samples_section(data: ReportData) -> str:
    parts = []
    for source, result in data.evals:
        names = [m["name"] for m in result["models"]]
        ref = result.get("reference")
        has_ref = any("reference" in s for s in result.get("samples", []))
        head = ["prompt"] + ([f"reference: {ref['name']}"] if has_ref and ref else []) + names
        rows = []
        for s in result.get("samples", []):
            prompt = _cell(s["prompt"]) + (f'<span class="ci">gold: {_e(s["answer"])}</span>'
                                           if s.get("answer") is not None else "")
            cells = [prompt] + ([_cell(s.get("reference", ""))] if has_ref and ref else [])
            for name in names:
                r = s.get("responses", {}).get(name)
                cells.append(_cell(r["text"], r.get("correct")) if r else "–")
            rows.append(cells)
        if rows:
            where = f" ({source})" if len(data.evals) > 1 else ""
            parts.append(f"<h3>{_e('Held-out prompts, every model' + where)}</h3>"
                         + _table(head, rows, numeric_from=len(head), cls="samples"))
    stage_rows = [(key, label) for key, label in model_rows(data.stages) if data.stages[key].get("samples")]
    if stage_rows:
        by_task: dict[str, dict[str, Any]] = {}
        for key, _ in stage_rows:
            for s in data.stages[key]["samples"]:
                entry = by_task.setdefault(s.get("task_id", s["prompt"]), {"prompt": s["prompt"], "by": {}})
                entry["by"][key] = s
        head = ["prompt"] + [label for _, label in stage_rows]
        rows = [[_cell(entry["prompt"])] + [_cell(entry["by"][k]["response"], entry["by"][k].get("correct"))
                                            if k in entry["by"] else "–" for k, _ in stage_rows]
                for entry in by_task.values()]
        parts.append("<h3>Checkable prompts, stage by stage</h3>"
                     + _table(head, rows, numeric_from=len(head), cls="samples"))
    if not parts:
        return ""
    return _section("samples", "Sample outputs", "".join(parts),
                    "The same held-out prompts answered by each model (greedy); ✓/✗ from the exact checker.")


def timings_section(data: ReportData) -> str:
    rows = [[_e(name), f"{r['wall_s']:.1f} s"] for name, r in data.stages.items()
            if isinstance(r.get("wall_s"), (int, float))]
    rows += [[_e(f"eval: {source}"), f"{r['wall_s']:.1f} s"] for source, r in data.evals
             if isinstance(r.get("wall_s"), (int, float))]
    if not rows:
        return ""
    return _section("timings", "Wall time per stage", _table(["stage", "wall time"], rows))


SECTIONS = (("summary", "Summary", summary_section), ("accuracy", "Gold accuracy", accuracy_section),
            ("win-rates", "Win rates", win_rate_section), ("reward-model", "Reward model", reward_model_section),
            ("over-optimization", "Over-optimization", over_optimization_section),
            ("training", "Training curves", training_section), ("side-effects", "Length & diversity",
                                                                  diversity_section),
            ("samples", "Samples", samples_section), ("timings", "Timings", timings_section))


def render_report(data: ReportData, *, title: str | None = None) -> str:
    """The whole page as one HTML string (no script, no external reference)."""
    title = title or "rlhfkit report: " + ", ".join(r.name or str(r) for r in data.runs)
    built = [(anchor, name, fn(data)) for anchor, name, fn in SECTIONS]
    built = [(anchor, name, body) for anchor, name, body in built if body]
    nav = "".join(f'<a href="#{anchor}">{_e(name)}</a>' for anchor, name, _ in built)
    header = (f"<header><h1>{_e(title)}</h1><p>runs: {_e(', '.join(str(r) for r in data.runs))}</p>"
              f"<p>generated {_e(time.strftime('%Y-%m-%d %H:%M'))} by rlhfkit</p><nav>{nav}</nav></header>")
    body = "".join(b for _, _, b in built)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>{header}{body}</main></body></html>")


def write_report(run_dirs: Sequence[str | Path], out_path: str | Path, *, title: str | None = None) -> Path:
    """Collect `run_dirs` and write the report to `out_path`; returns the path."""
    from rlhfkit.io import atomic_write_text

    page = render_report(collect(run_dirs), title=title)
    out = Path(out_path)
    atomic_write_text(out, page)
    return out


# ----------------------------------------------------------------------------- the command

def report_command(
    runs: list[Path] = typer.Argument(..., help="run folders: a training run, a demo folder, an eval output"),
    out: Optional[Path] = typer.Option(None, help="where to write the page (default: RUN/report.html for "
                                                  "one run, ./report.html for several)"),
    title: Optional[str] = typer.Option(None, help="page title"),
):
    """One self-contained HTML page: training curves, over-optimization, win rates with
    intervals, gold accuracy, diversity, samples side by side. Opens offline.

    [bold]Examples[/]

      rlhf report runs/demo

      rlhf report runs/sft runs/ppo runs/eval --out comparison.html
    """
    from rich.console import Console
    from rich.markup import escape

    from rlhfkit.cli import _friendly

    target = out or (runs[0] / REPORT_FILE if len(runs) == 1 else Path(REPORT_FILE))
    path = _friendly(write_report)(runs, target, title=title)
    Console().print(f"[green]report[/] → {escape(str(path))}")
