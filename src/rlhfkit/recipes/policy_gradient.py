"""Critic-free policy gradient: GRPO, RLOO, ReMax and REINFORCE, top to bottom.

All four maximize E[r(x, y)] − β·KL(π ‖ π_ref) with the score-function gradient
E[A · ∇ log π(y | x)] and differ only in the baseline inside the advantage A:

    grpo       A_i = (r_i − mean_g) / std_g          group of k samples of one prompt
    rloo       A_i = r_i − mean of the other k − 1   leave-one-out, unbiased
    remax      A_i = r_i − r(x, greedy(x))           the greedy decode of the same prompt
    reinforce  A_i = r_i − b,  b ← moving average    of past batch-mean rewards

One step:
1. take the step's prompts (a pure function of seed and step);
2. rollout: sample k responses per prompt, score them, old log-probs from the policy and
   reference log-probs from π_ref (`rlhfkit.rollout.rollout`); ReMax also decodes greedily;
3. KL placement: in the reward (r ← r − β Σ_t k1_t per response) or in the loss;
4. advantages: the algorithm's estimator, the one line that differs (`ALGORITHMS`);
5. update: `inner_epochs` passes of `minibatches` optimizer steps on the clipped surrogate
   with β·KL in the loss when placed there (`grpo_loss`). With one pass and one minibatch
   the ratio is exactly 1, clipping never acts, and the gradient is REINFORCE's,
   −A ∇ log π (`reinforce_loss`), aggregated the same way;
6. log the diagnostics; checkpoint the baseline and reward normalization with the model.

The rollout, the micro-batched update and the step loop are the shared online loop
(`rlhfkit.recipes.online`); this file holds what the four algorithms add: where the KL
goes, the advantage estimators and the loss.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from rlhfkit.config import check, param
from rlhfkit.losses.policy import aggregate, grpo_loss
from rlhfkit.ops.advantages import (
    MovingAverageBaseline,
    baseline_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
)
from rlhfkit.ops.kl import get_kl_estimator
from rlhfkit.recipes import online
from rlhfkit.recipes.online import OnlineConfig, OnlineRun, load_inputs, mean_across, start_run
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.rollout import ResponseOutputs, Rollout, rollout_metrics


# ============================================================================ the algorithms
@dataclass(frozen=True)
class BaselineInputs:
    """What the advantage estimators may use besides the (B,) scores."""

    group_size: int
    scale: bool                      # GRPO: divide by the group std
    greedy_scores: Tensor | None     # ReMax: (B,) score of the greedy decode of each row's prompt
    moving_baseline: float           # REINFORCE: the average *before* this batch


def _grpo(scores: Tensor, x: BaselineInputs) -> Tensor:
    return group_normalized_advantages(scores, x.group_size, scale=x.scale)


def _rloo(scores: Tensor, x: BaselineInputs) -> Tensor:
    return leave_one_out_advantages(scores, x.group_size)


def _remax(scores: Tensor, x: BaselineInputs) -> Tensor:
    return baseline_advantages(scores, x.greedy_scores)


def _reinforce(scores: Tensor, x: BaselineInputs) -> Tensor:
    return baseline_advantages(scores, x.moving_baseline)


@dataclass(frozen=True)
class Algorithm:
    advantages: Callable[[Tensor, BaselineInputs], Tensor]
    kl_placement: str        # where the KL goes unless the config says otherwise
    min_group_size: int
    greedy_baseline: bool = False    # decode each prompt greedily too (ReMax)
    moving_baseline: bool = False    # fold each batch into the moving average after use (REINFORCE)


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(_grpo, kl_placement="loss", min_group_size=2),
    "rloo": Algorithm(_rloo, kl_placement="reward", min_group_size=2),
    "remax": Algorithm(_remax, kl_placement="reward", min_group_size=1, greedy_baseline=True),
    "reinforce": Algorithm(_reinforce, kl_placement="reward", min_group_size=1, moving_baseline=True),
}


# ============================================================================ config
@dataclass(frozen=True)
class PolicyGradientConfig(OnlineConfig):
    kind = "policy-gradient"
    algorithm: str = param("grpo", "advantage estimator", choices=tuple(ALGORITHMS))
    kl_placement: str = param("auto", "KL to the reference in the loss (k3 term) or in the reward "
                                      "(r − β Σ_t k1); auto: loss for grpo, reward for the others",
                              choices=("auto", "loss", "reward"))
    scale_advantages: bool = param(True, "grpo: divide by the group's std (false = Dr. GRPO)")
    baseline_decay: float = param(0.9, "reinforce: decay of the moving-average baseline")
    output_dir: str = param("runs/policy-gradient", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")

    def validate(self) -> None:
        super().validate()
        algo = ALGORITHMS[self.algorithm]
        check(self.samples_per_prompt >= algo.min_group_size,
              f"{self.algorithm} needs samples_per_prompt ≥ {algo.min_group_size}")
        check(0 <= self.baseline_decay < 1, "baseline_decay must be in [0, 1)")

    @property
    def resolved_kl_placement(self) -> str:
        return ALGORITHMS[self.algorithm].kl_placement if self.kl_placement == "auto" else self.kl_placement

    @property
    def resolved_kl_estimator(self) -> str:
        if self.kl_estimator != "auto":
            return self.kl_estimator
        return "k3" if self.resolved_kl_placement == "loss" else "k1"


@dataclass(frozen=True)
class GRPOConfig(PolicyGradientConfig):
    kind = "grpo"
    algorithm: str = param("grpo", "advantage estimator (set by the command)", choices=tuple(ALGORITHMS))
    output_dir: str = param("runs/grpo", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")


@dataclass(frozen=True)
class RLOOConfig(PolicyGradientConfig):
    kind = "rloo"
    algorithm: str = param("rloo", "advantage estimator (set by the command)", choices=tuple(ALGORITHMS))
    output_dir: str = param("runs/rloo", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")


@dataclass(frozen=True)
class ReMaxConfig(PolicyGradientConfig):
    kind = "remax"
    algorithm: str = param("remax", "advantage estimator (set by the command)", choices=tuple(ALGORITHMS))
    samples_per_prompt: int = param(1, "responses sampled per prompt", old_names=("group_size",))
    output_dir: str = param("runs/remax", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")


@dataclass(frozen=True)
class ReinforceConfig(PolicyGradientConfig):
    kind = "reinforce"
    algorithm: str = param("reinforce", "advantage estimator (set by the command)", choices=tuple(ALGORITHMS))
    samples_per_prompt: int = param(1, "responses sampled per prompt", old_names=("group_size",))
    output_dir: str = param("runs/reinforce", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")


# ============================================================================ the run
@dataclass
class PolicyGradientRun(OnlineRun):
    """The shared run, plus REINFORCE's moving-average baseline (checkpointed)."""

    baseline: MovingAverageBaseline

    def state(self) -> dict:
        return {"baseline": self.baseline.state_dict(), **super().state()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "baseline" in state:
            self.baseline.load_state_dict(state["baseline"])


def setup_run(cfg: PolicyGradientConfig) -> PolicyGradientRun:
    tokenizer, prompts, reward = load_inputs(cfg)
    return start_run(cfg, PolicyGradientRun, tokenizer=tokenizer, prompts=prompts, reward=reward, critic="none",
                     description=cfg.algorithm, baseline=MovingAverageBaseline(cfg.baseline_decay))


# ============================================================================ one step
def collect(run: PolicyGradientRun, step: int) -> tuple[Rollout, Tensor | None]:
    """Steps 1–2: sample and score the step's rollout; ReMax also returns the greedy
    decode's score for each row, (B,). Scored in one call, so a normalized reward treats
    the greedy responses exactly like the samples."""
    cfg = run.cfg
    greedy = None
    if ALGORITHMS[cfg.algorithm].greedy_baseline:
        greedy = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, n=1,
                                batch_size=cfg.gen_batch_size)
    rollout = online.collect(run, step, policy_pass=not old_logprobs_from_update(cfg), baseline=greedy)
    return rollout, rollout.baseline_scores


