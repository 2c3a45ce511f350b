"""Online DPO (OAIF: "Direct Language Model Alignment from Online AI Feedback", Guo et al. 2024):
the DPO family trained on fresh on-policy pairs, labeled as they are sampled.

Offline DPO trains on a fixed dataset of pairs sampled once, from another policy. Online, each
step labels pairs of the *current* policy's own responses:

1. take the step's prompts (a pure function of seed and step);
2. sample k responses per prompt from π_θ, score them with the labeler (the reward spec:
   the exact checkers, a reward model, a format rule …), and take reference log-probs;
3. pair the best and the worst response of each prompt when their scores differ
   (`best_worst_pairs`): chosen y_w, rejected y_l; a prompt whose responses all score the
   same gives no pair (no preference);
4. one optimizer step on the pairs' loss, e.g. DPO

       ℓ = −log σ(β [(log π_θ(y_w|x) − log π_ref(y_w|x)) − (log π_θ(y_l|x) − log π_ref(y_l|x))])

   plus α × the preferred response's mean token NLL (RPO) when nll_weight α > 0,
   averaged over the step's pairs.

The sampling, scoring, reference log-probs and the step loop with resume are the shared
online loop (`rlhfkit.recipes.online`); the loss is the DPO family's (`losses.preference`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhfkit.config import ConfigError, check, param
from rlhfkit.losses.preference import preferred_nll
from rlhfkit.losses.preference_registry import PREFERENCE_LOSSES, PairLogps, get_preference_loss
from rlhfkit.recipes import online
from rlhfkit.recipes.online import OnlineConfig, OnlineRun, load_inputs, mean_across, start_run
from rlhfkit.rollout.rollout import Rollout, policy_outputs, rollout_metrics

PAIRED_LOSSES = tuple(name for name, spec in PREFERENCE_LOSSES.items() if spec.paired)


@dataclass(frozen=True)
class OnlineDPOConfig(OnlineConfig):
    kind = "online_dpo"
    output_dir: str = param("runs/online-dpo", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")
    loss: str = param("dpo", "paired preference loss", choices=PAIRED_LOSSES)
    beta: float | None = param(None, "β of the loss; None = its default (0.1 for DPO)")
    nll_weight: float = param(0.0, "α ≥ 0: add α × the chosen response's mean per-token NLL (RPO)")
    lr: float = param(5e-6, "peak learning rate (AdamW)")

    def validate(self) -> None:
        super().validate()
        check(self.samples_per_prompt >= 2,
              "samples_per_prompt must be ≥ 2: a pair needs two responses to one prompt")
        check(self.temperature == 1.0, "online DPO scores responses under π itself: keep temperature 1.0")
        check(self.updates_per_step == 1, "online DPO takes one optimizer step per rollout: leave inner_epochs "
                                          "and minibatches at 1")
        check(self.nll_weight >= 0, "nll_weight must be ≥ 0")
        try:
            spec = get_preference_loss(self.loss)
        except ValueError as e:
            raise ConfigError(f"'loss': {e}") from None
        check(self.beta is None or "beta" in spec.hyperparameters, f"loss '{self.loss}' has no β")
        check(self.beta is None or self.beta > 0, "beta must be > 0")


def best_worst_pairs(scores: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(chosen rows, rejected rows): per group of `group_size` consecutive rows, the first row
    with the highest score and the first with the lowest, when they differ. scores: (B,)."""
    groups = scores.view(-1, group_size)
    best, worst = groups.argmax(dim=1), groups.argmin(dim=1)
    keep = groups.max(dim=1).values > groups.min(dim=1).values
    offset = torch.arange(groups.shape[0]) * group_size
    return (offset + best)[keep], (offset + worst)[keep]


def response_sums(logprobs: Tensor, mask: Tensor) -> Tensor:
    """Σ_t over each response's tokens: (B, T) → (B,) float32."""
    return (logprobs.float() * mask).sum(-1)


