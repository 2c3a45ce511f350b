"""Honestly labeled demo preferences: a simulated annotator driven by the exact checkers.

Like AlpacaFarm's simulated annotators, the labeler is a program with a known error rate:
for two responses to a checkable task, the correct one is preferred, except that with
probability `noise` the annotator mis-clicks and picks the other (the constant mis-click
model of the seeds). Two correct or two wrong responses are a tie (label 0.5; both wrong
is also marked `both_bad`). Every label records its provenance.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from rlhfkit.data.schemas import PreferencePair, Provenance, as_conversation
from rlhfkit.tasks.check import check
from rlhfkit.tasks.generate import Task

ANNOTATOR = "simulated-checker"


@dataclass(frozen=True)
class LabelStats:
    pairs: int
    ties: int
    flipped: int
    prompts: int


def simulate_preferences(tasks: list[Task], responses: list[list[str]], *, noise: float, seed: int,
                         round: int = 1, model_version: str | None = None,
                         max_pairs_per_prompt: int = 6) -> tuple[list[PreferencePair], LabelStats]:
    """Label all pairs of distinct responses per checkable task (at most `max_pairs_per_prompt`)."""
    if not 0 <= noise < 0.5:
        raise ValueError("noise must be in [0, 0.5)")
    rng = random.Random(seed)
    pairs: list[PreferencePair] = []
    ties = flipped = prompts = 0
    for task, resps in zip(tasks, responses):
        if not task.checkable:
            continue
        distinct = list(dict.fromkeys(r for r in resps if r.strip()))
        combos = list(itertools.combinations(distinct, 2))
        rng.shuffle(combos)
        if combos:
            prompts += 1
        for a, b in combos[:max_pairs_per_prompt]:
            ok_a, ok_b = check(task, a), check(task, b)
            meta = {"task_id": task.id, "gold_a": ok_a, "gold_b": ok_b}
            if ok_a == ok_b:
                label, chosen, rejected = 0.5, a, b
                ties += 1
            else:
                chosen, rejected = (a, b) if ok_a else (b, a)
                label = 1.0
                if rng.random() < noise:
                    chosen, rejected = rejected, chosen
                    flipped += 1
                meta["gold_label"] = 1.0 if chosen == (a if ok_a else b) else 0.0
            pairs.append(PreferencePair(
                as_conversation(task.prompt), chosen, rejected, label=label, both_bad=ok_a == ok_b == False,  # noqa: E712
                provenance=Provenance(annotator=ANNOTATOR, source="synthetic", round=round,
                                      model_version=model_version,
                                      rationale=f"exact checker, mis-click rate {noise}"),
                meta=meta))
    return pairs, LabelStats(len(pairs), ties, flipped, prompts)


def pair_to_record(p: PreferencePair) -> dict:
    """The JSONL layout `read_preferences` reads back (with provenance and task id)."""
    return {"prompt": [m.to_dict() for m in p.prompt], "chosen": p.chosen, "rejected": p.rejected,
            "label": p.label, "both_bad": p.both_bad, **p.provenance.to_dict(), **p.meta}
