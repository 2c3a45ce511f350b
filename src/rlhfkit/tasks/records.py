"""Tasks as JSONL records: the SFT layout (`prompt`, `completion`) plus `task_id`, `family`, `answer`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import iter_records
from rlhfkit.tasks.generate import FAMILIES, Task


def to_sft_record(task: Task) -> dict:
    return {"prompt": task.prompt, "completion": task.reference, "task_id": task.id,
            "family": task.family, "answer": task.answer}


def write_jsonl(tasks: Iterable[Task], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(to_sft_record(task), ensure_ascii=False) + "\n")


def _task_from_record(record: dict, path: str | None, line: int) -> Task:
    def bad(field: str, message: str) -> DataError:
        return DataError(message, path=path, line=line, field=field)
    if not isinstance(record, dict):
        raise bad("", f"expected an object, got {type(record).__name__}")
    for field in ("prompt", "completion", "task_id", "family"):
        if not isinstance(record.get(field), str):
            raise bad(field, "missing or not a string")
    family, answer = record["family"], record.get("answer")
    if family not in FAMILIES:
        raise bad("family", f"unknown family {family!r}; choose from {FAMILIES}")
    if (family == "open") != (answer is None) or not (answer is None or isinstance(answer, str)):
        raise bad("answer", "must be null for 'open' tasks and a string for every other family")
    return Task(record["task_id"], family, record["prompt"], answer, record["completion"])


def load_task_records(records: Iterable[dict], path: str | None = None) -> list[Task]:
    """Tasks back from `to_sft_record` dicts; errors name `path`, the 1-based record and the field."""
    return [_task_from_record(record, path, line) for line, record in enumerate(records, start=1)]


def read_jsonl(path: str | Path) -> list[Task]:
    """Tasks saved by `write_jsonl`; a bad line raises DataError naming the file and line."""
    return [_task_from_record(record, where.path, where.line) for record, where in iter_records(path)]
