"""Critic-free policy gradient: GRPO, RLOO, ReMax and REINFORCE, top to bottom.

All four maximize E[r(x, y)] − β·KL(π ‖ π_ref) with the score-function gradient
E[A · ∇ log π(y | x)] and differ only in the baseline inside the advantage A:

    grpo       A_i = (r_i − mean_g) / std_g          group of k samples of one prompt
    rloo       A_i = r_i − mean of the other k − 1   leave-one-out, unbiased
    remax      A_i = r_i − r(x, greedy(x))           the greedy decode of the same prompt
    reinforce  A_i = r_i − b,  b ← moving average    of past batch-mean rewards
    reinforce++ A_{i,t} = whiten_batch(Σ_{s≥t} r_{i,s})  token rewards with −β·kl_t, no group

The GRPO family's variants are options of the same recipe (docs/RL-ALGORITHMS.md maps each
paper to its flags): `scale_rewards` (group | batch | none: TRL, Dr. GRPO), `ratio_level`
sequence (GSPO), `clip_low` / `clip_high` (DAPO's clip-higher), `constant_length`
(Dr. GRPO), `dynamic_sampling` and `overlong_length` / `overlong_cache` (DAPO).

One step:
1. take the step's prompts (a pure function of seed and step);
2. rollout: sample k responses per prompt, score them, old log-probs from the policy and
   reference log-probs from π_ref (`rlhfkit.rollout.rollout`); ReMax also decodes greedily;
3. reward shaping: DAPO's overlong penalty when asked; KL placement: in the reward
   (r ← r − β Σ_t k1_t per response; per token for REINFORCE++) or in the loss;
4. advantages: the algorithm's estimator, the one line that differs (`ALGORITHMS`); with
   dynamic sampling, the groups whose rewards are all equal are then dropped;
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

import torch
from torch import Tensor

from rlhfkit.config import check, param
from rlhfkit.losses.policy import (
    aggregate,
    constant_length_normalized,
    grpo_loss,
    gspo_loss,
)
from rlhfkit.ops.advantages import (
    REWARD_SCALES,
    MovingAverageBaseline,
    baseline_advantages,
    batch_normalized_returns,
    informative_rows,
    kl_penalized_rewards,
    leave_one_out_advantages,
    overlong_penalty,
    scaled_group_advantages,
)
from rlhfkit.ops.kl import get_kl_estimator
from rlhfkit.recipes import online
from rlhfkit.recipes.online import OnlineConfig, OnlineRun, load_inputs, mean_across, sampler_weighted, start_run
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.rollout import ResponseOutputs, Rollout, pack_left, rollout_metrics, unpack_left


# ============================================================================ the algorithms
@dataclass(frozen=True)
class BaselineInputs:
    """What the advantage estimators may use besides the (B,) scores."""

    group_size: int
    scale_rewards: str               # GRPO: divide by the std of the group, the batch, or nothing
    greedy_scores: Tensor | None     # ReMax: (B,) score of the greedy decode of each row's prompt
    moving_baseline: float           # REINFORCE: the average *before* this batch
    token_rewards: Tensor | None = None   # REINFORCE++: (B, T) score on the last token, −β·kl_t on each
    mask: Tensor | None = None            # REINFORCE++: (B, T) the response mask


def _grpo(scores: Tensor, x: BaselineInputs) -> Tensor:
    return scaled_group_advantages(scores, x.group_size, scale=x.scale_rewards)


def _rloo(scores: Tensor, x: BaselineInputs) -> Tensor:
    return leave_one_out_advantages(scores, x.group_size)


def _remax(scores: Tensor, x: BaselineInputs) -> Tensor:
    return baseline_advantages(scores, x.greedy_scores)


def _reinforce(scores: Tensor, x: BaselineInputs) -> Tensor:
    return baseline_advantages(scores, x.moving_baseline)


def _reinforce_pp(scores: Tensor, x: BaselineInputs) -> Tensor:
    return batch_normalized_returns(x.token_rewards, x.mask)


@dataclass(frozen=True)
class Algorithm:
    advantages: Callable[[Tensor, BaselineInputs], Tensor]
    kl_placement: str        # where the KL goes unless the config says otherwise
    min_group_size: int
    greedy_baseline: bool = False    # decode each prompt greedily too (ReMax)
    moving_baseline: bool = False    # fold each batch into the moving average after use (REINFORCE)
    token_rewards: bool = False      # per-token rewards (score + −β·kl_t), per-token advantages (REINFORCE++)
    command: str = ""                # the `rlhf` command that runs it, when not its own name


ALGORITHMS: dict[str, Algorithm] = {
    "grpo": Algorithm(_grpo, kl_placement="loss", min_group_size=2),
    "rloo": Algorithm(_rloo, kl_placement="reward", min_group_size=2),
    "remax": Algorithm(_remax, kl_placement="reward", min_group_size=1, greedy_baseline=True),
    "reinforce": Algorithm(_reinforce, kl_placement="reward", min_group_size=1, moving_baseline=True),
    "reinforce++": Algorithm(_reinforce_pp, kl_placement="reward", min_group_size=1, token_rewards=True,
                             command="reinforce"),
}
# Grouped estimators: their advantage is relative to the other samples of the same prompt.
GROUPED = ("grpo", "rloo")
# GSPO's clip range (ε_low, ε_high): a sequence ratio stays within a few 1e-4 of 1.
GSPO_CLIP = (3e-4, 4e-4)
LOSSES = {"token": grpo_loss, "sequence": gspo_loss}


def command_of(algorithm: str) -> str:
    """The `rlhf` command that runs `algorithm` (`reinforce` for reinforce++)."""
    return ALGORITHMS[algorithm].command or algorithm


# ============================================================================ config
@dataclass(frozen=True)
class PolicyGradientConfig(OnlineConfig):
    kind = "policy-gradient"
    algorithm: str = param("grpo", "advantage estimator", choices=tuple(ALGORITHMS))
    kl_placement: str = param("auto", "KL to the reference in the loss (k3 term) or in the reward "
                                      "(r − β Σ_t k1); auto: loss for grpo, reward for the others",
                              choices=("auto", "loss", "reward"))
    scale_advantages: bool = param(True, "grpo: divide by the group's std (false = Dr. GRPO)")
    scale_rewards: str = param("auto", "grpo: divide the group-centred rewards by the std of the group, of the "
                                       "whole batch, or not at all (auto: group; none with scale_advantages=false)",
                               choices=("auto", *REWARD_SCALES))
    ratio_level: str = param("token", "importance ratio per token (PPO, GRPO) or per response, the geometric "
                                      "mean of its token ratios (GSPO)", choices=tuple(LOSSES))
    clip_low: float = param(0.0, "ε_low: clip the ratio below at 1 − ε_low (0 = clip_eps; with "
                                 "ratio_level=sequence GSPO's 3e-4)")
    clip_high: float = param(0.0, "ε_high: clip the ratio above at 1 + ε_high, > ε_low is DAPO's clip-higher "
                                  "(0 = ε_low; with ratio_level=sequence GSPO's 4e-4)")
    constant_length: int = param(0, "Dr. GRPO: divide each token's loss by this constant L (the max response "
                                    "length); with aggregation seq-mean-token-sum the loss is Σ ℓ / (B·L) (0 = off)")
    dynamic_sampling: bool = param(False, "DAPO: drop the groups whose rewards are all equal before the update "
                                          "(not refilled: the batch shrinks; logged as "
                                          "dynamic_sampling/dropped_groups)")
    overlong_length: int = param(0, "DAPO overlong punishment: reward − (L − (overlong_length − overlong_cache)) / "
                                    "overlong_cache past overlong_length − overlong_cache tokens, −1 past "
                                    "overlong_length (0 = off)")
    overlong_cache: int = param(0, "DAPO: tokens before overlong_length over which the penalty grows to 1")
    baseline_decay: float = param(0.9, "reinforce: decay of the moving-average baseline")
    output_dir: str = param("runs/policy-gradient", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")

    def validate(self) -> None:
        super().validate()
        algo = ALGORITHMS[self.algorithm]
        check(self.samples_per_prompt >= algo.min_group_size,
              f"{self.algorithm} needs samples_per_prompt ≥ {algo.min_group_size}")
        check(0 <= self.baseline_decay < 1, "baseline_decay must be in [0, 1)")
        check(self.scale_rewards == "auto" or self.algorithm == "grpo", "scale_rewards applies to grpo only")
        check(self.scale_rewards == "auto" or self.scale_advantages,
              "scale_advantages=false is scale_rewards=none: give only scale_rewards")
        check(self.ratio_level == "token" or not ALGORITHMS[self.algorithm].token_rewards,
              f"ratio_level=sequence needs one advantage per response; {self.algorithm} has one per token")
        check(self.clip_low == 0 or 0 < self.clip_low < 1, "clip_low must be in (0, 1), or 0 for the default")
        check(self.clip_high >= 0, "clip_high must be > 0, or 0 for the default")
        check(not self.dynamic_sampling or self.algorithm in GROUPED,
              f"dynamic_sampling drops groups of samples: it needs {' or '.join(GROUPED)}, not {self.algorithm}")
        check(not self.dynamic_sampling or self.minibatches == 1,
              "dynamic_sampling needs minibatches = 1 (a filtered batch need not split evenly)")
        check(self.constant_length >= 0, "constant_length must be ≥ 0 (0 = off)")
        check(self.constant_length == 0 or self.aggregation == "seq-mean-token-sum",
              "constant_length needs aggregation=seq-mean-token-sum (then the loss is Σ ℓ / (B·L))")
        check(not self.env or not algo.greedy_baseline, f"{self.algorithm}'s greedy baseline is a single-turn "
                                                        "decode: use grpo, rloo or reinforce with env")
        check(self.overlong_length >= 0, "overlong_length must be ≥ 0 (0 = off)")
        check(0 <= self.overlong_cache <= self.overlong_length,
              "overlong_cache must be in [0, overlong_length] (both 0 = off)")
        check(self.overlong_length == 0 or self.overlong_length - self.overlong_cache < self.max_new_tokens,
              "the overlong penalty would start past max_new_tokens and never apply: lower overlong_length")

    @property
    def clip_range(self) -> tuple[float, float]:
        """(ε_low, ε_high) of the ratio clip: the given ones, else clip_eps (symmetric) per token,
        GSPO's (3e-4, 4e-4) per sequence."""
        sequence = self.ratio_level == "sequence"
        low = self.clip_low or (GSPO_CLIP[0] if sequence else self.clip_eps)
        paper_high = GSPO_CLIP[1] if sequence and self.clip_low == 0 else low
        return low, self.clip_high or paper_high

    @property
    def resolved_scale_rewards(self) -> str:
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "group" if self.scale_advantages else "none"

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
    not a reward penalty). Saves one forward of every rollout.
    The rollout keeps its own pass with dynamic sampling too: its log-probs then cover the
    groups the update drops, for the logged KL and entropy."""
    return (cfg.updates_per_step == 1 and not cfg.dynamic_sampling
            and (cfg.resolved_kl_placement != "reward" or cfg.kl_coef == 0))


def kl_in_reward(cfg: PolicyGradientConfig) -> float:
    """β of the KL penalty in the reward (0 when the KL goes in the loss)."""
    return cfg.kl_coef if cfg.resolved_kl_placement == "reward" else 0.0


def shaped_scores(run: PolicyGradientRun, rollout: Rollout) -> Tensor:
    """Step 3: r + DAPO's overlong penalty (when overlong_length > 0), then − β Σ_t k(old, ref)
    per response when the KL is placed in the reward (REINFORCE++ puts it per token, step 4)."""
    cfg = run.cfg
    scores = rollout.scores
    if cfg.overlong_length > 0:
        lengths = rollout.response_mask.sum(-1)
        scores = scores + overlong_penalty(lengths, max_length=cfg.overlong_length,
                                           cache=cfg.overlong_cache).to(scores.dtype)
    if kl_in_reward(cfg) == 0 or ALGORITHMS[cfg.algorithm].token_rewards:
        return scores
    kl = get_kl_estimator(cfg.resolved_kl_estimator)(rollout.old_logprobs, rollout.ref_logprobs)
    return scores - cfg.kl_coef * (kl * rollout.response_mask).sum(-1)


def token_rewards(cfg: PolicyGradientConfig, rollout: Rollout, scores: Tensor) -> Tensor:
    """REINFORCE++'s per-token rewards (B, T): the score on the last token, −β·kl_t on every one."""
    # Without a KL in the reward the rollout may have no log π_old yet; β = 0 makes it irrelevant.
    # Over the model's tokens packed left (a multi-turn mask has holes where tools spoke).
    logp = rollout.old_logprobs if rollout.old_logprobs is not None else rollout.ref_logprobs
    mask = rollout.response_mask
    rewards, _ = kl_penalized_rewards(scores, pack_left(logp, mask), pack_left(rollout.ref_logprobs, mask),
                                      pack_left(mask, mask), kl_coef=kl_in_reward(cfg), kl_clamp=None,
                                      estimator=cfg.resolved_kl_estimator)
    return unpack_left(rewards, mask)


