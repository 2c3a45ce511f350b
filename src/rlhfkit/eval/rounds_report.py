"""The report across rounds of a loop (`rlhf loop`, `rlhf demo`): one self-contained HTML page.

Input: the registry's round rows (`loop.registry.Registry.rounds()`, plain dicts) and the wall
time of each step. Per round: the feedback (source, labels, how many decided, agreement of
human votes, agreement of the labels with the exact checkers), the training, held-out
accuracy with its interval, the paired comparison with the previous round and round 0
(+/− prompts, sign test), KL to round 0 (k1 per response with an interval, k3 per token) and
response length.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.eval.html import esc, html_table, img, num, page, section
from rlhfkit.eval.plots import interval_plot
from rlhfkit.io import atomic_write_text

Row = dict[str, Any]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1%}"


def _paired(block: Row | None) -> str:
    if not block:
        return "–"
    sign = "+" if block["delta"] >= 0 else "−"
    low, high = block["win_rate_ci"]
    return (f"{sign}{abs(block['delta']):.1%} (+{block['wins']} / −{block['losses']}, p = {block['p']:.3g})<br>"
            f"win rate {block['win_rate']:.1%} <span class=\"ci\">[{low:.1%}, {high:.1%}]</span>")


def _kl(block: Row | None) -> str:
    if not block:
        return "–"
    return f"{block['mean']:.3f} <span class=\"ci\">[{block['ci_low']:.3f}, {block['ci_high']:.3f}]</span>"


def _agreement(feedback: Row) -> str:
    human = feedback.get("agreement")
    parts = []
    if human:
        parts.append(f"{human['votes']} votes, {human['annotators']} annotators")
        if human.get("percent_agreement") is not None:
            parts.append(f"agreement {human['percent_agreement']:.0%}, Fleiss κ {num(human.get('fleiss_kappa'))}")
    gold = feedback.get("gold_agreement") or {}
    if gold.get("rate") is not None:
        parts.append(f"labels agree with the exact checkers on {gold['agree']}/{gold['checked']} "
                     f"({gold['rate']:.0%})")
    return esc("; ".join(parts)) if parts else "–"


def _setup(cfg: Row) -> str:
    """'feedback rules, judge · trainer dpo' of a round's config."""
    return f"feedback {', '.join(cfg['feedback'])} · trainer {cfg['trainer']}"


def accuracy_rows(rounds: Sequence[Row]) -> list[list[str]]:
    rows = []
    for r in rounds:
        ev = r["metrics"]["eval"]
        fb = r["metrics"].get("feedback") or {}
        tr = r["metrics"].get("train") or {}
        rows.append([
            f"round {r['round']}", esc(r["model"]),
            "–" if ev["accuracy"] is None else
            f"{_pct(ev['accuracy'])} <span class=\"ci\">[{_pct(ev['ci_low'])}, {_pct(ev['ci_high'])}]</span>",
            _paired(ev.get("vs_previous")), _paired(ev.get("vs_round0")),
            "–" if not fb else f"{fb.get('decided', 0)} / {fb.get('labels', 0)}",
            _pct((r["metrics"].get("sample") or {}).get("sample_gold_accuracy")),
            "–" if not tr else esc(tr.get("skipped") or f"{tr.get('pairs', 0)} pairs"),
        ])
    return rows


def _judged(block: Row | None) -> str:
    if not block:
        return "–"
    return (f"{_pct(block['win_rate'])} <span class=\"ci\">[{_pct(block['win_rate_ci'][0])}, "
            f"{_pct(block['win_rate_ci'][1])}]</span> +{block['wins']} / −{block['losses']} / ={block['ties']}, "
            f"p = {block['p']:.2g}")


def judge_rows_of(rounds: Sequence[Row]) -> list[list[str]]:
    rows = []
    for r in rounds:
        ev = r["metrics"]["eval"]
        now = ev.get("judge_vs_round0")
        if now:
            rows.append([f"round {r['round']}", _judged(ev.get("judge_vs_previous")), _judged(now),
                         _pct(now["orders_agree"]), esc(now["judge"])])
    return rows


def side_effect_rows(rounds: Sequence[Row]) -> list[list[str]]:
    rows = []
    for r in rounds:
        ev = r["metrics"]["eval"]
        kl = ev.get("kl_to_round0")
        rows.append([f"round {r['round']}", _kl(kl), num(kl and kl["per_token_k3"], "{:.4f}"),
                     num(kl and kl["n_responses"], "{:d}"), num(ev.get("mean_response_tokens"), "{:.1f}"),
                     num(ev.get("truncated"), "{:d}")])
    return rows


