"""`rlhf report RUN...`: one self-contained HTML page comparing every model of one or more runs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.cli.errors import friendly
from rlhfkit.eval.report import REPORT_FILE, write_report
from rlhfkit.loop.registry import REGISTRY_FILE
from rlhfkit.loop.runner import write_loop_report


def report_command(
    runs: list[Path] = typer.Argument(..., help="run folders: a training run, a demo folder, an eval output"),
    out: Path | None = typer.Option(None, help="where to write the page (default: RUN/report.html for "
                                               "one run, ./report.html for several)"),
    title: str | None = typer.Option(None, help="page title"),
):
    """One self-contained HTML page: training curves, over-optimization, win rates with
    intervals, gold accuracy, diversity, samples side by side. Opens offline.

    [bold]Examples[/]

      rlhf report runs/demo/loop        (a loop folder: accuracy, tests and KL per round)

      rlhf report runs/sft runs/ppo runs/eval --out comparison.html
    """
    target = out or (runs[0] / REPORT_FILE if len(runs) == 1 else Path(REPORT_FILE))
    if len(runs) == 1 and (runs[0] / REGISTRY_FILE).exists():   # a loop folder: its rounds side by side
        path = friendly(write_loop_report)(runs[0], target, title=title)
    else:
        path = friendly(write_report)(runs, target, title=title)
    Console().print(f"[green]report[/] → {escape(str(path))}")


def register(app: typer.Typer) -> None:
    app.command("report",
                short_help="One self-contained HTML page comparing the models of one or more runs.")(report_command)
