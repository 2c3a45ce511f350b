"""Reward-model losses: Bradley–Terry with soft labels, margins and mis-click noise;
reward centering; ensemble reductions.

All functions are pure: explicit tensors in, `(per-pair loss (B,), per-pair metrics)` out
(ensemble helpers return plain tensors), so a recipe sums them over a step without undoing
any mean. Rewards are one scalar per response, shape (B,). The loss is computed in
float32 whatever the input dtype, because log σ of bf16 differences loses the digits that
distinguish a confident model from a certain one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.config import did_you_mean
from rlhfkit.data.schemas import TIE_TOLERANCE

ENSEMBLE_MODES: tuple[str, ...] = ("mean", "min", "mean_minus_std")


def _check_pair_shapes(chosen: Tensor, rejected: Tensor, **optional: Tensor | None) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must both have shape (B,), got "
                         f"{tuple(chosen.shape)} and {tuple(rejected.shape)}")
    for name, value in optional.items():
        if value is not None and value.shape != chosen.shape:
            raise ValueError(f"{name} must have shape {tuple(chosen.shape)} like the rewards, "
                             f"got {tuple(value.shape)}")


def pairwise_metrics(chosen_scores: Tensor, rejected_scores: Tensor,
                     label: Tensor | None = None) -> dict[str, Tensor]:
    """Per-pair diagnostics shared by every pairwise loss (reward models and the DPO family).

    chosen_scores, rejected_scores: (B,) rewards (explicit or implicit). label: (B,)
    P(chosen ≻ rejected), 1 when None. Returns detached float32 (B,) tensors, one value per
    pair, so a caller sums them over any number of batches:

    - ``rewards/chosen``, ``rewards/rejected``: the score of each side;
    - ``rewards/margin``: chosen − rejected;
    - ``rewards/accuracy``: 1 where the pair is not a tie and the score difference has the
      sign of (label − ½), i.e. the model prefers what the annotators preferred; else 0;
    - ``rewards/num_non_tie``: 1 where the pair is not a tie. Σ accuracy / Σ num_non_tie is
      the accuracy over non-tie pairs (see `non_tie_accuracy`).
    """
    chosen_scores = chosen_scores.detach().float()
    rejected_scores = rejected_scores.detach().float()
    difference = chosen_scores - rejected_scores
    if label is None:
        direction = torch.ones_like(difference)
    else:
        direction = label.detach().float() - 0.5
        direction = torch.where(direction.abs() <= TIE_TOLERANCE, torch.zeros_like(direction),
                                direction.sign())
    non_tie = direction != 0
    correct = (difference * direction > 0) & non_tie
    return {
        "rewards/chosen": chosen_scores,
        "rewards/rejected": rejected_scores,
        "rewards/margin": difference,
        "rewards/accuracy": correct.float(),
        "rewards/num_non_tie": non_tie.float(),
    }


def non_tie_accuracy(metrics: dict[str, Tensor]) -> Tensor:
    """Σ correct / Σ non-tie over the pairs of `pairwise_metrics`; 0 when every pair is a tie."""
    return metrics["rewards/accuracy"].sum() / metrics["rewards/num_non_tie"].sum().clamp(min=1)


def _log_prob_preferred(delta: Tensor, noise: float) -> Tensor:
    """log P(chosen ≻ rejected) under the mis-click model, stable for any Δ.

    log[(1−ε)σ(Δ) + εσ(−Δ)] = logsumexp(log(1−ε) + log σ(Δ), log ε + log σ(−Δ)).
    """
    if noise == 0.0:
        return F.logsigmoid(delta)
    return torch.logaddexp(math.log1p(-noise) + F.logsigmoid(delta),
                           math.log(noise) + F.logsigmoid(-delta))


def bradley_terry_loss(r_chosen: Tensor, r_rejected: Tensor, *, label: Tensor | None = None,
                       margin: Tensor | None = None, noise: float = 0.0
                       ) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry cross-entropy between the model's P(chosen ≻ rejected) and the label.

        Δ = r_c − r_r − m
        P = (1 − ε)·σ(Δ) + ε·σ(−Δ)                     (ε = 0: plain Bradley–Terry, P = σ(Δ))
        loss_i = −[ l·log P + (1 − l)·log(1 − P) ]      one value per pair: (B,)

    Shapes: r_chosen, r_rejected: (B,) scalar rewards. label l: (B,) in [0, 1], the
    annotators' P(chosen ≻ rejected); None means 1 for every pair. 0.5 is a tie: the loss
    is then symmetric in Δ, its gradient is zero at Δ = 0 and pulls Δ toward 0, so a tie
    teaches "these two are equally good" instead of being dropped. margin m: (B,) optional
    required gap (Llama-2 style): the pair only counts as well separated once r_c − r_r > m.

    noise ε in [0, 0.5): the constant mis-click model (Christiano et al., 2017): with
    probability ε the annotator clicks the other response whatever the rewards, so
    1 − P = (1 − ε)·σ(−Δ) + ε·σ(Δ) never falls below ε and a confidently "wrong" label costs
    at most −log ε instead of growing without bound. The paper's phrasing, "responds
    uniformly at random with probability q", is the same model with ε = q/2.

    Returns the per-pair losses (B,) float32 (the caller sums or averages them) and the
    per-pair `pairwise_metrics` of the raw rewards (accuracy ignores the margin: it asks
    which response the model scores higher).
    """
    _check_pair_shapes(r_chosen, r_rejected, label=label, margin=margin)
    if not 0.0 <= noise < 0.5:
        raise ValueError(f"noise (mis-click rate) must be in [0, 0.5), got {noise}")
    delta = r_chosen.float() - r_rejected.float()
    if margin is not None:
        delta = delta - margin.float()
    log_p = _log_prob_preferred(delta, noise)
    log_not_p = _log_prob_preferred(-delta, noise)
    if label is None:
        per_pair = -log_p
    else:
        target = label.float()
        per_pair = -(target * log_p + (1.0 - target) * log_not_p)
    return per_pair, pairwise_metrics(r_chosen, r_rejected, label)


