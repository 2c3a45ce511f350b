"""Metrics: one JSONL line per logged step, a rich progress bar, optional TensorBoard / W&B."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rlhfkit.data.readers import iter_records

log = logging.getLogger(__name__)
console = Console(stderr=True)

TRACKERS = ("none", "tensorboard", "wandb")


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLogger:
    """Appends `{"step": n, ...}` lines to metrics.jsonl and mirrors them to a tracker.

    On resume the file is cut back to the resumed step, so a curve never has two points
    for one step.
    """

    def __init__(self, run_dir: Path, *, tracker: str = "none", enabled: bool = True,
                 resume_step: int | None = None, run_name: str | None = None, config: dict | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tracker == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 — optional tracker
            except ImportError:
                raise RuntimeError("tracker=tensorboard needs: pip install tensorboard") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        elif tracker == "wandb":
            try:
                import wandb  # noqa: PLC0415 — optional tracker
            except ImportError:
                raise RuntimeError("tracker=wandb needs: pip install wandb") from None
            self._wandb = wandb.init(project="rlhfkit", name=run_name, config=config, dir=str(run_dir),
                                     resume="allow")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `run_dir/metrics.jsonl` ([] when there is none); a line that is not a JSON
    object raises DataError naming the file and the line."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.exists():
        return []
    return [row for row, _ in iter_records(p)]


class StepProgress:
    """A rich progress bar over optimizer steps showing loss, tokens/s and ETA."""

    def __init__(self, total: int, description: str, *, start: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.total = total
        self._t0 = time.perf_counter()
        self._tokens = 0
        if not enabled:
            return
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.task = self.progress.add_task(description, total=total, completed=start, stats="")
        self.progress.start()

    def update(self, step: int, *, tokens: int = 0, **stats: float) -> float:
        """Advance to `step`; returns tokens/s since the start."""
        self._tokens += tokens
        rate = self._tokens / max(time.perf_counter() - self._t0, 1e-9)
        if self.enabled:
            parts = [f"{k} {v:.4g}" for k, v in stats.items()]
            if tokens:
                parts.append(f"{rate:,.0f} tok/s")
            self.progress.update(self.task, completed=step, stats="  ".join(parts))
        return rate

    def close(self) -> None:
        if self.enabled:
            self.progress.stop()
