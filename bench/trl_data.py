"""What goes into and comes out of the TRL trainers of the `bench/*_vs_trl.py` scripts (beside
`trl_side.py`, which drives the trainers):

- `preference_records` / `preference_setup`: the preference pairs of the DPO and
  reward-model benchmarks, and our configs for them (padded and packed);
- `task_groups`: with `--mix LO,HI`, demo tasks joined into examples of mixed lengths;
- `write_jsonl`, `batch_rows`: the data file of our side; the rows of a collated TRL batch;
- `TrainingStepRecorder`: wraps `trainer.training_step` to keep TRL's loss of every step,
  its first batch and the metrics it logged for each step.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhfkit.tasks.check import check
from rlhfkit.tasks.generate import FAMILIES, Task, make_tasks

PADDED, PACKED = "ours (padded)", "ours (packed)"  # our side with packing off / on


# ------------------------------------------------------------------------------ data

def _wrong_answer(answer: str) -> str:
    """A plausible wrong value: off by one for integers, the opposite truth value, reversed
    order for lists and phrases, a dropped last letter for words, the next letter for letters."""
    opposite = {"true": "false", "false": "true", "yes": "no", "no": "yes"}
    if answer.lower() in opposite:
        return opposite[answer.lower()]
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    sep = ", " if ", " in answer else " " if " " in answer else None
    if sep is not None:
        return sep.join(reversed(answer.split(sep)))
    if len(answer) > 1:
        return answer[:-1]
    return chr(ord("a") + (ord(answer.lower()) - ord("a") + 1) % 26) if answer.isalpha() else answer + answer


def wrong_response(task: Task, open_tasks: list[Task]) -> str:
    """A deterministic bad response to `task`.

    Checkable tasks: the reference with a wrong answer (an integer answer also changes after
    the reasoning's "=", so the reasoning agrees with it; otherwise only the final `Answer:`
    line changes). Open-ended tasks: the reference of the next open-ended task, an answer to
    another prompt.
    """
    if task.answer is None:
        return open_tasks[(open_tasks.index(task) + 1) % len(open_tasks)].reference
    wrong = _wrong_answer(task.answer)
    if re.fullmatch(r"-?\d+", task.answer):
        response = re.sub(rf"(= |Answer: ){re.escape(task.answer)}(?!\.?\d)", lambda m: m.group(1) + wrong,
                          task.reference)
    else:
        response = re.sub(r"Answer: .*$", lambda _: f"Answer: {wrong}", task.reference)
    if check(task, response):
        raise AssertionError(f"{task.id}: the 'wrong' response {response!r} passes the checker")
    return response


TEMPLATE_TOKENS = 30  # what SmolLM2's chat template adds to one user + assistant turn (≈ 28 tokens)


def task_groups(count: int, mix: tuple[int, int] | None, tokenizer,
                seed: int = 0) -> tuple[list[list[Task]], list[Task]]:
    """(`count` groups of consecutive demo train tasks, one group per example or pair; the
    tasks they were cut from).

    mix None: one task per group (the demo batch). mix (LO, HI): for each group a target length
    L ~ uniform{LO..HI} (seeded), then tasks are added while the group's prompts and references,
    joined, stay within L − TEMPLATE_TOKENS tokens (at least one task): examples of mixed
    lengths from ≈ 60 tokens (one task) to HI, each a sequence of real demo tasks.
    """
    if mix is None:
        pool = make_tasks("train", max(2, math.ceil(count / len(FAMILIES))))
        return [[t] for t in pool[:count]], pool
    rng = random.Random(seed)
    targets = [rng.randint(*mix) for _ in range(count)]
    pool = make_tasks("train", math.ceil(sum(targets) / 20 / len(FAMILIES)) + 2)  # a demo task is ≥ 20 tokens
    pool_iter, groups = iter(pool), []
    for target in targets:
        group = [next(pool_iter)]
        while True:
            candidate = [*group, next(pool_iter)]
            text = "\n\n".join(t.prompt for t in candidate) + "\n\n".join(t.reference for t in candidate)
            if len(tokenizer(text).input_ids) + TEMPLATE_TOKENS > target:
                break
            group = candidate
        groups.append(group)
    return groups, pool


def preference_records(pairs: int, mix: tuple[int, int] | None = None, tokenizer=None) -> list[dict]:
    """`pairs` preference pairs in TRL's conversational layout, from the demo train tasks
    (`make_tasks("train", 2)[:8]` for 8 pairs): chosen = the task's reference response,
    rejected = `wrong_response`. Both sides render them through the same chat template.

    With `mix`, each pair joins the tasks of one `task_groups` group: the prompts, then the
    references (chosen) or the same references with the last one replaced by its wrong response
    (rejected), each part separated by blank lines.
    """
    groups, pool = task_groups(pairs, mix, tokenizer)
    open_tasks = [t for t in pool if not t.checkable]
    return [{"prompt": [{"role": "user", "content": "\n\n".join(t.prompt for t in g)}],
             "chosen": [{"role": "assistant", "content": "\n\n".join(t.reference for t in g)}],
             "rejected": [{"role": "assistant", "content": "\n\n".join(
                 [t.reference for t in g[:-1]] + [wrong_response(g[-1], open_tasks)])}]}
            for g in groups]


def pairs_note(mix: tuple[int, int] | None, sequences) -> str:
    """What the pairs of `preference_records` are, for a report's batch line."""
    note = "demo train tasks: chosen = reference, rejected = a wrong answer"
    if mix is None:
        return note
    return (f"{note} in the last task joined; mixed lengths (--mix {mix[0]},{mix[1]}): "
            f"{sorted(len(s) for s in sequences)} tokens")


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def both_layouts(tmp: Path, make: Callable[[bool, Path], object]) -> dict[str, object]:
    """{PADDED: make(packing=False, tmp/"ours"), PACKED: make(packing=True, tmp/"ours_packed")}."""
    return {PADDED: make(False, tmp / "ours"), PACKED: make(True, tmp / "ours_packed")}


