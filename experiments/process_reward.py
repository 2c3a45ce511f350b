"""The process-reward measurements of bench/RESULTS.md ("Session 10: process reward model").

    python experiments/process_reward.py breakdown runs/prm/final --per-family 30
    python experiments/process_reward.py heldout out.json --per-family 50 runs/sft/final runs/grpo/final

`breakdown`: a trained PRM's held-out step accuracy by step position, by kind of solution
(reference or corrupted) and by label, on the demo's test split. `heldout`: greedy exact match
of each model on the arithmetic and units test tasks (the families the PRM labels exactly).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from rlhfkit.data.schemas import as_conversation
from rlhfkit.eval.accuracy import exact_match
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.models.process_reward import load_trained_process_reward_model, score_steps
from rlhfkit.tasks.generate import make_tasks
from rlhfkit.tasks.step_labels import make_step_records

FAMILIES = ("arithmetic", "units")


def breakdown(prm: str, per_family: int) -> dict[str, str]:
    model, tokenizer = load_trained_process_reward_model(prm)
    records = make_step_records("test", per_family, corruptions=2, seed=0)
    probs = score_steps(model, tokenizer, [as_conversation(r.prompt) for r in records], [r.steps for r in records])
    right = collections.defaultdict(lambda: [0, 0])
    for record, scores in zip(records, probs, strict=True):
        for k, (label, p) in enumerate(zip(record.labels, scores, strict=True)):
            for key in (f"step {k + 1}", f"{record.kind} step {k + 1}", f"label {label}"):
                right[key][0] += int((p > 0.5) == bool(label))
                right[key][1] += 1
    return {key: f"{c}/{n} = {c / n:.3f}" for key, (c, n) in sorted(right.items())}


def heldout(models: list[str], per_family: int, max_new_tokens: int = 40) -> dict[str, dict]:
    tasks = make_tasks("test", per_family, seed=0, families=FAMILIES)
    out = {}
    for path in models:
        result = exact_match(load_model(path).eval(), load_tokenizer(path), tasks, max_new_tokens=max_new_tokens,
                             batch_size=32)
        out[path] = {"accuracy": result.accuracy, "ci": [result.ci_low, result.ci_high], "n": result.n}
        print(path, out[path], flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("breakdown", help="a PRM's held-out step accuracy by position, kind and label")
    b.add_argument("prm")
    b.add_argument("--per-family", type=int, default=30)
    h = sub.add_parser("heldout", help="greedy exact match of models on the arithmetic and units test tasks")
    h.add_argument("out", type=Path)
    h.add_argument("models", nargs="+")
    h.add_argument("--per-family", type=int, default=50)
    args = p.parse_args(argv)
    if args.command == "breakdown":
        print(json.dumps(breakdown(args.prm, args.per_family), indent=1))
    else:
        args.out.write_text(json.dumps(heldout(args.models, args.per_family), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
