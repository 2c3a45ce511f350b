"""`rlhf loop ...`: rounds of sample → feedback → train → evaluate, versioned in a registry."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhfkit.cli.config import config_command
from rlhfkit.cli.errors import USER_ERRORS, fail
from rlhfkit.cli.flags import old_flags
from rlhfkit.cli.help_format import App
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.feedback import labeling_progress
from rlhfkit.loop.registry import REGISTRY_FILE, WAITING, Registry
from rlhfkit.loop.runner import STEPS, WaitingForLabels, load_config, run_loop

console = Console()
WAITING_EXIT = 3

loop_app = App(help="The feedback loop: rounds of sample → feedback → train → evaluate, each versioned.",
                       no_args_is_help=True, rich_markup_mode="rich")


def _describe(info: dict) -> str:
    keep = ("prompts", "samples", "pairs", "labels", "decided", "accuracy", "model")
    parts = []
    for k in keep:
        v = info.get(k)
        if v is not None:
            parts.append(f"{k} {v:.1%}" if k == "accuracy" else f"{k} {v}")
    for key, label in (("vs_previous", "vs previous"), ("vs_round0", "vs round 0"),
                       ("judge_vs_round0", "judged vs round 0")):
        b = info.get(key)
        if b:
            parts.append(f"{label} +{b['wins']}/−{b['losses']} p={b['p']:.3g}")
    return ", ".join(parts)


def on_event(round: int, step: str, info: dict) -> None:
    if info.get("state") == "start":
        console.print(f"[dim]round {round} · {step} …[/]")
    else:
        console.print(f"round {round} · [bold]{step}[/] done in {info['wall_s']:.0f} s: {escape(_describe(info))}")


def run_and_report(cfg: LoopConfig) -> None:
    try:
        run = run_loop(cfg, on_event=on_event)
    except WaitingForLabels as e:
        console.print(f"[yellow]{escape(str(e))}[/]")
        raise typer.Exit(WAITING_EXIT) from None
    except USER_ERRORS as e:
        fail(str(e))
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; run `rlhf loop resume {cfg.output_dir}` to continue where it stopped[/]")
        raise typer.Exit(130) from None
    print_history(run.root)
    console.print(f"report: [bold]{run.root / 'report.html'}[/]")


def resume(run_dir: Path = typer.Argument(..., help="the loop's run folder"),
           rounds: int | None = typer.Option(None, help="run up to this many rounds (more than configured)")) -> None:
    """Continue a loop where it stopped: after a kill, or once a human round's votes are in.

    Exit code 3: a human round is still waiting for votes.
    """
    try:
        cfg = load_config(run_dir)
    except USER_ERRORS as e:
        fail(str(e))
    run_and_report(cfg.replace(rounds=rounds) if rounds else cfg)


def _open_registry(run_dir: Path) -> Registry:
    if not (run_dir / REGISTRY_FILE).exists():
        fail(f"{run_dir} is not a loop folder (no {REGISTRY_FILE})")
    return Registry(run_dir)


def status(run_dir: Path = typer.Argument(..., help="the loop's run folder")) -> None:
    """Where the loop stands: rounds registered, the next step, votes in a waiting human round."""
    cfg = load_config(run_dir) if (run_dir / "config.yaml").exists() else None
    with _open_registry(run_dir) as reg:
        rounds = reg.rounds()
        console.print(f"{run_dir}: {len(rounds) - 1 if rounds else 0} of {cfg.rounds if cfg else '?'} rounds "
                      f"registered (round 0 = the starting policy)")
        done = {(s.round, s.step): s for s in reg.steps()}
        target = cfg.rounds if cfg else max((r for r, _ in done), default=0)
        pending = next(((r, s) for r in range(target + 1) for s in (STEPS if r else ("evaluate", "register"))
                        if (r, s) not in done or done[(r, s)].status != "done"), None)
        if pending is None:
            console.print("every configured round is done; `rlhf loop resume DIR --rounds N` adds rounds")
            return
        r, s = pending
        row = done.get((r, s))
        waiting = row is not None and row.status == WAITING and cfg is not None
        st = labeling_progress(cfg, run_dir.resolve(), r) if waiting else None
        if st is not None:
            console.print(f"round {r} is waiting for labels: {st.votes} of {st.needed} votes in project "
                          f"'{escape(st.project)}' ({escape(st.db)}); `rlhf loop resume {run_dir}` continues "
                          "once they are all in")
        else:
            console.print(f"next: round {r} · {s}")


def _pair(block: dict | None) -> str:
    return f"+{block['wins']}/−{block['losses']} p={block['p']:.2g}" if block else "–"


def print_history(run_dir: Path) -> None:
    """One row of numbers per round, then each round's lineage (model, hash, parent)."""
    with _open_registry(run_dir) as reg:
        rounds = reg.rounds()
    judged = any("judge_vs_round0" in r["metrics"]["eval"] for r in rounds)
    table = Table(title=f"rounds of {run_dir}")
    for col in ("round", "labels (decided)", "accuracy [95% CI]", "vs previous", "vs round 0",
                *(["judge vs round 0 (open prompts)"] if judged else []), "KL k3/token"):
        table.add_column(col)
    for r in rounds:
        ev, fb = r["metrics"]["eval"], r["metrics"].get("feedback") or {}
        kl, jr = ev.get("kl_to_round0"), ev.get("judge_vs_round0")
        judge_cell = ([f"{jr['win_rate']:.1%} [{jr['win_rate_ci'][0]:.1%}, {jr['win_rate_ci'][1]:.1%}] "
                       f"{_pair(jr)}" if jr else "–"] if judged else [])
        table.add_row(str(r["round"]), f"{fb['labels']} ({fb['decided']})" if fb else "–",
                      "–" if ev["accuracy"] is None else
                      f"{ev['accuracy']:.1%} [{ev['ci_low']:.1%}, {ev['ci_high']:.1%}]",
                      _pair(ev.get("vs_previous")), _pair(ev.get("vs_round0")), *judge_cell,
                      f"{kl['per_token_k3']:.4f}" if kl else "–")
    console.print(table)
    for r in rounds:
        console.print(f"round {r['round']}: {escape(r['model'])} (sha256 {r['model_sha256'][:12]}) "
                      f"← {escape(r['parent_model'] or 'start')}")