def render_rounds(rounds: Sequence[Row], step_times: dict[int, dict[str, float]], *, title: str,
                  notes: Sequence[str] = (), step_order: Sequence[str] = (),
                  pairwise: dict[tuple[int, int], Row] | None = None) -> str:
    if not rounds:
        body = section("rounds", "Rounds", "<p>No round is registered yet.</p>")
        return page(title, "", body)
    cfg = rounds[-1]["config"]
    setups = {_setup(r["config"]) for r in rounds[1:]} or {_setup(cfg)}
    setup = setups.pop() if len(setups) == 1 else "feedback and trainer vary per round (see Feedback per round)"
    head = (f"<p>policy {esc(cfg['policy'])} · {esc(setup)} (init: {esc(cfg['init'])}) · "
            f"{len(rounds) - 1} round(s) after round 0</p>")
    notes_html = "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
    table = html_table(["round", "model", "held-out accuracy [95% CI]", "vs previous round", "vs round 0",
                        "decided / labels", "samples correct", "training"], accuracy_rows(rounds), numeric_from=2)
    scored = [r for r in rounds if r["metrics"]["eval"]["accuracy"] is not None]
    plot = img(interval_plot([(f"round {r['round']}", r["metrics"]["eval"]["accuracy"],
                               r["metrics"]["eval"]["ci_low"], r["metrics"]["eval"]["ci_high"]) for r in scored],
                             title="held-out exact match per round (95% CI)", xlabel="exact match",
                             reference_line=scored[0]["metrics"]["eval"]["accuracy"]),
               "accuracy per round") if scored else ""
    if pairwise and len(rounds) > 2:
        rows = [[f"round {j} vs round {i}", _paired(block)] for (i, j), block in sorted(pairwise.items())]
        plot += "<h3>Every round against every earlier one</h3>" + html_table(["comparison", "paired result"], rows)
    body = section("rounds", "Accuracy per round", notes_html + table + plot,
                   "Greedy exact match on the same held-out prompts every round. Paired comparisons count the "
                   "prompts only the newer model gets right (+) and only the older one gets right (−); p is the "
                   "exact two-sided sign test; the gold win rate counts a prompt both or neither get right as ½. "
                   "Samples correct: the share of the round's sampled training responses the checkers accept "
                   "(the gold reward of the policy it sampled from).")
    judge_rows = judge_rows_of(rounds)
    if judge_rows:
        body += section("judge", "Open prompts, judged", html_table(
            ["round", "vs previous round", "vs round 0", "orders agree", "judge"], judge_rows),
            "Evaluation prompts without a checker: the round's greedy answer against the earlier round's, judged in "
            "both orders; a verdict that flips with the order counts as a tie, and identical answers tie without a "
            "call. Win rate of the newer round (tie = ½) with a bootstrap 95% interval; + / − / ties and the sign "
            "test p. Orders agree: the share of judged pairs whose two verdicts named the same answer — far below "
            "100% means the judge's preferences are mostly position noise.")
    fb_rows = [[f"round {r['round']}", esc(_setup(r["config"])), esc(", ".join(f"{k} {v}" for k, v in
                                                     (r["metrics"]["feedback"].get("decided_by") or {}).items())
                                           or "human"), _agreement(r["metrics"]["feedback"])]
               for r in rounds if r["metrics"].get("feedback")]
    if fb_rows:
        body += section("feedback", "Feedback per round", html_table(["round", "setup", "decided by", "agreement"],
                                                                     fb_rows),
                        "Where a proxy (reward model, judge) and the gold checkers part ways, the labels' agreement "
                        "with the checkers drops below the rules' own.")
    seen = {s for times in step_times.values() for s in times}
    steps = [s for s in step_order if s in seen] + sorted(seen - set(step_order))
    body += section("side-effects", "KL and length", html_table(
        ["round", "KL to round 0, nats per response [95% CI]", "KL per token (k3)", "responses", "mean tokens",
         "truncated"], side_effect_rows(rounds)),
        "KL(π_round ‖ π_0) on responses sampled from each round's policy: k1 summed over a response with a "
        "bootstrap interval (a single-sample estimate, it can dip below 0 when π barely moved), and k3 per token, "
        "which is never negative. Length and truncation are of the greedy evaluation answers.")
    time_rows = [[f"round {k}", *[num(step_times[k].get(s), "{:.0f} s") for s in steps],
                  num(sum(step_times[k].values()), "{:.0f} s")] for k in sorted(step_times)]
    body += section("timings", "Wall time per step", html_table(["round", *steps, "total"], time_rows))
    return page(title, head, body)


def write_rounds_report(rounds: Sequence[Row], step_times: dict[int, dict[str, float]], path: str | Path, *,
                        title: str = "rlhfkit loop report", notes: Sequence[str] = (),
                        step_order: Sequence[str] = (), pairwise: dict[tuple[int, int], Row] | None = None) -> Path:
    out = Path(path)
    atomic_write_text(out, render_rounds(rounds, step_times, title=title, notes=notes, step_order=step_order,
                                         pairwise=pairwise))
    return out
