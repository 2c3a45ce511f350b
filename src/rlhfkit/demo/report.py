"""The demo's report: one self-contained HTML page (no network needed to open it)."""

from __future__ import annotations

import html
from pathlib import Path

from rlhfkit.train.checkpoint import atomic_write_text

LABELS = {"eval_base": "embedded model (before)", "eval_sft": "after SFT"}


def model_rows(results: dict) -> list[tuple[str, str]]:
    """(stage key, label) of every stage that measured exact-match accuracy, in run order."""
    return [(k, LABELS.get(k, f"after {k.upper()}")) for k, r in results.items()
            if isinstance(r, dict) and "per_family" in r]

CSS = """
body{font:15px/1.5 system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0} td,th{padding:.3em .8em;border:1px solid #ddd;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;background:#f8f8f8;padding:.5em;margin:0;font-size:13px}
.ok{color:#17803d}.bad{color:#b42318} .muted{color:#666}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _accuracy_table(results: dict) -> str:
    rows = []
    families = sorted({f for key, _ in model_rows(results) for f in results[key]["per_family"]})
    head = "".join(f"<th>{_e(f)}</th>" for f in families)
    for key, label in model_rows(results):
        r = results[key]
        fam = "".join(f"<td class=num>{r['per_family'].get(f, float('nan')):.0%}</td>" for f in families)
        rows.append(f"<tr><td>{_e(label)}</td><td class=num><b>{r['accuracy']:.1%}</b></td>"
                    f"<td class=num>[{r['ci_low']:.1%}, {r['ci_high']:.1%}]</td><td class=num>{r['n']}</td>"
                    f"{fam}<td class=num>{r['mean_response_words']:.1f}</td></tr>")
    return ("<table><tr><th>model</th><th>exact match</th><th>95% CI</th><th>test prompts</th>"
            f"{head}<th>mean words</th></tr>{''.join(rows)}</table>")


def _samples(results: dict) -> str:
    out = []
    for key, label in model_rows(results):
        r = results[key]
        if not r.get("samples"):
            continue
        rows = "".join(
            f"<tr><td><pre>{_e(s['prompt'])}</pre></td><td><pre>{_e(s['response'])}</pre></td>"
            f"<td class={'ok' if s['correct'] else 'bad'}>{'✓' if s['correct'] else '✗'}</td></tr>"
            for s in r["samples"])
        out.append(f"<h3>{_e(label)}</h3><table><tr><th>prompt</th><th>response</th><th></th></tr>{rows}</table>")
    return "".join(out)


def _timings(results: dict) -> str:
    rows = "".join(f"<tr><td>{_e(name)}</td><td class=num>{r.get('wall_s', 0):.1f} s</td></tr>"
                   for name, r in results.items() if isinstance(r, dict) and "wall_s" in r)
    return f"<table><tr><th>stage</th><th>wall time</th></tr>{rows}</table>"


def _reward_model(results: dict) -> str:
    rm, prefs = results.get("rm"), results.get("preferences")
    if not rm:
        return ""
    tr, te = prefs.get("train", {}), prefs.get("test", {})
    acc = rm.get("eval_accuracy")
    ece = rm.get("eval_ece")
    return (f"<h2>Preference data and reward model</h2><p>{tr.get('pairs')} training pairs "
            f"({tr.get('ties')} ties, {tr.get('flipped')} mis-clicks at rate {tr.get('noise')}) sampled from the SFT "
            f"model (its samples were correct {prefs.get('sampled_accuracy', 0):.1%} of the time); "
            f"{te.get('pairs')} gold-labeled held-out pairs on other prompts.</p>"
            f"<table><tr><th>reward model</th><th>held-out accuracy (non-tie pairs)</th><th>calibration error</th></tr>"
            f"<tr><td>Bradley–Terry on the SFT model</td><td class=num>{_pct(acc)}</td>"
            f"<td class=num>{'' if ece is None else f'{ece:.3f}'}</td></tr></table>")


def _pct(x) -> str:
    return "–" if x is None else f"{x:.1%}"


def write_demo_report(ctx) -> Path:
    res = ctx.results
    data = res.get("data", {})
    body = (f"<h1>rlhfkit demo report</h1><p class=muted>model: {_e(ctx.settings.model)} · "
            f"{data.get('train_examples', '?')} training examples · {data.get('test_checkable', '?')} "
            "held-out checkable test prompts (greedy decoding, exact-match checkers)</p>"
            f"<h2>Gold accuracy per stage</h2>{_accuracy_table(res)}{_reward_model(res)}"
            f"<h2>Sample outputs</h2>{_samples(res)}<h2>Wall time per stage</h2>{_timings(res)}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>rlhfkit demo report</title>" \
           f"<style>{CSS}</style></head><body>{body}</body></html>"
    path = ctx.path("report.html")
    atomic_write_text(path, page)
    return path