def preference_setup(args: argparse.Namespace, tmp: Path, make_config: Callable,
                     tokenizer) -> tuple[list[dict], dict]:
    """(the `--pairs` records (of `--mix` lengths if given), written to tmp/pairs.jsonl; {PADDED, PACKED: our config for
    that file, `make_config(args, packing=, data_path=, run_dir=)`})."""
    records = preference_records(args.pairs, args.mix, tokenizer)
    data_path = write_jsonl(records, tmp / "pairs.jsonl")
    return records, both_layouts(tmp, lambda packing, run_dir: make_config(args, packing=packing, data_path=data_path,
                                                                           run_dir=run_dir))


def batch_rows(batch: dict) -> list[tuple[int, ...]]:
    """The real (attention-mask) tokens of each row of a collated TRL batch, sorted; a
    padding-free batch (one row, no mask) is cut where its position ids restart at 0."""
    if "attention_mask" not in batch:
        ids, starts = batch["input_ids"][0], (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
        return sorted(tuple(ids[a:b].tolist()) for a, b in zip(starts, [*starts[1:], len(ids)], strict=True))
    return sorted(tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"],
                                                               strict=True))



# ------------------------------------------------------------------------------ TRL's steps

@dataclass
class TrainingStepRecorder:
    """Wraps `trainer.training_step` (TRL's own call stays inside) to keep, per step, the loss
    it returned and the last value of each metric TRL's trainer logged for it (its
    `_metrics["train"]`), plus the first step's batch."""

    trainer: object
    losses: list[float] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    first_batch: dict | None = None
    first_num_items: float | None = None

    def __post_init__(self):
        self.inner = self.trainer.training_step
        self.trainer.training_step = self

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    def __call__(self, model, inputs, num_items_in_batch=None):
        if self.first_batch is None:
            self.first_batch = {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
            self.first_num_items = None if num_items_in_batch is None else float(num_items_in_batch)
        loss = self.inner(model, inputs, num_items_in_batch)
        self.losses.append(float(loss))
        logged = getattr(self.trainer, "_metrics", {}).get("train", {})
        self.logged.append({k: float(v[-1]) for k, v in logged.items() if v})
        return loss
