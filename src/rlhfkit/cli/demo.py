"""`rlhf demo`: run the demo pipeline and print what it measured."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rlhfkit.cli.eval import interval
from rlhfkit.demo.pipeline import DemoSettings, run_demo
from rlhfkit.eval.runs import accuracy_stages
from rlhfkit.models.loading import ModelNotFound

console = Console()


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="folder for data, checkpoints, metrics and the report"),
    quick: bool = typer.Option(True, "--quick/--full",
                               help="quick (≈ 10 min on 2 CPU cores) or full (≈ 1 h: more data, every loss and "
                                    "algorithm)"),
    model: str = typer.Option("embedded", help="starting model: 'embedded', a Hugging Face id or a folder"),
    fresh: bool = typer.Option(False, help="redo every stage even if its results exist"),
    seed: int = typer.Option(0, help="seed for data, training and sampling"),
):
    """Run the whole loop on the embedded model and write an HTML report.

    Stages: demo tasks → eval of the base model → SFT → preference data (simulated annotator)
    → reward model → DPO → GRPO (gold reward) → win rates vs SFT (exact checker and LLM judge),
    KL and diversity → HTML report. --full adds IPO, KTO, RLOO, ReMax, PPO and the
    over-optimization run. Rerunning skips finished stages; a killed training stage resumes
    from its last checkpoint.

    [bold]Examples[/]

      rlhf demo

      rlhf demo --full --out runs/demo-full
    """
    settings = (DemoSettings.quick if quick else DemoSettings.full)(out, model=model, seed=seed)
    t0 = time.perf_counter()

    def show(name, desc, result):
        if "per_family" in result:
            fam = ", ".join(f"{k} {v:.0%}" for k, v in result["per_family"].items())
            console.print(f"[bold]{desc}[/]: [cyan]{result['accuracy']:.1%}[/] "
                          f"(95% CI {result['ci_low']:.1%}–{result['ci_high']:.1%}, n={result['n']}; {fam})")

    try:
        ctx = run_demo(settings, fresh=fresh, on_stage=show)
    except ModelNotFound as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    table = Table(title="held-out exact-match accuracy")
    for col in ("stage", "accuracy", "95% CI", "n"):
        table.add_column(col)
    for key, label in accuracy_stages(ctx.results):
        r = ctx.results[key]
        table.add_row(label, f"{r['accuracy']:.1%}", f"{r['ci_low']:.1%}–{r['ci_high']:.1%}", str(r["n"]))
    console.print(table)
    judged = (ctx.results.get("judge_eval") or {}).get("models") or []
    if judged:
        wins = Table(title="win rate vs the SFT model (95% CI; tie = ½)")
        for col in ("model", "gold (exact checker)", "LLM judge", "KL to SFT (nats)"):
            wins.add_column(col)
        for m in judged:
            wins.add_row(m["name"], interval(m.get("gold_win_rate")), interval(m.get("win_rate")),
                         f"{m['kl']['mean']:.3f}" if m.get("kl") else "–")
        console.print(wins)
    timings = ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in ctx.results.items()
                        if isinstance(v, dict) and "wall_s" in v)
    console.print(f"wall time per stage: {timings}")
    console.print(f"total {time.perf_counter() - t0:.0f} s · report: [bold]{ctx.results['report']['path']}[/]")


def register(app: typer.Typer) -> None:
    app.command("demo", short_help="Run the whole demo pipeline on the embedded model and write a report.")(demo)