def old_logprobs_from_update(cfg: PolicyGradientConfig) -> bool:
    """True when the rollout needs no policy forward of its own: with one update per rollout the
    policy is unchanged until that update, so its training forward gives exactly log π_old
    (ratio ≡ 1, the gradient of log π), and nothing before it reads them (the KL is a loss term,
    not a reward penalty). Saves one forward of every rollout."""
    return cfg.updates_per_step == 1 and (cfg.resolved_kl_placement != "reward" or cfg.kl_coef == 0)


def shaped_scores(run: PolicyGradientRun, rollout: Rollout) -> Tensor:
    """Step 3: r − β Σ_t k(old, ref) per response when the KL is placed in the reward."""
    cfg = run.cfg
    if cfg.resolved_kl_placement != "reward" or cfg.kl_coef == 0:
        return rollout.scores
    kl = get_kl_estimator(cfg.resolved_kl_estimator)(rollout.old_logprobs, rollout.ref_logprobs)
    return rollout.scores - cfg.kl_coef * (kl * rollout.response_mask).sum(-1)


def advantages(run: PolicyGradientRun, rollout: Rollout, scores: Tensor, greedy_scores: Tensor | None) -> Tensor:
    """Step 4: the algorithm's estimator. REINFORCE reads its baseline, then folds this batch in."""
    cfg = run.cfg
    inputs = BaselineInputs(group_size=cfg.samples_per_prompt, scale=cfg.scale_advantages,
                            greedy_scores=greedy_scores, moving_baseline=run.baseline.value)
    algorithm = ALGORITHMS[cfg.algorithm]
    adv = algorithm.advantages(scores, inputs)
    if algorithm.moving_baseline:
        run.baseline.update(scores)
    return adv


