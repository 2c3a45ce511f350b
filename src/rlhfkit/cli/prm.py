"""`rlhf prm data | train`: process reward models on step-labelled solutions."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from rlhfkit.cli.config import config_command
from rlhfkit.cli.errors import friendly
from rlhfkit.cli.help_format import App
from rlhfkit.cli.train import format_metrics
from rlhfkit.config import ConfigError
from rlhfkit.recipes.process_reward import ProcessRewardConfig, run_process_reward
from rlhfkit.tasks.step_labels import STEP_FAMILIES, make_step_records, write_step_records

console = Console()
prm_app = App(no_args_is_help=True, rich_markup_mode="rich",
              help="Process reward models: step-labelled data from the demo tasks, training with per-step labels.")


@prm_app.command("data", short_help="Write step-labelled solutions of the demo tasks (references + corrupted).")
def prm_data(
    out: Path = typer.Option(..., help="JSONL to write: one {prompt, steps, labels, task_id, kind} per solution"),
    split: str = typer.Option("train", help="demo split: train or test (the tasks' fixed split)"),
    per_family: int = typer.Option(200, help="demo tasks per family"),
    corruptions: int = typer.Option(2, help="corrupted copies per reference solution (one number of one step changed)"),
    families: str = typer.Option(",".join(STEP_FAMILIES), help="comma-separated families with exact step labels"),
    seed: int = typer.Option(0, help="task and corruption seed"),
):
    """Each step is labelled exactly: 1 iff it and every step before it are right (equations
    hold, numbers and conversion rules are the task's own, the answer line passes the checker).

    [bold]Examples[/]

      rlhf prm data --out prm_train.jsonl

      rlhf prm data --out prm_test.jsonl --split test --per-family 100
    """
    friendly(_data)(out, split, per_family, corruptions, families, seed)


def _data(out, split, per_family, corruptions, families, seed):
    if split not in ("train", "test"):
        raise ConfigError(f"--split must be train or test, got '{split}'")
    names = tuple(f.strip() for f in families.split(",") if f.strip())
    try:
        records = make_step_records(split, per_family, corruptions=corruptions, seed=seed, families=names)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    count = write_step_records(records, out)
    steps = sum(len(r.labels) for r in records)
    positive = sum(sum(r.labels) for r in records)
    console.print(f"wrote {count} solutions ({steps} steps, {positive / max(steps, 1):.1%} labelled right) → {out}")


def _train(cfg):
    result = run_process_reward(cfg)
    held_out = result["eval"]
    tail = (f", held-out step accuracy {held_out['step_accuracy']:.3f} "
            f"(majority {held_out['step_majority_baseline']:.3f}) on {held_out['num_steps']:.0f} steps"
            if held_out else "")
    console.print(f"[green]process reward model done[/] → {result['final']}  "
                  f"({format_metrics(result['metrics'])}{tail})")


config_command(prm_app, "train", ProcessRewardConfig, friendly(_train),
               help="Train a process reward model: per-step binary cross-entropy at each step's last token.",
               examples="[bold]Examples[/]\n\n"
                        "  rlhf prm train --tasks demo --max-steps 300\n\n"
                        "  rlhf prm train --train-data prm_train.jsonl --eval-data prm_test.jsonl --lora-r 16")


def register(app: typer.Typer) -> None:
    app.add_typer(prm_app, name="prm", help="Process reward models: step-labelled data, training.")
