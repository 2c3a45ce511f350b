"""The prompts an online run samples from: a JSONL/JSON/Parquet file or the demo tasks.

Each prompt carries what a verifier needs to score a response to it (`answer`, `tests`, the
demo `task`) in `meta`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.readers import iter_records
from rlhfkit.data.schemas import ROLES, Conversation, as_conversation
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.tasks.generate import make_tasks

log = logging.getLogger(__name__)

DEMO_FAMILIES = ("arithmetic", "units", "strings", "format")


@dataclass(frozen=True)
class RLPrompt:
    """A prompt to sample from, with what a verifier needs (`answer`, `tests`, demo `task`)."""

    prompt: Conversation
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str | None:
        return self.meta.get("task_id")


def read_prompts(path: str | Path) -> list[RLPrompt]:
    """Prompts from a JSONL/JSON/Parquet file: `prompt` (text or messages), optional `answer`
    (text or number), `task_id`, `tests` (code strings); other fields are kept in meta.
    A bad record raises DataError naming the file, line and field."""
    out = []
    for rec, where in iter_records(path):
        if "prompt" not in rec:
            raise where.error("prompt", "missing (each line needs a 'prompt')")
        raw = rec["prompt"]
        if isinstance(raw, str):
            if not raw.strip():
                raise where.error("prompt", "empty text")
        elif isinstance(raw, list) and raw:
            for i, m in enumerate(raw):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise where.error(f"prompt[{i}]", "expected a message {role, content} with role in "
                                                      f"{', '.join(ROLES)}")
        else:
            raise where.error("prompt", "expected text or a non-empty list of {role, content} messages")
        meta = {k: v for k, v in rec.items() if k != "prompt"}
        answer = rec.get("answer")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise where.error("answer", f"expected text or a number, got {type(answer).__name__}")
            meta["answer"] = str(answer)
        if "task_id" in rec and not isinstance(rec["task_id"], (str, int)):
            raise where.error("task_id", "expected text")
        tests = rec.get("tests")
        if tests is not None and not (isinstance(tests, str) or (
                isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests))):
            raise where.error("tests", "expected a code string or a non-empty list of code strings")
        out.append(RLPrompt(as_conversation(raw), meta))
    if not out:
        raise DataError("no prompts in the file", path=str(path))
    return out


def demo_prompts(split: str, n_per_family: int, *, seed: int = 0,
                 families: Sequence[str] = DEMO_FAMILIES) -> list[RLPrompt]:
    """The demo tasks as prompts; meta carries the Task so the gold checker can score it."""
    tasks = make_tasks(split, n_per_family, seed=seed, families=families)
    return [RLPrompt(as_conversation(t.prompt), {"task": t, "task_id": t.id, "family": t.family,
                                                  "answer": t.answer}) for t in tasks]


def named_prompts(path: str, tasks: str, *, split: str, per_family: int, seed: int,
                  families: Sequence[str]) -> list[RLPrompt]:
    """The prompts a run names: the demo tasks of `split` (tasks="demo") or the file at `path`."""
    if tasks == "demo":
        return demo_prompts(split, per_family, seed=seed, families=families)
    return read_prompts(path)


def prompts_that_fit(prompts: Sequence[RLPrompt], tokenizer, *, room: int, source: str) -> list[RLPrompt]:
    """The prompts of at most `room` tokens (what max_length leaves after the response); the
    others are skipped and counted. `source` names where they came from ("" for the demo tasks)."""
    skipped = SkipReport()
    kept = []
    for i, p in enumerate(prompts):
        if len(encode_prompt(tokenizer, p.prompt)) > room:
            skipped.add("prompt longer than max_length - max_new_tokens", f"{source or 'demo'}:{i + 1}")
        else:
            kept.append(p)
    if skipped.total:
        log.warning("%s", skipped.describe())
    if not kept:
        raise DataError(f"every prompt was skipped: {skipped.summary()}", path=source or "demo tasks")
    return kept
