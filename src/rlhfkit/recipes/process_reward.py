"""Process-reward-model training, top to bottom.

1. data: step-labelled solutions (`prompt`, `steps`, `labels`) from a JSONL file, or with
   `tasks=demo` made on the fly from the demo tasks (`tasks.step_labels`: references plus
   corrupted copies, labelled exactly); the held-out solutions are the demo *test* split
   (or `eval_data`), so no problem is in both;
2. tokenize: the prompt through the chat template, then each step on its own, joined by the
   step separator; the position of each step's last token is kept (`models.process_reward`);
   over-length solutions are skipped and counted;
3. loss: per-step binary cross-entropy of the head read at each step's end
   (`losses.process_reward.step_bce_loss`), summed over the step's steps and divided by
   their number;
4. train with the shared engine (`train.loop.fit`); step-level accuracy on the held-out
   solutions at eval points and at the end, against the majority-label baseline, in
   metrics.jsonl and `run_dir/eval_report.json`; final model in `run_dir/final`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import check, param
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.io import atomic_write_text
from rlhfkit.losses.process_reward import step_bce_loss
from rlhfkit.models.loading import LoraSettings, load_tokenizer
from rlhfkit.models.process_reward import (
    EncodedSteps,
    StepBatch,
    collate_steps,
    encode_steps,
    load_process_reward_model,
)
from rlhfkit.tasks.step_labels import STEP_FAMILIES, StepRecord, make_step_records, read_step_records
from rlhfkit.train.engine import Engine, TrainConfig
from rlhfkit.train.loop import SupervisedTask, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRewardConfig(TrainConfig):
    kind = "prm"
    output_dir: str = param("runs/prm", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")
    train_data: str = param("", "step-labelled solutions: JSONL with 'prompt', 'steps', 'labels' "
                                "(`rlhf prm data` writes them)")
    eval_data: str = param("", "held-out step-labelled solutions (with tasks=demo: default the demo test split)")
    tasks: str = param("", "'demo' to make the data from the demo tasks instead of a file", choices=("", "demo"))
    demo_per_family: int = param(200, "demo train tasks per family (with tasks=demo)")
    eval_per_family: int = param(100, "demo test tasks per family held out (with tasks=demo)")
    demo_families: tuple[str, ...] = param(STEP_FAMILIES, "demo families with exact step labels")
    corruptions: int = param(2, "corrupted copies per reference solution (with tasks=demo)")
    eval_batch_size: int = param(16, "solutions per forward pass at evaluation")
    lr: float = param(2e-5, "peak learning rate (AdamW)")

    def validate(self) -> None:
        super().validate()
        check(bool(self.train_data) != bool(self.tasks), "give exactly one of train_data (a JSONL file) or tasks=demo")
        check(self.demo_per_family >= 1 and self.eval_per_family >= 0,
              "demo_per_family must be ≥ 1 and eval_per_family ≥ 0")
        check(self.corruptions >= 0, "corruptions must be ≥ 0")
        check(all(f in STEP_FAMILIES for f in self.demo_families),
              f"demo_families must be among {', '.join(STEP_FAMILIES)}")
        check(self.eval_batch_size >= 1, "eval_batch_size must be ≥ 1")


# ----------------------------------------------------------------------------- 1–2. data

def read_data(cfg: ProcessRewardConfig) -> tuple[list[StepRecord], list[StepRecord]]:
    """(train, held-out) step records."""
    if cfg.tasks == "demo":
        train = make_step_records("train", cfg.demo_per_family, corruptions=cfg.corruptions, seed=cfg.seed,
                                  families=cfg.demo_families)
        held_out = (read_step_records(cfg.eval_data) if cfg.eval_data else
                    make_step_records("test", cfg.eval_per_family, corruptions=cfg.corruptions, seed=cfg.seed,
                                      families=cfg.demo_families) if cfg.eval_per_family else [])
    else:
        train = read_step_records(cfg.train_data)
        held_out = read_step_records(cfg.eval_data) if cfg.eval_data else []
        if not held_out:
            log.warning("no eval_data: no held-out step accuracy")
    return train, held_out


def encode_records(tokenizer, records: Sequence[StepRecord], max_length: int, skipped: SkipReport,
                   source: str) -> list[EncodedSteps]:
    out = []
    for i, r in enumerate(records):
        encoded = encode_steps(tokenizer, as_conversation(r.prompt), r.steps, r.labels)
        if len(encoded) > max_length:
            skipped.add("too_long", f"{source} record {i + 1}: {len(encoded)} tokens > max_length {max_length}")
            continue
        out.append(encoded)
    return out


# ----------------------------------------------------------------------------- 4. evaluation

@torch.no_grad()
def evaluate_steps(module, examples: Sequence[EncodedSteps], pad_id: int, *, batch_size: int) -> dict:
    """Step-level accuracy (σ(z) > ½ against the label) on held-out solutions, and the majority
    baseline (always the more frequent label); solution accuracy: the whole solution judged
    right iff every step's σ(z) > ½, against its last label (1 iff the solution is right)."""
    device = next(module.parameters()).device
    correct = positives = steps = loss = 0.0
    solutions_right = last_positive = 0
    for start in range(0, len(examples), batch_size):
        batch = collate_steps(examples[start:start + batch_size], pad_id).to(device)
        logits = module(batch)
        per_step, m = step_bce_loss(logits, batch.labels, batch.step_mask)
        correct += float(m["steps/correct"].sum())
        positives += float(m["steps/positive"].sum())
        steps += float(m["steps/count"].sum())
        loss += float(per_step.sum())
        lengths = batch.step_mask.sum(-1).long()
        rows = torch.arange(len(lengths), device=device)
        last_label = batch.labels[rows, lengths - 1]
        predicted = ((logits > 0) | (batch.step_mask == 0)).all(-1).float()
        solutions_right += int((predicted == last_label).sum())
        last_positive += int(last_label.sum())
    n = len(examples)
    if n == 0:
        return {}
    return {"eval/step_accuracy": correct / steps,
            "eval/step_majority_baseline": max(positives, steps - positives) / steps,
            "eval/step_positive_rate": positives / steps, "eval/loss": loss / steps,
            "eval/solution_accuracy": solutions_right / n,
            "eval/solution_majority_baseline": max(last_positive, n - last_positive) / n,
            "eval/num_steps": steps, "eval/num_solutions": float(n)}