def loss(cfg: PolicyGradientConfig, part: Rollout, out: ResponseOutputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 5's loss on one micro-batch: the clipped surrogate on the sequence advantage, plus
    β·KL when the KL is placed in the loss (`grpo_loss`). On-policy the ratio is 1, clipping
    never acts, and the gradient is REINFORCE's, −A ∇ log π."""
    beta = cfg.kl_coef if cfg.resolved_kl_placement == "loss" else 0.0
    surrogate, penalty, metrics = grpo_loss(out.logprobs, part.old_logprobs, part.ref_logprobs, part.advantages,
                                            part.response_mask, clip_eps=cfg.clip_eps, kl_coef=beta,
                                            kl_estimator=cfg.resolved_kl_estimator)
    metrics["policy_loss"] = aggregate(surrogate.detach(), part.response_mask, cfg.aggregation)
    # The loss's "kl" is the in-loss penalty term; "kl" in the logs is the rollout's KL to π_ref.
    kl = metrics.pop("kl")
    if beta != 0:
        metrics["kl_penalty"] = kl
    return surrogate + penalty, metrics


def train_step(run: PolicyGradientRun, step: int) -> tuple[dict[str, float], int]:
    """One rollout step (steps 1–5 of the module docstring); returns (metrics, tokens)."""
    t0 = time.perf_counter()
    rollout, greedy_scores = collect(run, step)
    scores = shaped_scores(run, rollout)
    adv = advantages(run, rollout, scores, greedy_scores)
    rollout = dataclasses.replace(rollout, advantages=adv)
    t1 = time.perf_counter()
    # The entropy is a metric here: from the update's forward when the rollout skipped its own.
    update_metrics, rollout = online.update(run, rollout, step, functools.partial(loss, run.cfg), entropy_grad=False)
    metrics = rollout_metrics(rollout)
    metrics.update(update_metrics)
    metrics.update({
        "advantage/std": float(adv.std()) if adv.numel() > 1 else 0.0,
        "advantage/zero_frac": float((adv == 0).float().mean()),
        "time/rollout_s": t1 - t0,
        "time/update_s": time.perf_counter() - t1,
    })
    if greedy_scores is not None:
        metrics["baseline/greedy_reward"] = float(greedy_scores.mean())
    if ALGORITHMS[run.cfg.algorithm].moving_baseline:
        metrics["baseline/moving_average"] = run.baseline.value
    return mean_across(run.engine, metrics), rollout.num_tokens


# ============================================================================ the recipe
def run_policy_gradient(cfg: PolicyGradientConfig) -> dict:
    """Train; returns {"final": path, "metrics": last step's metrics}."""
    run = setup_run(cfg)
    final, metrics = online.train(run, lambda step: train_step(run, step))
    return {"final": str(final), "metrics": metrics}
