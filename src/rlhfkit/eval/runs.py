"""Reading run folders: what a report shows, from the files runs leave behind.

Under each RUN folder and its immediate sub-folders (a pipeline's `sft/`, `rm/`, `dpo/`, ...):
  * `metrics.jsonl` (one per training run, `train.metrics`) → a `TrainingRun`;
  * `eval.json` (written by `eval.evaluate`) → an evaluation.
Under RUN itself:
  * `stages/*.json`: the results of a pipeline's finished stages (the demo writes one per
    stage), in the order they were written. A stage result is a JSON object; what a report
    reads from it: `label` (the model or reward model the stage measured, its name when
    absent), an exact-match block (`accuracy`, `ci_low`, `ci_high`, `n`, `per_family`,
    `mean_response_words`, `samples`), a reward-model block (`eval_accuracy`, `eval_ece`,
    `eval_pairs`, `train_pairs`, `histogram`) and `wall_s`. A stage result shaped like an
    `eval.json` is read as an evaluation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.train.metrics import read_metrics

STAGES_DIR = "stages"
# Sub-runs in the order the loop produces them; others follow alphabetically.
RUN_ORDER = ("sft", "rm", "dpo", "cdpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto", "ppo", "grpo",
             "rloo", "remax", "reinforce", "best_of_n", "expert_iter")
# Logged every step but not worth a panel: bookkeeping, not learning.
NOT_PLOTTED = {"step", "units", "tokens_per_s", "epoch", "samples_per_s", "time", "wall_s"}


@dataclass
class TrainingRun:
    label: str
    path: Path
    rows: list[dict[str, Any]]

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """(steps, values) of `key`, skipping rows without it and non-finite values."""
        steps, values = [], []
        for row in self.rows:
            v = row.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            steps.append(float(row.get("step", len(steps))))
            values.append(float(v))
        return steps, values

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            for k, v in row.items():
                if k not in NOT_PLOTTED and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen.setdefault(k, None)
        return [k for k in seen if self.series(k)[1]]


@dataclass
class ReportData:
    runs: list[Path]
    training: list[TrainingRun] = field(default_factory=list)
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name → its result


def accuracy_stages(stages: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage name, label) of every stage result that measured exact-match accuracy, in order."""
    return [(k, r.get("label", k)) for k, r in stages.items() if isinstance(r, dict) and "per_family" in r]


def reward_model_stages(stages: dict[str, Any]) -> list[tuple[str, str]]:
    """(stage name, label) of every stage result that measured a reward model on held-out pairs."""
    return [(k, r.get("label", k)) for k, r in stages.items()
            if isinstance(r, dict) and ("eval_accuracy" in r or "eval_ece" in r)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON: {e.msg}", path=str(path), line=e.lineno) from None


def _is_eval(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("models"), list) and "prompts" in data


def _run_sort_key(p: Path) -> tuple[int, str]:
    return (RUN_ORDER.index(p.name) if p.name in RUN_ORDER else len(RUN_ORDER), p.name)


def collect(run_dirs: Sequence[str | Path]) -> ReportData:
    """Everything a report shows, from RUN folders (see the module docstring)."""
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise DataError("give at least one run folder")
    data = ReportData(runs)
    many = len(runs) > 1
    for run in runs:
        if not run.is_dir():
            raise DataError("no such run folder", path=str(run))
        prefix = f"{run.name}/" if many else ""
        folders = [run] + sorted((p for p in run.iterdir() if p.is_dir() and p.name != STAGES_DIR),
                                 key=_run_sort_key)
        for folder in folders:
            label = run.name if folder == run else prefix + folder.name
            rows = read_metrics(folder)
            if rows:
                data.training.append(TrainingRun(label, folder, rows))
            evaluation = folder / "eval.json"
            if evaluation.is_file():
                content = _read_json(evaluation)
                if not _is_eval(content):
                    raise DataError("not an eval.json written by `rlhf eval` (no 'models' list)",
                                    path=str(evaluation))
                data.evals.append((label, content))
        stage_dir = run / STAGES_DIR
        if stage_dir.is_dir():
            # Stage files are written in pipeline order: keep it.
            for marker in sorted(stage_dir.glob("*.json"), key=lambda p: (p.stat().st_mtime, p.name)):
                content = _read_json(marker)
                if _is_eval(content):
                    data.evals.append((prefix + marker.stem, content))
                elif isinstance(content, dict):
                    if "label" in content:
                        content["label"] = prefix + content["label"]
                    data.stages[prefix + marker.stem] = content
    if not (data.training or data.evals or data.stages):
        raise DataError("nothing to report: no metrics.jsonl, eval.json or stages/*.json in "
                        + ", ".join(str(r) for r in runs))
    return data