def pair_sides(per_row: Tensor) -> Tensor:
    """(2b,) values of rows laid out c₀ r₀ c₁ r₁ … → [chosen…, rejected…] (`pair_loss`'s layout)."""
    return per_row.view(-1, 2).t().flatten()


def pair_loss(cfg: OnlineDPOConfig, policy: Tensor, ref: Tensor, lengths: Tensor, b: int
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of b pairs from (2b,) summed log-probs laid out [chosen…, rejected…]: (b,)."""
    spec = get_preference_loss(cfg.loss)
    hyperparameters = spec.with_defaults({"beta": cfg.beta})
    inputs = PairLogps(policy[:b], policy[b:], lengths[:b], lengths[b:],
                       ref_chosen=ref[:b] if spec.needs_reference else None,
                       ref_rejected=ref[b:] if spec.needs_reference else None)
    losses, metrics = spec.compute(inputs, hyperparameters)
    if cfg.nll_weight:
        nll = preferred_nll(policy[:b], policy[b:], lengths[:b], lengths[b:])
        metrics = {**metrics, "nll/preferred": nll.detach()}
        losses = losses + cfg.nll_weight * nll
    return losses, metrics


def update(run: OnlineRun, rollout: Rollout, chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    """Step 4: one optimizer step on the mean loss of the pairs, in micro-batches of pairs.

    A micro-batch's rows are its pairs' sides next to each other (c₀ r₀ c₁ r₁ …), so with
    `shares_prompts` the two responses of a pair store their prompt once (`Rollout.lm_batch`)."""
    cfg, engine = run.cfg, run.engine
    per_micro = max(1, cfg.batch_size // 2)               # batch_size counts sequences: 2 per pair
    n = len(chosen)
    sums: dict[str, float] = {}
    run.module.train()
    starts = list(range(0, n, per_micro))
    for i, start in enumerate(starts):
        c, r = chosen[start:start + per_micro], rejected[start:start + per_micro]
        b = len(c)
        part = rollout.select(torch.stack([c, r], dim=1).flatten())
        with engine.accumulate(last=i == len(starts) - 1), engine.autocast():
            out = policy_outputs(run.module, part, run.pad_id, temperature=1.0, share_prompts=cfg.shares_prompts)
            losses, metrics = pair_loss(cfg, pair_sides(response_sums(out.logprobs, part.response_mask)),
                                        pair_sides(response_sums(part.ref_logprobs, part.response_mask)),
                                        pair_sides(part.response_mask.sum(-1)), b)
            loss = losses.sum() / n
        engine.backward(loss)
        for key, v in {"loss": losses.detach(), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + float(v.float().sum()) / n
    sums["grad_norm"] = engine.optimizer_step()
    return sums


def train_step(run: OnlineRun, step: int) -> tuple[dict[str, float], int]:
    """Steps 1–4 of the module docstring; returns (metrics, tokens)."""
    t0 = time.perf_counter()
    rollout = online.collect(run, step, policy_pass=False)
    chosen, rejected = best_worst_pairs(rollout.scores, rollout.group_size)
    t1 = time.perf_counter()
    metrics = rollout_metrics(rollout)
    metrics["pairs"] = float(len(chosen))
    if len(chosen):
        metrics.update(update(run, rollout, chosen, rejected))
    metrics.update({"time/rollout_s": t1 - t0, "time/update_s": time.perf_counter() - t1})
    return mean_across(run.engine, metrics), rollout.num_tokens


def run_online_dpo(cfg: OnlineDPOConfig) -> dict:
    """Train; returns {"final": path, "metrics": last step's metrics}."""
    tokenizer, prompts, reward = load_inputs(cfg)
    run = start_run(cfg, OnlineRun, tokenizer=tokenizer, prompts=prompts, reward=reward, critic="none",
                    description=f"online {cfg.loss}")
    final, metrics = online.train(run, lambda step: train_step(run, step))
    return {"final": str(final), "metrics": metrics}
