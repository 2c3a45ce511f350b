"""`rlhf push RUN --to TARGET`: a trained model with its model card, to a folder or the Hugging Face Hub."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.config import ConfigError
from rlhfkit.eval.model_card import card_facts, export, is_hub_target, locate, push_to_hub, render_card
from rlhfkit.loop.registry import REGISTRY_FILE, Registry


def _round_model(loop_dir: Path, round: int) -> Path:
    """The model folder a loop round trained (its run folder's final/)."""
    with Registry(loop_dir) as reg:
        rounds = [r["round"] for r in reg.rounds()]
        if round not in rounds:
            raise ConfigError(f"{loop_dir} has no round {round}; registered rounds: "
                              f"{', '.join(map(str, rounds)) or 'none'} (see `rlhf loop history {loop_dir}`)")
        model = reg.model_of(round)
    if not isinstance(model, Path):
        raise ConfigError(f"round {round} of {loop_dir} trained no model of its own: its model is {model}")
    return model


def push(source: Path = typer.Argument(..., help="a run folder (runs/sft), its model (runs/sft/final), or a loop "
                                                 "folder with --round", show_default=False),
         to: str = typer.Option(..., "--to", help="a local folder to write, or a Hugging Face repo id owner/name "
                                                  "(./owner/name for a folder)", show_default=False),
         round: int | None = typer.Option(None, "--round", help="with a loop folder (runs/loop): the round to push",
                                          show_default=False),
         overwrite: bool = typer.Option(False, "--overwrite", help="replace a local folder that is not empty"),
         private: bool = typer.Option(False, "--private", help="create the Hub repo private"),
         message: str | None = typer.Option(None, "--message", "-m", help="the Hub commit message",
                                            show_default=False)) -> None:
    """Write a model card (README.md: recipe, base model, data hashes, settings, final metrics, how to load)
    and copy the model (a LoRA run's adapter in adapter/, the run's records in training/) to TARGET.

    [bold]Examples[/]

      rlhf push runs/dpo --to ./exports/dpo-model

      rlhf push runs/sft --to my-name/my-sft-model --private

      rlhf push runs/loop --round 2 --to ./exports/loop-r2
    """
    is_loop = (source / REGISTRY_FILE).is_file()
    if is_loop and round is None:
        raise ConfigError(f"{source} is a loop folder: choose the round to push with --round N "
                          f"(see `rlhf loop history {source}`)")
    if round is not None and not is_loop:
        raise ConfigError(f"--round is for a loop folder, and {source} is not one (no {REGISTRY_FILE})")
    files = locate(_round_model(source, round) if is_loop else source)
    hub = is_hub_target(to)
    card = render_card(card_facts(files), where=to)
    console = Console(soft_wrap=True)
    if hub:
        url = push_to_hub(files, card, to, private=private, message=message)
        console.print(f"[green]pushed[/] {escape(str(files.run_dir or files.model))} → {escape(url)}")
    else:
        dest = export(files, card, Path(to), overwrite=overwrite)
        console.print(f"[green]wrote[/] {escape(str(dest))} (model card: {escape(str(dest / 'README.md'))})")


def register(app: typer.Typer) -> None:
    app.command("push", short_help="Push a trained model with its model card to a folder or the Hugging Face Hub.")(
        push)
