"""The held-out prompts of an evaluation: checkable tasks (with a gold answer) or open prompts."""

from __future__ import annotations

from dataclasses import dataclass

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import iter_records
from rlhfkit.data.schemas import Conversation, as_conversation, prompt_text
from rlhfkit.tasks.generate import Task, make_tasks
from rlhfkit.tasks.records import read_jsonl


@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt: a checkable task (gold answer) or an open prompt."""

    id: str
    family: str
    prompt: Conversation
    task: Task | None = None  # set for a checkable task

    @property
    def checkable(self) -> bool:
        return self.task is not None and self.task.checkable


def load_eval_prompts(tasks: str, *, n_per_family: int = 25, seed: int = 0) -> list[EvalPrompt]:
    """'demo' → the demo test split; a file of demo task records (`task_id`, `family`, ...) → those
    tasks; any other JSONL → one open prompt per record's `prompt` (text or messages)."""
    if tasks == "demo":
        found = make_tasks("test", n_per_family, seed=seed)
    else:
        first = next(iter_records(tasks), None)
        if first is None:
            raise DataError("no records", path=str(tasks))
        if "family" in first[0] and "task_id" in first[0]:
            found = read_jsonl(tasks)
        else:
            prompts = []
            for rec, where in iter_records(tasks):
                if "prompt" not in rec:
                    raise where.error("prompt", "missing (an eval prompt needs 'prompt')")
                try:
                    conv = as_conversation(rec["prompt"])
                except (KeyError, TypeError):
                    raise where.error("prompt", "expected text or a list of {role, content} messages") from None
                if not prompt_text(conv).strip():
                    raise where.error("prompt", "empty text")
                prompts.append(EvalPrompt(str(rec.get("id", f"prompt-{where.line:04d}")), "open", conv))
            return prompts
    return [EvalPrompt(t.id, t.family, as_conversation(t.prompt), t) for t in found]
