"""`rlhf demo`: run the demo pipeline and print what it measured."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from rlhfkit.cli.flags import old_flags
from rlhfkit.cli.loop import on_event
from rlhfkit.demo.pipeline import DemoSettings, run_demo
from rlhfkit.models.loading import ModelNotFound

console = Console()


@old_flags(output_dir="--out")
def demo(
    output_dir: Path = typer.Option(Path("runs/demo"), help="folder for data, checkpoints, metrics and the report"),
    quick: bool = typer.Option(True, "--quick/--full",
                               help="quick (≈ 7 min on 2 CPU cores with native bf16, ≈ 27 in fp32 without: "
                                    "SFT + 2 rounds of the loop) or full (≈ 1 h with native bf16: "
                                    "the base model's accuracy, 4 rounds from a larger pool of prompts, each "
                                    "retraining SFT on all labels so far, on 800 held-out prompts)"),
    compare: bool = typer.Option(False, "--compare",
                                 help="after the loop, compare the algorithms on a fixed dataset (reward model, "
                                      "DPO/IPO/KTO, GRPO/RLOO/ReMax/PPO, over-optimization, judge win rates: about "
                                      "an hour more on 2 CPU cores) and write comparison.html"),
    model: str = typer.Option("embedded", help="starting model: 'embedded', a Hugging Face id or a folder"),
    fresh: bool = typer.Option(False, help="redo every stage even if its results exist"),
    seed: int = typer.Option(0, help="seed for data, training and sampling"),
):
    """Run SFT and the feedback loop on the embedded model and write an HTML report.

    Stages: demo tasks → SFT → the loop from the SFT model: each round samples from the newest
    policy, labels pairs with the exact checkers acting as an annotator with mis-clicks, trains
    (DPO + NLL) and measures held-out accuracy on 400 prompts, paired against the SFT model
    (sign test) → report.html. --full adds the base model's accuracy and runs 4 larger rounds
    (each retraining SFT on all labels so far) on 800 prompts; --compare adds the algorithm
    comparison (reward model, DPO/IPO/KTO, GRPO/RLOO/ReMax/PPO, over-optimization, judge win
    rates: comparison.html). Rerunning skips
    finished stages and rounds; a killed run resumes.

    [bold]Examples[/]

      rlhf demo

      rlhf demo --full --output-dir runs/demo-full

      rlhf demo --full --compare --output-dir runs/demo-full
    """
    if quick:
        settings = (DemoSettings.compare if compare else DemoSettings.quick)(output_dir, model=model, seed=seed)
    else:
        settings = DemoSettings.full(output_dir, compare=compare, model=model, seed=seed)
    t0 = time.perf_counter()

    def show(name, desc, result):
        if "per_family" in result:
            fam = ", ".join(f"{k} {v:.0%}" for k, v in result["per_family"].items())
            console.print(f"[bold]{desc}[/]: [cyan]{result['accuracy']:.1%}[/] "
                          f"(95% CI {result['ci_low']:.1%}–{result['ci_high']:.1%}, n={result['n']}; {fam})")

    try:
        ctx = run_demo(settings, fresh=fresh, on_stage=show, on_loop_event=on_event)
    except ModelNotFound as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    table = Table(title="held-out exact match, the same prompts every round (paired against round 0 = SFT)")
    for col in ("round", "accuracy [95% CI]", "vs SFT: + / − prompts", "sign test p", "KL to SFT (k3/token)"):
        table.add_column(col)
    for r in ctx.results["loop"]["rounds"]:
        vs, kl = r.get("vs_round0"), r.get("kl_to_round0")
        table.add_row("0 (SFT)" if r["round"] == 0 else str(r["round"]),
                      f"{r['accuracy']:.1%} [{r['ci_low']:.1%}, {r['ci_high']:.1%}] n={r['n']}",
                      f"+{vs['wins']} / −{vs['losses']}" if vs else "–", f"{vs['p']:.3g}" if vs else "–",
                      f"{kl['per_token_k3']:.4f}" if kl else "–")
    console.print(table)
    timings = ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in ctx.results.items()
                        if isinstance(v, dict) and "wall_s" in v)
    console.print(f"wall time per stage: {timings}")
    compared = ctx.results.get("comparison")
    extra = f" · algorithms compared: [bold]{compared['path']}[/]" if compared else ""
    console.print(f"total {time.perf_counter() - t0:.0f} s · report: [bold]{ctx.results['report']['path']}[/]{extra}")


def register(app: typer.Typer) -> None:
    app.command("demo", short_help="Run SFT and the feedback loop on the embedded model and write a report.")(demo)
