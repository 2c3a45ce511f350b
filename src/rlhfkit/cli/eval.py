"""`rlhf eval`: evaluate models on held-out prompts, print the table, write eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhfkit.cli.config import config_command
from rlhfkit.cli.errors import friendly
from rlhfkit.eval.evaluate import EvalConfig, evaluate

EVAL_HELP = ("Evaluate models on held-out prompts: exact match, pass@k and majority vote, judged win rate vs a "
             "reference (CI, length-controlled), reward, KL, length, diversity.")
EVAL_EXAMPLES = ("[bold]Examples[/]\n\n"
                 "  rlhf eval --model runs/demo/sft/final,runs/demo/dpo/final --reference runs/demo/sft/final\n\n"
                 "  rlhf eval --model runs/ppo/final --reference runs/sft/final --tasks prompts.jsonl "
                 "--judge http://localhost:8000/v1 --judge-model qwen2.5-7b\n\n"
                 "  rlhf eval --model runs/dpo/final --reference runs/sft/final --reward-model runs/rm/final "
                 "--pairs test_pairs.jsonl --output-dir runs/eval")


def interval(block: dict | None, key: str = "mean") -> str:
    """'52.0% [41.0%, 63.0%]' from a block with `key`, `ci_low` and `ci_high`; '–' without one."""
    if not block or block.get(key) is None:
        return "–"
    return f"{block[key]:.1%} [{block['ci_low']:.1%}, {block['ci_high']:.1%}]"


def sampled_cell(block: dict | None) -> str:
    """'p@1 40.0% · p@4 60.0% · maj 45.0%' from a model's sampled_accuracy block; '–' without one."""
    if not block:
        return "–"
    parts = [f"p@{k} {v['mean']:.1%}" for k, v in block["pass_at_k"].items()]
    return " · ".join(parts + [f"maj {block['majority_vote']['mean']:.1%}"])


def results_table(result: dict[str, Any]) -> Table:
    """The eval.json numbers as a rich table, one row per model."""
    ref = result.get("reference")
    table = Table(title=f"held-out evaluation ({result['prompts']['checkable']} checkable, "
                        f"{result['prompts']['open']} open prompts)")
    vs = f" vs {ref['name']}" if ref else ""
    for col in ("model", "exact match [95% CI]", "sampled: pass@k, majority",
                f"gold win rate{vs}", f"judged win rate{vs}", "LC win rate",
                "KL (nats)", "mean tokens", "distinct-2", "self-sim (per prompt)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in result["models"]:
        kl = m.get("kl")
        div = m.get("diversity") or {}
        table.add_row(m["name"] + (" (reference)" if m.get("is_reference") else ""),
                      interval(m.get("exact_match"), "accuracy"), sampled_cell(m.get("sampled_accuracy")),
                      interval(m.get("gold_win_rate")), interval(m.get("win_rate")), interval(m.get("lc_win_rate")),
                      f"{kl['mean']:.3f}" if kl else "–", f"{m['length']['mean_tokens']:.1f}",
                      f"{div['distinct_2']:.3f}" if div.get("distinct_2") is not None else "–",
                      f"{div['within_prompt_self_similarity']:.3f}"
                      if div.get("within_prompt_self_similarity") is not None else "–")
    return table


def run_eval_command(cfg: EvalConfig) -> dict[str, Any]:
    console = Console()
    result = evaluate(cfg)
    console.print(results_table(result))
    rm = result.get("reward_model")
    if rm:
        console.print(f"reward model {escape(rm['path'])}: accuracy {rm['accuracy']:.1%} on "
                      f"{rm['num_non_tie']} held-out pairs, ECE {rm['ece']:.3f}")
    console.print(f"[green]wrote[/] {escape(result['path'])} · make the HTML report with: "
                  f"rlhf report {escape(str(Path(result['path']).parent))}")
    return result


def register(app: typer.Typer) -> None:
    """Add `rlhf eval` (flags from `EvalConfig`, `--config FILE` too)."""
    config_command(app, "eval", EvalConfig, friendly(run_eval_command), help=EVAL_HELP, examples=EVAL_EXAMPLES)