# ----------------------------------------------------------------------------- 3. the task

def process_reward_task(cfg: ProcessRewardConfig, tokenizer, train: list[EncodedSteps],
                        held_out: list[EncodedSteps]) -> SupervisedTask:
    pad_id = pad_token_id(tokenizer)

    def make_batch(indices: list[int]) -> StepBatch:
        return collate_steps([train[i] for i in indices], pad_id)

    def loss(module, batch: StepBatch, normalizer: float):
        per_step, m = step_bce_loss(module(batch), batch.labels, batch.step_mask)    # (B, S)
        # fit divides every metric by the step's number of steps (its units): sums here.
        sums = {"loss": per_step.detach().sum(), "steps/accuracy": m["steps/correct"].sum(),
                "steps/positive_rate": m["steps/positive"].sum(), "steps/prob": m["steps/prob"].sum()}
        return per_step.sum() / normalizer, sums

    def evaluate(module) -> dict[str, float]:
        return evaluate_steps(module, held_out, pad_id, batch_size=cfg.eval_batch_size)

    return SupervisedTask(lengths=[len(e) for e in train], make_batch=make_batch, units=lambda b: b.num_steps,
                          tokens=lambda b: b.num_tokens, loss=loss, evaluate=evaluate if held_out else None)


# ----------------------------------------------------------------------------- the run

def run_process_reward(cfg: ProcessRewardConfig) -> dict:
    """Train; returns {"final", "metrics", "eval" (held-out report or {}), "data"}."""
    run_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    train_records, held_out_records = read_data(cfg)
    skipped = SkipReport()
    train = encode_records(tokenizer, train_records, cfg.max_length, skipped, cfg.train_data or "demo train")
    held_out = encode_records(tokenizer, held_out_records, cfg.max_length, skipped,
                              cfg.eval_data or "demo test")
    if skipped.total:
        log.warning("%s", skipped.describe())
    if not train:
        raise DataError(f"every training solution was skipped: {skipped.summary()}", path=cfg.train_data or None)
    model = load_process_reward_model(cfg.model, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id,
                                      lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None)
    engine = Engine(cfg, run_dir, description="prm")
    module = engine.setup(model, tokenizer)
    data_report = {"train_solutions": len(train), "eval_solutions": len(held_out),
                   "train_steps": sum(len(e.step_ends) for e in train),
                   "train_positive_steps": sum(sum(e.labels) for e in train),
                   "eval_steps": sum(len(e.step_ends) for e in held_out), "skipped": skipped.counts}
    if engine.is_main:
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=2))
    metrics = fit(engine, process_reward_task(cfg, tokenizer, train, held_out))
    final = engine.finish()
    report = {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/")}
    if engine.is_main and report:
        atomic_write_text(run_dir / "eval_report.json", json.dumps(report, indent=2))
    del module
    return {"final": str(final), "metrics": metrics, "eval": report, "data": data_report}
