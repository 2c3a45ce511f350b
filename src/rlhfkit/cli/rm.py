"""`rlhf rm train | eval | score`: reward models."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from rlhfkit.cli.config import config_command
from rlhfkit.cli.errors import friendly
from rlhfkit.cli.help_format import App
from rlhfkit.cli.train import format_metrics
from rlhfkit.eval.reward import evaluate_file, score_file
from rlhfkit.io import atomic_write_text
from rlhfkit.recipes.reward import RewardConfig, run_reward

console = Console()
rm_app = App(no_args_is_help=True, rich_markup_mode="rich",
                     help="Reward models: train on preference pairs, evaluate on held-out pairs, score responses.")


def _train(cfg):
    result = run_reward(cfg)
    held_out = result["eval"]
    tail = (f", held-out accuracy {held_out['accuracy']:.3f} on {held_out['num_non_tie']} pairs, "
            f"ECE {held_out['ece']:.3f}" if held_out else "")
    console.print(f"[green]reward model done[/] → {result['final']}  ({format_metrics(result['metrics'])}{tail})")


@rm_app.command("eval", short_help="Held-out accuracy, calibration and reward histogram of a reward model.")
def rm_eval(
    model: str = typer.Option(..., help="a trained reward model folder (e.g. runs/rm/final)"),
    data: str = typer.Option(..., help="preference pairs or rankings (.jsonl/.parquet, folder or hub id)"),
    out: Path | None = typer.Option(None, help="also write the full report (histogram, reliability) as JSON"),
    batch_size: int = typer.Option(16, help="pairs per forward pass"),
    ensemble_mode: str = typer.Option("mean", help="combine ensemble heads: mean, min or mean_minus_std"),
):
    """Accuracy on non-tie pairs, ties apart, expected calibration error of σ(Δ).

    [bold]Examples[/]

      rlhf rm eval --model runs/rm/final --data test.jsonl

      rlhf rm eval --model runs/rm/final --data test.jsonl --out rm_eval.json --ensemble-mode min
    """
    friendly(_eval)(model, data, out, batch_size, ensemble_mode)


def _eval(model, data, out, batch_size, ensemble_mode):
    report = evaluate_file(model, data, ensemble_mode=ensemble_mode, batch_size=batch_size)
    console.print(f"pairs {report['num_pairs']} (ties {report['num_ties']}): accuracy {report['accuracy']:.4f}, "
                  f"ECE {report['ece']:.4f}, loss {report['loss']:.4f}, "
                  f"tie mean |Δ| {report['tie_mean_abs_delta']:.4f}")
    if out:
        atomic_write_text(out, json.dumps(report, indent=2))
        console.print(f"wrote {out}")


@rm_app.command("score", short_help="Score {prompt, response} records with a reward model.")
def rm_score(
    model: str = typer.Option(..., help="a trained reward model folder (e.g. runs/rm/final)"),
    data: str = typer.Option(..., help="JSONL with 'prompt' and 'response' (or 'completion', or 'messages')"),
    out: Path = typer.Option(..., help="write the records with a 'reward' field added here"),
    batch_size: int = typer.Option(16, help="responses per forward pass"),
    ensemble_mode: str = typer.Option("mean", help="combine ensemble heads: mean, min or mean_minus_std"),
):
    """Add a `reward` to every record (and `rewards`, one per head, for an ensemble).

    [bold]Examples[/]

      rlhf rm score --model runs/rm/final --data responses.jsonl --out scored.jsonl

      rlhf generate --prompts test.jsonl --out responses.jsonl && rlhf rm score --model runs/rm/final --data responses.jsonl --out scored.jsonl
    """  # noqa: E501 — the examples are shown as written, one command a line
    friendly(_score)(model, data, out, batch_size, ensemble_mode)


def _score(model, data, out, batch_size, ensemble_mode):
    count = score_file(model, data, str(out), ensemble_mode=ensemble_mode, batch_size=batch_size)
    console.print(f"scored {count} responses → {out}")


config_command(rm_app, "train", RewardConfig, friendly(_train),
               help="Train a reward model (Bradley–Terry, ties as soft labels) on preference pairs.",
               examples="[bold]Examples[/]\n\n"
                        "  rlhf rm train --train-data prefs.jsonl --max-steps 300\n\n"
                        "  rlhf rm train --train-data prefs.jsonl --eval-data test.jsonl --n-heads 4 "
                        "--ensemble-mode min\n\n"
                        "  rlhf rm train --model runs/sft/final --train-data prefs.jsonl --use-margin "
                        "--label-noise 0.05 --center-coef 0.01")


def register(app: typer.Typer) -> None:
    app.add_typer(rm_app, name="rm", help="Reward models: train, evaluate, score.")