def advantages(run: PolicyGradientRun, rollout: Rollout, scores: Tensor, greedy_scores: Tensor | None) -> Tensor:
    """Step 4: the algorithm's estimator. REINFORCE reads its baseline, then folds this batch in."""
    cfg = run.cfg
    algorithm = ALGORITHMS[cfg.algorithm]
    per_token = token_rewards(cfg, rollout, scores) if algorithm.token_rewards else None
    inputs = BaselineInputs(group_size=cfg.samples_per_prompt, scale_rewards=cfg.resolved_scale_rewards,
                            greedy_scores=greedy_scores, moving_baseline=run.baseline.value,
                            token_rewards=per_token, mask=rollout.response_mask)
    adv = algorithm.advantages(scores, inputs)
    if algorithm.moving_baseline:
        run.baseline.update(scores)
    return adv


def informative_groups(run: PolicyGradientRun, rollout: Rollout) -> tuple[Rollout | None, dict[str, float]]:
    """Step 4, DAPO's dynamic sampling: the rollout without the groups whose raw rewards are
    all equal (their group-relative advantages are all 0), and the counts. Nothing is sampled
    to refill them. None when no process kept a group: the step makes no update. A process that
    kept none while others kept some updates on its whole batch (all its advantages are 0), so
    that every process joins the gradient all-reduce."""
    k = run.cfg.samples_per_prompt
    keep = informative_rows(rollout.scores, k)
    groups = rollout.num_rows // k
    metrics = {"dynamic_sampling/dropped_groups": float(groups - int(keep.sum()) // k),
               "dynamic_sampling/kept_frac": float(keep.float().mean())}
    if run.engine.sum_across(float(keep.sum())) == 0:
        return None, {**metrics, "dynamic_sampling/skipped_update": 1.0}
    if not bool(keep.any()):
        keep = torch.ones_like(keep)
    return rollout.select(torch.nonzero(keep).flatten()), {**metrics, "dynamic_sampling/skipped_update": 0.0}


def loss(cfg: PolicyGradientConfig, part: Rollout, out: ResponseOutputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 5's loss on one micro-batch: the clipped surrogate on the sequence advantage, plus
    β·KL when the KL is placed in the loss (`grpo_loss`). On-policy the ratio is 1, clipping
    never acts, and the gradient is REINFORCE's, −A ∇ log π."""
    beta = cfg.kl_coef if cfg.resolved_kl_placement == "loss" else 0.0
    low, high = cfg.clip_range
    surrogate, penalty, metrics = LOSSES[cfg.ratio_level](
        out.logprobs, part.old_logprobs, part.ref_logprobs, part.advantages, part.response_mask,
        clip_eps=low, clip_eps_high=high, kl_coef=beta, kl_estimator=cfg.resolved_kl_estimator)
    if cfg.constant_length:
        surrogate = constant_length_normalized(surrogate, cfg.constant_length)
        penalty = constant_length_normalized(penalty, cfg.constant_length)
    surrogate = sampler_weighted(surrogate, part, cfg.sampler_is_cap, metrics)  # the KL term stays unweighted
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
    kept, extra = informative_groups(run, rollout) if run.cfg.dynamic_sampling else (rollout, {})
    t1 = time.perf_counter()
    # The entropy is a metric here: from the update's forward when the rollout skipped its own.
    update_metrics: dict[str, float] = {}
    if kept is not None:
        update_metrics, kept = online.update(run, kept, step, functools.partial(loss, run.cfg), entropy_grad=False)
    # With dynamic sampling the rollout made its own pass: its metrics cover every sample.
    metrics = rollout_metrics(rollout if run.cfg.dynamic_sampling else kept)
    metrics.update(update_metrics)
    metrics.update(extra)
    if run.cfg.overlong_length > 0:
        metrics["reward/shaped"] = float(scores.mean())
    counted = adv[rollout.response_mask.bool()] if adv.dim() == 2 else adv
    metrics.update({
        "advantage/std": float(counted.std()) if counted.numel() > 1 else 0.0,
        "advantage/zero_frac": float((counted == 0).float().mean()),
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
