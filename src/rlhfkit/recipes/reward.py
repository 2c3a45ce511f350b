"""Reward-model training, top to bottom.

1. read preference pairs (pairs, K-way rankings expanded with ties kept as label ½, TRL's
   standard and conversational layouts) with file:line errors; drop exact repeats; hold
   out a test split by prompt (no prompt in both splits) unless eval_data is given;
2. tokenize through the chat template, each prompt once per pair; over-length pairs are
   skipped and counted, never truncated;
3. batch: the chosen and rejected sides of a micro-batch run in ONE forward — one packed,
   padding-free row with each pair's prompt stored once (default) or 2B right-padded rows;
4. loss = Bradley–Terry with soft labels (ties pull Δ toward 0), optional margins and
   mis-click noise (`losses.reward.bradley_terry_loss`), optional reward centering; with E
   heads, the mean of the E heads' losses;
5. train with the shared engine; held-out accuracy / calibration at eval points; final
   model in `run_dir/final` (loads with `AutoModelForSequenceClassification`) and the full
   held-out report in `run_dir/eval_report.json`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import ConfigError, check, param
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.preference import dedupe, split_by_prompt
from rlhfkit.data.preference_batches import EncodedPair, PreferenceBatch, collate_pairs, encode_preference_pairs
from rlhfkit.data.readers import parse_columns, read_preferences
from rlhfkit.data.schemas import PreferencePair, prompt_text
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.eval.reward import evaluate_reward_model, scalar_metrics
from rlhfkit.io import atomic_write_text
from rlhfkit.losses.reward import (
    ENSEMBLE_MODES,
    bradley_terry_loss,
    ensemble_reduce,
    ensemble_summary,
    non_tie_accuracy,
    pairwise_metrics,
    reward_centering_penalty,
)
from rlhfkit.models.loading import LoraSettings, load_tokenizer
from rlhfkit.models.reward import as_ensemble, load_reward_model, split_pair_rewards
from rlhfkit.train.engine import Engine, TrainConfig
from rlhfkit.train.loop import SupervisedTask, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RewardConfig(TrainConfig):
    kind = "rm"
    output_dir: str = param("runs/rm", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")
    train_data: str = param("", "preference pairs or rankings: .jsonl/.parquet file, datasets folder or hub id")
    eval_data: str = param("", "held-out pairs; when empty, test_fraction of the prompts is held out")
    data_split: str = param("train", "split of train_data to read when it is a datasets folder or hub id "
                                     "(e.g. train_prefs)")
    eval_split: str = param("", "split of eval_data to read (empty = data_split)")
    data_columns: str = param("", "rename columns before parsing, field=column pairs, e.g. "
                                  "'prompt=question,chosen=good,rejected=bad' (empty = none)")
    test_fraction: float = param(0.1, "share of prompts held out for evaluation when eval_data is empty")
    use_margin: bool = param(False, "require r_chosen − r_rejected > the pair's margin (pairs without one: 0)")
    label_noise: float = param(0.0, "mis-click rate ε in [0, 0.5) of the annotator model")
    center_coef: float = param(0.0, "reward centering: coef · mean((r_c + r_r)²) keeps rewards near 0")
    n_heads: int = param(1, "ensemble: scalar heads on one backbone, each trained with its own loss")
    ensemble_mode: str = param("mean", "how the heads combine into one reward for metrics and scoring",
                               choices=ENSEMBLE_MODES)
    packing: bool = param(True, "pack each micro-batch's 2B sequences into one padding-free row, each pair's "
                                "prompt stored once (--share-prompts), micro-batches drawn at random; "
                                "--no-packing: length-grouped padding (bench/RESULTS.md: packed 1.3× padded "
                                "on the demo pairs)")
    max_eval_pairs: int = param(512, "at most this many held-out pairs")
    eval_batch_size: int = param(16, "pairs per forward pass at evaluation")
    lr: float = param(2e-5, "peak learning rate (AdamW)")

    def validate(self) -> None:
        super().validate()
        check(bool(self.train_data), "train_data is required (a .jsonl/.parquet file, folder or hub id)")
        try:
            parse_columns(self.data_columns)
        except DataError as e:
            raise ConfigError(f"'data_columns': {e.message}") from None
        check(0.0 <= self.test_fraction < 1.0, "test_fraction must be in [0, 1)")
        check(0.0 <= self.label_noise < 0.5, "label_noise must be in [0, 0.5)")
        check(self.center_coef >= 0, "center_coef must be ≥ 0")
        check(self.n_heads >= 1, "n_heads must be ≥ 1")
        check(self.ensemble_mode != "mean_minus_std" or self.n_heads >= 2,
              "ensemble_mode mean_minus_std needs n_heads ≥ 2")
        check(self.max_eval_pairs >= 1, "max_eval_pairs must be ≥ 1")
        check(self.eval_batch_size >= 1, "eval_batch_size must be ≥ 1")


# ----------------------------------------------------------------------------- 1. data

def read_splits(cfg: RewardConfig) -> tuple[list[PreferencePair], list[PreferencePair], dict]:
    """(train pairs, held-out pairs, counts for the data report)."""
    pairs, repeats = dedupe(read_preferences(cfg.train_data, cfg.data_split, columns=cfg.data_columns))
    counts: dict = {"train_pairs_read": len(pairs) + repeats, "duplicates_removed": repeats}
    if cfg.eval_data:
        train, held_out = pairs, read_preferences(cfg.eval_data, cfg.eval_split or cfg.data_split,
                                                  columns=cfg.data_columns)
        shared = {prompt_text(p.prompt) for p in train} & {prompt_text(p.prompt) for p in held_out}
        if shared:
            log.warning("%d prompts appear in both train_data and eval_data; held-out accuracy will be optimistic",
                        len(shared))
        counts["prompts_in_both"] = len(shared)
    else:
        train, held_out = split_by_prompt(pairs, cfg.test_fraction, seed=cfg.seed)
        if cfg.test_fraction > 0 and not held_out:
            log.warning("no prompt fell in the held-out split (too few prompts); no evaluation")
    if not train:
        raise DataError("no training pairs left after the held-out split; lower test_fraction or pass eval_data",
                        path=cfg.train_data)
    return train, held_out[: cfg.max_eval_pairs], counts


# ----------------------------------------------------------------------------- 3–4. batches and loss

def reward_task(cfg: RewardConfig, tokenizer, train: list[EncodedPair], held_out: list[EncodedPair],
                latest_report: dict) -> SupervisedTask:
    """The SupervisedTask of reward modelling; `latest_report` receives each full eval report."""
    pad_id = pad_token_id(tokenizer)

    def make_batch(indices: list[int]) -> PreferenceBatch:
        return collate_pairs([train[i] for i in indices], pad_id, packed=cfg.packing, share_prompts=cfg.shares_prompts)

    def loss(module, batch: PreferenceBatch, normalizer: float):
        num_pairs = batch.num_pairs
        rewards = as_ensemble(module(batch.sequences))                        # (E, 2B)
        chosen, rejected = split_pair_rewards(rewards, num_pairs)             # (E, B) each
        heads = chosen.shape[0]
        margin = batch.margin if cfg.use_margin else None
        bradley_terry = torch.zeros(num_pairs, device=rewards.device)         # (B,) summed over heads
        centering = torch.zeros(num_pairs, device=rewards.device)
        centering_sq = torch.zeros(num_pairs, device=rewards.device)
        for head in range(heads):
            per_pair, _ = bradley_terry_loss(chosen[head], rejected[head], label=batch.label, margin=margin,
                                             noise=cfg.label_noise)
            bradley_terry = bradley_terry + per_pair
            if cfg.center_coef > 0:
                penalty, penalty_metrics = reward_centering_penalty(chosen[head], rejected[head], cfg.center_coef)
                centering = centering + penalty
                centering_sq = centering_sq + penalty_metrics["rewards/centering_sq"]
        per_pair_loss = (bradley_terry + centering) / heads                   # (B,), mean over heads
        # fit divides every metric by the step's pair count, so metrics are sums over pairs.
        pm = pairwise_metrics(ensemble_reduce(chosen.detach(), cfg.ensemble_mode),
                              ensemble_reduce(rejected.detach(), cfg.ensemble_mode), batch.label)
        sums = {"loss": per_pair_loss.detach().sum(),
                "loss/bradley_terry": bradley_terry.detach().sum() / heads,
                "rewards/chosen": pm["rewards/chosen"].sum(),
                "rewards/rejected": pm["rewards/rejected"].sum(),
                "rewards/margin": pm["rewards/margin"].sum(),
                # The micro-batch's accuracy over its non-tie pairs, weighted by its pairs: exact
                # for one micro-batch per step; a micro-batch of ties only counts as 0.
                "rewards/accuracy": non_tie_accuracy(pm) * num_pairs}
        if cfg.center_coef > 0:
            sums["rewards/centering_sq"] = centering_sq.sum() / heads
        if heads > 1:
            # the spread of the 2B rewards of B pairs, per pair: Σ over sequences / 2
            spread = ensemble_summary(torch.cat([chosen, rejected], dim=1).detach())["std"]
            sums["rewards/ensemble_spread"] = spread.sum() / 2
        return per_pair_loss.sum() / normalizer, sums

    def evaluate(module) -> dict[str, float]:
        report = evaluate_reward_model(module, tokenizer, held_out, ensemble_mode=cfg.ensemble_mode,
                                       batch_size=cfg.eval_batch_size, packed=cfg.packing)
        latest_report.clear()
        latest_report.update(report)
        return scalar_metrics(report)

    return SupervisedTask(lengths=[len(p) for p in train], make_batch=make_batch,
                          units=lambda b: b.num_pairs, tokens=lambda b: b.sequences.num_tokens, loss=loss,
                          evaluate=evaluate if held_out else None, group_by_length=not cfg.packing)


# ----------------------------------------------------------------------------- 5. run

def run_reward(cfg: RewardConfig) -> dict:
    """Train; returns {"final", "metrics", "eval" (full held-out report or {}), "skipped", "data"}."""
    run_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model)
    train_pairs, held_out_pairs, counts = read_splits(cfg)
    skipped = SkipReport()
    train = encode_preference_pairs(tokenizer, train_pairs, cfg.max_length, skipped, f"{cfg.train_data}:")
    held_out = encode_preference_pairs(tokenizer, held_out_pairs, cfg.max_length, skipped,
                                       f"{cfg.eval_data or f'{cfg.train_data} (held out)'}:")
    if skipped.total:
        log.warning("%s", skipped.describe())
    if not train:
        raise DataError(f"every training pair was skipped: {skipped.summary()}", path=cfg.train_data)

    model = load_reward_model(cfg.model, n_heads=cfg.n_heads, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id,
                              lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None)
    engine = Engine(cfg, run_dir, description="rm")
    module = engine.setup(model, tokenizer)
    data_report = {**counts, "train_pairs": len(train), "eval_pairs": len(held_out),
                   "train_ties": sum(p.is_tie for p in train),
                   "eval_ties": sum(p.is_tie for p in held_out),
                   "skipped": skipped.counts, "skipped_examples": skipped.examples}
    if engine.is_main:
        atomic_write_text(run_dir / "data_report.json", json.dumps(data_report, indent=2))

    latest_report: dict = {}
    metrics = fit(engine, reward_task(cfg, tokenizer, train, held_out, latest_report))
    final = engine.finish()
    if engine.is_main and latest_report:
        atomic_write_text(run_dir / "eval_report.json", json.dumps(latest_report, indent=2))
    del module
    return {"final": str(final), "metrics": metrics, "eval": latest_report, "skipped": skipped.counts,
            "data": data_report}

