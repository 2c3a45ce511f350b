"""One self-contained HTML page comparing every model of one or more runs (`rlhf report`).

What it shows comes from the run folders (`eval.runs`): training curves from `metrics.jsonl`
and, when a run logged a proxy reward (`reward/proxy` or `reward/rm`), a gold reward
(`reward/gold` or `gold_accuracy`) and `kl`, the over-optimization plot: both rewards against
KL; summary, win-rate, diversity tables and samples from `eval.json`; gold accuracy, reward
model, samples and wall time from a pipeline's stage results.

The page has no script and references nothing outside itself: plots (`eval.plots`) are PNGs
embedded as base64; every piece of text that came from a user or a model is HTML-escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.eval.html import ci_cell, esc, html_table, img, num, page, section
from rlhfkit.eval.plots import (
    histogram_plot,
    interval_plot,
    over_optimization_keys,
    over_optimization_plot,
    training_curves_plot,
)
from rlhfkit.eval.runs import ReportData, accuracy_stages, collect, reward_model_stages
from rlhfkit.io import atomic_write_text

REPORT_FILE = "report.html"


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
        rows.append([esc(label) + (' <span class="ci">(reference)</span>' if m.get("is_reference") else ""),
                     ci_cell({"mean": em["accuracy"], "ci_low": em["ci_low"], "ci_high": em["ci_high"]}) if em else "–",
                     ci_cell(m.get("gold_win_rate")), ci_cell(m.get("win_rate")), ci_cell(m.get("lc_win_rate")),
                     num(kl["mean"]) if kl else "–", num((m.get("length") or {}).get("mean_tokens"), "{:.1f}"),
                     num(div.get("distinct_2")), num(div.get("within_prompt_self_similarity")),
                     num(reward["mean"]) if reward else "–"])
    table = html_table(["model", "exact match", f"gold win rate {vs}", f"judged win rate {vs}", "length-controlled",
                    "KL (nats)", "mean tokens",
                    "distinct-2", "self-similarity", "RM score"], rows)
    plot = ""
    golden = [(label, m["gold_win_rate"]) for label, m, _ in models if m.get("gold_win_rate")]
    if golden:
        title = f"gold win rate {vs} on the checkable tasks (95% CI)"
        plot += img(interval_plot([(label, g["mean"], g["ci_low"], g["ci_high"]) for label, g in golden],
                                   title=title, xlabel="win rate (exact checker; both right or both wrong = ½)",
                                   reference_line=0.5), title)
    judged = [(label, m) for label, m, _ in models if m.get("win_rate")]
    if judged:
        title = f"judged win rate {vs} (95% CI; ◆ length-controlled)"
        plot += img(interval_plot([(label, m["win_rate"]["mean"], m["win_rate"]["ci_low"],
                                     m["win_rate"]["ci_high"]) for label, m in judged],
                                   title=title, xlabel="win rate (tie = ½)", reference_line=0.5,
                                   second=[(m["lc_win_rate"]["mean"], m["lc_win_rate"]["ci_low"],
                                            m["lc_win_rate"]["ci_high"]) if m.get("lc_win_rate") else None
                                           for _, m in judged], second_label="length-controlled"), title)
    note = ("Exact match on held-out checkable tasks (greedy); gold win rate: the same answers compared with "
            "the reference's prompt by prompt by the exact checkers; judged win rates: an LLM judge, pairwise in "
            "both orders on held-out open prompts, tie = ½; KL on each model's own samples; self-similarity of "
            "several samples for one prompt (near 1 = mode collapse).")
    return section("summary", "Models at a glance", table + plot, esc(note))


def accuracy_section(data: ReportData) -> str:
    entries: list[tuple[str, dict[str, Any]]] = [(label, data.stages[key])
                                                 for key, label in accuracy_stages(data.stages)]
    # A stage already measured its model; an eval of the model named after the stage is a
    # second greedy decode of it, not another model: list each model once.
    entries += [(label, m["exact_match"]) for label, m, _ in _eval_models(data)
                if m.get("exact_match") and m["name"] not in data.stages]
    if not entries:
        return ""
    families = sorted({f for _, r in entries for f in r.get("per_family", {})})
    rows = []
    for label, r in entries:
        fam = [num(r.get("per_family", {}).get(f), "{:.0%}") for f in families]
        rows.append([esc(label), f"<b>{r['accuracy']:.1%}</b>",
                     f'<span class="ci">[{r["ci_low"]:.1%}, {r["ci_high"]:.1%}]</span>', str(r["n"]), *fam,
                     num(r.get("mean_response_words"), "{:.1f}")])
    table = html_table(["model", "exact match", "95% CI", "test prompts", *families, "mean words"], rows)
    title = "held-out exact-match accuracy (95% CI)"
    plot = img(interval_plot([(label, r["accuracy"], r["ci_low"], r["ci_high"]) for label, r in entries],
                              title=title, xlabel="exact match"), title)
    return section("accuracy", "Gold accuracy per stage", table + plot,
                    "Greedy decoding on held-out prompts that no training stage saw, scored by exact checkers.")


def sampled_accuracy_section(data: ReportData) -> str:
    blocks = [(label, m["sampled_accuracy"]) for label, m, _ in _eval_models(data) if m.get("sampled_accuracy")]
    if not blocks:
        return ""
    ks = sorted({k for _, b in blocks for k in b["pass_at_k"]}, key=int)
    rows = [[esc(label), str(b["samples_per_prompt"]), str(b["prompts"]),
             *[ci_cell(b["pass_at_k"].get(k)) for k in ks], ci_cell(b["majority_vote"])] for label, b in blocks]
    table = html_table(["model", "samples per prompt", "prompts", *[f"pass@{k}" for k in ks], "majority vote"], rows)
    return section("sampled-accuracy", "Accuracy from several samples", table,
                   "n samples per held-out checkable prompt at the eval temperature. pass@k: the unbiased "
                   "estimate of the chance that at least one of k samples is right, 1 − C(n−c, k)/C(n, k) per "
                   "prompt; majority vote: the most frequent extracted answer is right (ties: the answer given "
                   "first). Bootstrap 95% intervals over prompts.")


def win_rate_section(data: ReportData) -> str:
    rows = []
    for label, m, result in _eval_models(data):
        gold = m.get("gold_win_rate")
        if gold:
            ref = (result.get("reference") or {}).get("name", "–")
            rows.append([esc(label), esc(ref), "exact checker (checkable tasks)", str(gold["n"]),
                         f"{gold['wins']} / {gold['ties']} / {gold['losses']}", ci_cell(gold), "–", "–", "–", "–"])
    for label, m, result in _eval_models(data):
        wr, lc = m.get("win_rate"), m.get("lc_win_rate")
        if not wr:
            continue
        ref = (result.get("reference") or {}).get("name", "–")
        judge_info = result.get("judge") or {}
        judge = judge_info.get("name", "–") + (f" ({judge_info['mode']})" if judge_info.get("mode") else "")
        rows.append([esc(label), esc(ref), esc(judge), str(wr["n"]), f"{wr['wins']} / {wr['ties']} / {wr['losses']}",
                     ci_cell(wr), ci_cell(lc), num(lc.get("length_coef") if lc else None, "{:+.2f}"),
                     str(wr.get("inconsistent", "–")), num(wr.get("position_bias"), "{:.0%}")])
    if not rows:
        return ""
    table = html_table(["model", "vs", "judge", "prompts", "W / T / L", "win rate [95% CI]",
                    "length-controlled", "length coef", "order flips", "bias to A"],
                   rows, numeric_from=3)
    return section("win-rates", "Win rates", table,
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
    for key, label in reward_model_stages(data.stages):
        rm = data.stages[key]
        rows.append([esc(label), num(rm.get("eval_accuracy"), "{:.1%}"), num(rm.get("eval_ece")),
                     esc(rm.get("eval_pairs", "–")), esc(rm.get("train_pairs", "–"))])
        title = "held-out rewards: chosen vs rejected"
        plot = histogram_plot(rm["histogram"], title) if rm.get("histogram") else None
        if plot is not None:
            plots.append(img(plot, title))
    for source, result in data.evals:
        r = result.get("reward_model")
        if r:
            rows.append([esc(r.get("path", source)), num(r.get("accuracy"), "{:.1%}"), num(r.get("ece")),
                         esc(r.get("num_pairs", "–")), "–"])
    if not rows:
        return ""
    table = html_table(["reward model", "held-out accuracy (non-tie)", "calibration error (ECE)", "held-out pairs",
                    "training pairs"], rows)
    return section("reward-model", "Reward model", table + "".join(plots),
                    "Accuracy on held-out pairs the reward model never saw; ties reported apart.")


def over_optimization_section(data: ReportData) -> str:
    plots = []
    for run in data.training:
        keys = over_optimization_keys(run)
        if keys:
            plots.append(img(over_optimization_plot(run, *keys), f"over-optimization plot of {run.label}"))
    if not plots:
        return ""
    return section("over-optimization", "Reward over-optimization", "".join(plots),
                    "The proxy (learned) reward the policy optimizes and the gold reward it stands for, against "
                    "the KL from the reference. When the proxy keeps rising while the gold reward falls, the "
                    "policy is exploiting the reward model.")


def training_section(data: ReportData) -> str:
    parts = []
    for run in data.training:
        plot = training_curves_plot(run)
        if plot is not None:
            parts.append(f"<h3>{esc(run.label)}</h3>"
                         f'<p class="note">{esc(str(run.path))} · {len(run.rows)} logged rows</p>'
                         + img(plot, f"training curves of {run.label}"))
    if not parts:
        return ""
    return section("training", "Training curves", "".join(parts),
                    "From each run's metrics.jsonl; long noisy curves are drawn with a moving average over the "
                    "faint raw values.")


def diversity_section(data: ReportData) -> str:
    rows = []
    for label, m, _ in _eval_models(data):
        div, length, kl, cal = m.get("diversity") or {}, m.get("length") or {}, m.get("kl"), m.get("calibration")
        rows.append([esc(label), num(length.get("mean_words"), "{:.1f}"), num(length.get("mean_tokens"), "{:.1f}"),
                     num(length.get("open_truncated"), "{:.0%}"),
                     num(div.get("distinct_1")), num(div.get("distinct_2")),
                     num(div.get("within_prompt_self_similarity")), num(div.get("across_prompt_self_similarity")),
                     ci_cell(kl, pct=False) if kl else "–", num(kl.get("per_token_k3") if kl else None, "{:.4f}"),
                     f"{num(cal['ece'])} (n={cal['n_stated']})" if cal else "–"])
    if not rows:
        return ""
    table = html_table(["model", "mean words", "mean tokens", "truncated", "distinct-1", "distinct-2",
                    "self-sim (same prompt)", "self-sim (across prompts)", "KL nats [95% CI]", "KL/token (k3)",
                    "stated-confidence ECE"], rows)
    return section("side-effects", "Length, diversity, KL", table,
                    "Side effects of preference optimization: answers growing longer, samples collapsing onto one "
                    "answer (self-similarity → 1, distinct-n → 0), drift from the reference (KL).")


def _cell(text: str, correct: bool | None = None) -> str:
    mark = "" if correct is None else (' <span class="ok">✓</span>' if correct else ' <span class="bad">✗</span>')
    return f"<pre>{esc(text)}</pre>{mark}"


def samples_section(data: ReportData) -> str:
    parts = []
    for source, result in data.evals:
        names = [m["name"] for m in result["models"]]
        ref = result.get("reference")
        has_ref = any("reference" in s for s in result.get("samples", []))
        head = ["prompt"] + ([f"reference: {ref['name']}"] if has_ref and ref else []) + names
        rows = []
        for s in result.get("samples", []):
            prompt = _cell(s["prompt"]) + (f'<span class="ci">gold: {esc(s["answer"])}</span>'
                                           if s.get("answer") is not None else "")
            cells = [prompt] + ([_cell(s.get("reference", ""))] if has_ref and ref else [])
            for name in names:
                r = s.get("responses", {}).get(name)
                cells.append(_cell(r["text"], r.get("correct")) if r else "–")
            rows.append(cells)
        if rows:
            where = f" ({source})" if len(data.evals) > 1 else ""
            parts.append(f"<h3>{esc('Held-out prompts, every model' + where)}</h3>"
                         + html_table(head, rows, numeric_from=len(head), cls="samples"))
    stage_rows = [(key, label) for key, label in accuracy_stages(data.stages) if data.stages[key].get("samples")]
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
                     + html_table(head, rows, numeric_from=len(head), cls="samples"))
    if not parts:
        return ""
    return section("samples", "Sample outputs", "".join(parts),
                    "The same held-out prompts answered by each model (greedy); ✓/✗ from the exact checker.")


def timings_section(data: ReportData) -> str:
    rows = [[esc(name), f"{r['wall_s']:.1f} s"] for name, r in data.stages.items()
            if isinstance(r.get("wall_s"), (int, float))]
    rows += [[esc(f"eval: {source}"), f"{r['wall_s']:.1f} s"] for source, r in data.evals
             if isinstance(r.get("wall_s"), (int, float))]
    if not rows:
        return ""
    return section("timings", "Wall time per stage", html_table(["stage", "wall time"], rows))


SECTIONS = (("summary", "Summary", summary_section), ("accuracy", "Gold accuracy", accuracy_section),
            ("sampled-accuracy", "pass@k", sampled_accuracy_section),
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
    nav = "".join(f'<a href="#{anchor}">{esc(name)}</a>' for anchor, name, _ in built)
    header = f"<p>runs: {esc(', '.join(str(r) for r in data.runs))}</p><nav>{nav}</nav>"
    return page(title, header, "".join(b for _, _, b in built))


def write_report(run_dirs: Sequence[str | Path], out_path: str | Path, *, title: str | None = None) -> Path:
    """Collect `run_dirs` and write the report to `out_path`; returns the path."""
    page = render_report(collect(run_dirs), title=title)
    out = Path(out_path)
    atomic_write_text(out, page)
    return out
