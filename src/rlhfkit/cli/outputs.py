"""The lines every training command ends with: what the run wrote, and the commands that come next.

    model: runs/sft/final
    next:  rlhf dpo --model runs/sft/final --train-data PAIRS
           rlhf eval --model runs/sft/final --reference tiny
           rlhf push runs/sft --to DIR

They are read from the run folder, not from what the recipe returned, so rerunning a finished
run (which trains nothing) ends with the same lines. Upper-case words are for the user to fill in.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from rlhfkit.train.identity import FINAL, FINAL_ADAPTER

Suggest = Callable[[str, Any], list[str]]  # (the final model, quoted; the run's config) → commands


def _evaluate(final: str, cfg: Any) -> list[str]:
    return [f"rlhf eval --model {final} --reference {shlex.quote(cfg.model)}"]


def _after_sft(final: str, cfg: Any) -> list[str]:
    return [f"rlhf dpo --model {final} --train-data PAIRS", *_evaluate(final, cfg)]


def _after_rm(final: str, cfg: Any) -> list[str]:
    policy = shlex.quote(cfg.model) if Path(cfg.model).is_dir() else "POLICY"
    return [f"rlhf rm eval --model {final} --data HELD_OUT_PAIRS",
            f"rlhf ppo --model {policy} --prompts PROMPTS --reward rm:{final}"]


def _after_prm(final: str, cfg: Any) -> list[str]:
    return [f"rlhf grpo --model POLICY --tasks demo --reward prm:{final}",
            f"rlhf ppo --model POLICY --tasks demo --reward gold,prm:{final}:0.5"]


# recipe kind → the commands that follow it (each run with a final model also gets `rlhf push`).
FOLLOW_UPS: dict[str, Suggest] = {
    "sft": _after_sft,
    "rm": _after_rm,
    "prm": _after_prm,
    **{kind: _evaluate for kind in ("dpo", "online_dpo", "ppo", "grpo", "rloo", "remax", "reinforce",
                                    "expert-iter")},
}


def run_outputs(cfg: Any) -> list[str]:
    """The closing lines for a run of `cfg`: its outputs, then `next:` commands; [] for a
    command that wrote no model (evaluation, the loop, a run that stopped early)."""
    if cfg.kind == "best-of-n":
        out = Path(str(cfg.out))
        if not out.is_file():
            return []
        return [f"data: {out}", f"next: rlhf sft --model {shlex.quote(cfg.model)} --train-data {shlex.quote(str(out))}"]
    suggest = FOLLOW_UPS.get(cfg.kind)
    run = Path(str(getattr(cfg, "output_dir", "") or ""))
    final = run / FINAL
    if suggest is None or not run.name or not final.is_dir():
        return []
    adapter = run / FINAL_ADAPTER
    what = {"rm": "reward model", "prm": "process reward model"}.get(cfg.kind, "model")
    lines = [f"{what}: {final}" + (f" (adapter: {adapter})" if adapter.is_dir() else "")]
    commands = [*suggest(shlex.quote(str(final)), cfg), f"rlhf push {shlex.quote(str(run))} --to DIR"]
    lines.append(f"next:  {commands[0]}")
    lines += [f"       {c}" for c in commands[1:]]
    return lines


def print_run_outputs(cfg: Any) -> None:
    """Print `run_outputs(cfg)` (once: on the main process of a distributed run)."""
    if os.environ.get("RANK", "0") != "0":
        return
    console = Console(soft_wrap=True, highlight=False)
    for line in run_outputs(cfg):
        console.print(escape(line))