def reward_centering_penalty(r_chosen: Tensor, r_rejected: Tensor, coef: float
                             ) -> tuple[Tensor, dict[str, Tensor]]:
    """coef · (r_c + r_r)² per pair: an auxiliary loss that keeps rewards near zero.

    Bradley–Terry only sees differences, so adding a constant to every reward leaves it
    unchanged; this term pins that free constant at 0 (Eisenstein et al., 2023), which keeps
    rewards comparable across runs and ensemble members. r_chosen, r_rejected: (B,).
    Returns the per-pair penalties (B,) (add them to the per-pair loss) and the unscaled
    (r_c + r_r)² (B,) as ``rewards/centering_sq``.
    """
    _check_pair_shapes(r_chosen, r_rejected)
    if coef < 0:
        raise ValueError(f"reward centering coef must be >= 0, got {coef}")
    squared_sum = (r_chosen.float() + r_rejected.float()) ** 2
    return coef * squared_sum, {"rewards/centering_sq": squared_sum.detach()}


def ensemble_reduce(rewards: Tensor, mode: str = "mean", k: float = 1.0) -> Tensor:
    """One reward per example from an ensemble of E reward models or heads.

    rewards: (E, B). Returns (B,):
      mean            mean over members,
      min             the most pessimistic member (robust to one member being exploited),
      mean_minus_std  mean − k·std, std the sample standard deviation over members
                      (needs E ≥ 2): penalizes examples the members disagree on, where the
                      policy is most likely exploiting an error of the reward model.
    """
    if rewards.dim() != 2:
        raise ValueError(f"ensemble rewards must have shape (E, B), got {tuple(rewards.shape)}")
    if mode == "mean":
        return rewards.mean(0)
    if mode == "min":
        return rewards.min(0).values
    if mode == "mean_minus_std":
        if rewards.shape[0] < 2:
            raise ValueError("mode 'mean_minus_std' needs an ensemble of at least 2 members, "
                             f"got {rewards.shape[0]}")
        return rewards.mean(0) - k * rewards.std(0)
    hint = did_you_mean(mode, ENSEMBLE_MODES)
    raise ValueError(f"unknown ensemble mode '{mode}' (valid: {', '.join(ENSEMBLE_MODES)}){hint}")


def ensemble_summary(rewards: Tensor) -> dict[str, Tensor]:
    """Per-example mean, min, max and spread (sample std; 0 for a single member) of an
    ensemble's rewards. rewards: (E, B) → each value (B,)."""
    if rewards.dim() != 2:
        raise ValueError(f"ensemble rewards must have shape (E, B), got {tuple(rewards.shape)}")
    spread = rewards.std(0) if rewards.shape[0] > 1 else torch.zeros_like(rewards[0])
    return {"mean": rewards.mean(0), "min": rewards.min(0).values,
            "max": rewards.max(0).values, "std": spread}