def history(run_dir: Path = typer.Argument(..., help="the loop's run folder")) -> None:
    """Every registered round: model, parent, labels, accuracy, paired tests, KL, hashes."""
    print_history(run_dir)


@old_flags(output_dir="--to")
def export(run_dir: Path = typer.Argument(..., help="the loop's run folder"),
           round: int = typer.Option(..., "--round", help="round to export"),
           output_dir: Path = typer.Option(..., help="folder to write (must not exist)"),
           model: bool = typer.Option(True, help="also copy the round's model")) -> None:
    """Copy one round's data (prompts, samples, comparisons, labels, eval, lineage) and model to a folder,
    e.g. to train something else on its labels."""
    if output_dir.exists():
        fail(f"{output_dir} exists; choose a new folder")
    with _open_registry(run_dir) as reg:
        arts = reg.artifacts(round)
        if not arts:
            fail(f"round {round} has no registered data in {run_dir}")
        tmp = output_dir.with_name(output_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for a in arts:
            src = reg.absolute(a["path"])
            if src.is_dir():
                if model:
                    shutil.copytree(src, tmp / "model")
            else:
                shutil.copy2(src, tmp / src.name)
        tmp.rename(output_dir)   # the folder appears whole or not at all
    console.print(f"round {round} → {output_dir} ({', '.join(sorted(p.name for p in output_dir.iterdir()))})")


config_command(loop_app, "run", LoopConfig, run_and_report,
               help="Start (or continue) a loop described by a YAML file and/or flags.",
               examples="[bold]Examples[/]\n\n  rlhf loop run --policy runs/demo/sft/final --rounds 3\n\n"
                        "  rlhf loop run --config loop.yaml --feedback human --overlap 2\n\n"
                        "Exit code 3: a human round is waiting for votes (see `rlhf loop status`).")
loop_app.command("resume")(resume)
loop_app.command("status")(status)
loop_app.command("history")(history)
loop_app.command("export")(export)


def register(app: typer.Typer) -> None:
    app.add_typer(loop_app, name="loop", help="The feedback loop: rounds of sample → feedback → train → evaluate.")
