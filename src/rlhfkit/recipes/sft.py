"""Supervised fine-tuning (instruction tuning), top to bottom.

1. read the examples (JSONL / Parquet / datasets folder / hub id, any layout of
   `data.layouts`) with file:line errors; KTO records labelled undesirable are left out and
   counted (SFT would teach the model the very completions the labels reject);
2. tokenize through the chat template, loss on the assistant tokens only: every assistant
   turn of a conversation, or only the last (`assistant_turns`); over-length examples are
   skipped and counted, never silently;
3. batch: packed (padding-free, attention confined per example) or length-grouped padding;
4. loss = Σ_i w_i · NLL of example i's assistant tokens / the step's assistant-token count
   (`losses.sft.sft_loss` with the per-example `weight` w_i folded into the mask; w = 1 by default);
5. train with the shared engine; periodic eval loss; final model in `run_dir/final`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError, check, param
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.packing import collate, collate_packed
from rlhfkit.data.readers import parse_columns, read_sft
from rlhfkit.data.schemas import SFTExample
from rlhfkit.data.tokenize import ASSISTANT_TURNS, Encoded, encode_conversation, pad_token_id
from rlhfkit.io import atomic_write_text
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.loading import LoraSettings, load_model, load_tokenizer
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.train.engine import Engine, TrainConfig
from rlhfkit.train.loop import SupervisedTask, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    kind = "sft"
    output_dir: str = param("runs/sft", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")
    train_data: str = param("", "training examples: .jsonl/.parquet file, datasets folder or hub id")
    eval_data: str = param("", "held-out examples for the eval loss (optional)")
    data_split: str = param("train", "split of train_data to read when it is a datasets folder or hub id")
    eval_split: str = param("", "split of eval_data to read (empty = data_split)")
    data_columns: str = param("", "rename columns before parsing, field=column pairs, e.g. "
                                  "'prompt=question,completion=answer' (empty = none)")
    assistant_turns: str = param("all", "which assistant turns of a conversation are trained: all, or the last",
                                 choices=ASSISTANT_TURNS)
    packing: bool = param(False, "pack each micro-batch into one padding-free row (attention confined per "
                                 "example); off: length-grouped padding (bench/RESULTS.md: which is faster where)")
    max_eval_examples: int = param(256, "at most this many eval examples")
    lr: float = param(5e-5, "peak learning rate (AdamW)")

    def validate(self) -> None:
        super().validate()
        check(bool(self.train_data), "train_data is required (a .jsonl/.parquet file, folder or hub id)")
        try:
            parse_columns(self.data_columns)
        except DataError as e:
            raise ConfigError(f"'data_columns': {e.message}") from None


def encode_examples(tokenizer, examples: list[SFTExample], max_length: int,
                    skipped: SkipReport, where: str, *, assistant_turns: str = "all") -> list[Encoded]:
    """Tokenize; examples longer than max_length are skipped and counted in `skipped`."""
    out = []
    for i, ex in enumerate(examples):
        enc = encode_conversation(tokenizer, ex.prompt, ex.response, assistant_turns=assistant_turns,
                                  weight=ex.weight)
        if len(enc) > max_length:
            skipped.add("longer than max_length", f"{where}:{i + 1}")
            continue
        out.append(enc)
    return out


def sft_task(tokenizer, train: list[Encoded], eval_set: list[Encoded], *, packing: bool,
             eval_batch_size: int = 8) -> SupervisedTask:
    pad = pad_token_id(tokenizer)

    def make_batch(idx):
        return collate([train[i] for i in idx], pad, packed=packing)

    def loss(module, batch, normalizer):
        logps = module(batch)
        value, m = sft_loss(logps, batch.weighted_loss_mask, normalizer=normalizer)
        return value, {"loss": m["nll_sum"]}

    def evaluate(module):
        if not eval_set:
            return {}
        total, n = 0.0, 0
        for s in range(0, len(eval_set), eval_batch_size):
            b = collate_packed(eval_set[s:s + eval_batch_size], pad).to(next(module.parameters()).device)
            _, m = sft_loss(module(b), b.loss_mask)
            total += float(m["nll_sum"])
            n += int(m["tokens"])
        return {"eval_loss": total / max(n, 1)}

    return SupervisedTask(lengths=[len(e) for e in train], make_batch=make_batch,
                          units=lambda b: b.num_loss_tokens, tokens=lambda b: b.num_tokens, loss=loss,
                          evaluate=evaluate if eval_set else None, group_by_length=not packing)


def run_sft(cfg: SFTConfig) -> dict:
    """Train; returns {"final": path, "metrics": last metrics, "skipped": counts}."""
    run_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    skipped = SkipReport()
    train_examples = read_sft(cfg.train_data, cfg.data_split, columns=cfg.data_columns, skipped=skipped)
    train = encode_examples(tokenizer, train_examples, cfg.max_length, skipped, cfg.train_data,
                            assistant_turns=cfg.assistant_turns)
    eval_set: list[Encoded] = []
    if cfg.eval_data:
        ev = read_sft(cfg.eval_data, cfg.eval_split or cfg.data_split, columns=cfg.data_columns,
                      skipped=skipped)[: cfg.max_eval_examples]
        eval_set = encode_examples(tokenizer, ev, cfg.max_length, skipped, cfg.eval_data,
                                   assistant_turns=cfg.assistant_turns)
    if skipped.total:
        log.warning("%s", skipped.describe())
    if not train:
        raise DataError(f"every training example was skipped: {skipped.summary()}", path=cfg.train_data)

    model = load_model(cfg.model, lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None,
                       seed=cfg.seed)
    engine = Engine(cfg, run_dir, description="sft")
    module = engine.setup(TokenLogprobs(model, cfg.logprob_chunk), tokenizer)
    if engine.is_main:
        atomic_write_text(run_dir / "data_report.json", json.dumps(
            {"train_examples": len(train_examples), "train_used": len(train), "eval_used": len(eval_set),
             "skipped": skipped.counts, "skipped_examples": skipped.examples}, indent=2))
    task = sft_task(tokenizer, train, eval_set, packing=cfg.packing)
    metrics = fit(engine, task)
    final = engine.finish()
    del module
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"final": str(final), "metrics": metrics, "skipped": skipped.counts}
