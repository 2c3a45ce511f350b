"""Policy-gradient losses for the online methods (PPO, GRPO, GSPO, RLOO, ReMax, REINFORCE).

Pure functions over explicit tensors. Each returns its per-token loss ℓ (B, T) with
detached diagnostics; `aggregate` masks ℓ and turns it into the number to minimize, so the
normalization is written once and visible where the loss is used. Shapes: B responses, T
response tokens (right-padded); `mask` (B, T) is 1 on real response tokens; log-probs are
those of the sampled tokens.

How per-token losses ℓ_{i,t} become one number is the `aggregation`, one table for all:

    "token"               Σ_{i,t} m ℓ / Σ_{i,t} m          every token weighs the same (DAPO)
    "sequence"            Σ_i (Σ_t m ℓ / Σ_t m) / B        every response weighs the same (GRPO)
    "seq-mean-token-sum"  Σ_i Σ_t m ℓ / B                  −A·Σ_t log π per response (REINFORCE)

Dr. GRPO's constant denominator, Σ_{i,t} m ℓ / (B · L_max), is "seq-mean-token-sum" of
`constant_length_normalized` ℓ / L_max.

The denominator (Σ m or B) is the batch's `loss_units`; a recipe that splits a minibatch
into micro-batches (and processes) passes the whole minibatch's units as `normalizer`, so
the micro-batch losses add up to the minibatch's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhfkit.config import did_you_mean
from rlhfkit.ops.advantages import broadcast_sequence_advantages
from rlhfkit.ops.kl import approx_kl, get_kl_estimator
from rlhfkit.ops.stats import masked_mean, masked_sum, masked_var

Metrics = dict[str, Tensor]


def _token_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(per_token, mask)


def _sequence_mean_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    return masked_mean(per_token, mask, dim=1).sum()


def _sequence_sum_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    return masked_sum(per_token, mask, dim=1).sum()


# name → the numerator of the aggregation; the denominator is `loss_units`.
AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token": _token_sum,
    "sequence": _sequence_mean_sum,
    "seq-mean-token-sum": _sequence_sum_sum,
}


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        hint = did_you_mean(aggregation, AGGREGATIONS)
        raise ValueError(f"unknown aggregation '{aggregation}' "
                         f"(choose from {sorted(AGGREGATIONS)}){hint}")


def loss_units(mask: Tensor, aggregation: str) -> Tensor:
    """What an aggregation averages over in this batch: its counted tokens ("token") or its
    responses (the others). mask: (B, T). Returns a 0-dim tensor, ≥ 1."""
    _check_aggregation(aggregation)
    if aggregation == "token":
        return mask.sum().clamp(min=1)
    return torch.tensor(float(mask.shape[0]), device=mask.device).clamp(min=1)


def aggregate(per_token: Tensor, mask: Tensor, aggregation: str,
              normalizer: Tensor | float | None = None) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar by the named rule (see module docstring).

    normalizer: the denominator; None means this batch's own `loss_units` (its mean).
    """
    _check_aggregation(aggregation)
    total = AGGREGATIONS[aggregation](per_token, mask)
    return total / (loss_units(mask, aggregation) if normalizer is None else normalizer)


def constant_length_normalized(per_token: Tensor, max_length: int) -> Tensor:
    """Dr. GRPO's fixed length normalizer: ℓ_{i,t} / L_max, per token.

    Under "seq-mean-token-sum" the loss becomes Σ_{i,t} m ℓ / (B · L_max): the denominator is
    a constant (the configured maximum response length), not the response's own length, so
    a short response's tokens weigh no more than a long one's and the length bias of the
    per-response mean goes away. per_token: (B, T). max_length: L_max ≥ 1. Returns (B, T).
    """
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")
    return per_token / max_length


def _same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"these must share one (B, T) shape: {shapes}")


def _clip_high(clip_eps: float, clip_eps_high: float | None) -> float:
    """ε_high (ε unless given), after checking the clip range."""
    high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (0.0 < clip_eps < 1.0 and high > 0.0):
        raise ValueError(f"clip_eps must be in (0, 1) and clip_eps_high > 0, "
                         f"got {clip_eps}, {high}")
    return high


def _clipped_surrogate(ratio: Tensor, advantages: Tensor, low: float, high: float) -> tuple[Tensor, Tensor]:
    """(−min(ρA, clip(ρ, 1 − low, 1 + high)·A), where clipping acted as 0/1), both (B, T)."""
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * advantages
    # Clipping acts only where the clipped term is the smaller one: there the token's
    # gradient is zero. ρ outside the band with the "wrong" sign of A is not clipped.
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).to(ratio.dtype)


def ppo_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *,
                    clip_eps: float, clip_eps_high: float | None = None) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al., 2017), per token, to minimize.

        ρ_t = exp(logp_t − old_logp_t)
        ℓ_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε, 1 + ε_high) A_t)       ε_high = ε unless given

    logp: (B, T) current policy, with gradient. old_logp: (B, T) policy that sampled the
    tokens (no gradient). advantages: (B, T). mask: (B, T). Returns ℓ (B, T).
    Metrics: clipfrac (share of tokens whose gradient clipping removed), approx_kl
    (KL(π_old ‖ π), k3), ratio_mean.
    """
    _same_shape(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    high = _clip_high(clip_eps, clip_eps_high)
    # Advantages and the sampling policy's log-probs are constants of this update; a
    # gradient through either (e.g. old_logp = logp on the first epoch) would change it.
    advantages, old_logp = advantages.detach(), old_logp.detach()
    ratio = torch.exp(logp - old_logp)
    per_token, clip_active = _clipped_surrogate(ratio, advantages, clip_eps, high)
    metrics = {
        "clipfrac": masked_mean(clip_active, mask).detach(),
        "approx_kl": approx_kl(old_logp, logp, mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return per_token, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[R − V] / Var[R] over counted tokens: 1 is a perfect critic, ≤ 0 is useless.

    values, returns, mask: (B, T). Returns a detached 0-dim tensor; NaN when the returns
    have no variance (the ratio is undefined, and a made-up number would mislead).
    """
    values, returns = values.detach(), returns.detach()
    var_returns = masked_var(returns, mask)
    if float(var_returns) == 0.0:
        return torch.tensor(float("nan"), dtype=values.dtype, device=values.device)
    return 1.0 - masked_var(returns - values, mask) / var_returns


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               clip_eps: float) -> tuple[Tensor, Metrics]:
    """Clipped value loss per token: the critic may not move more than ε from its rollout estimate.

        V^clip_t = old_V_t + clip(V_t − old_V_t, −ε, ε)
        ℓ_t      = ½ · max((V_t − R_t)², (V^clip_t − R_t)²)

    values: (B, T) current critic, with gradient. old_values: (B, T) at rollout time.
    returns: (B, T) targets (GAE returns). mask: (B, T). ε is in the units of the reward.
    Returns ℓ (B, T). Metrics: vf_clipfrac (share of tokens where the clipped term was the
    larger, so the gradient through V was cut), explained_variance.
    """
    _same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if not clip_eps > 0.0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    clipped_values = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_error, clipped_error)
    metrics = {
        "vf_clipfrac": masked_mean((clipped_error > unclipped_error).to(values.dtype),
                                   mask).detach(),
        "explained_variance": explained_variance(values, returns, mask),
    }
    return per_token, metrics


def entropy_bonus(entropy: Tensor, mask: Tensor, *, coef: float) -> tuple[Tensor, Metrics]:
    """Entropy bonus per token, as a loss to add: ℓ_t = −coef · H_t.

    entropy: (B, T) per-token entropy of the policy's next-token distribution, with
    gradient. mask: (B, T). Returns ℓ (B, T). Metric: entropy (token mean).
    """
    _same_shape(entropy=entropy, mask=mask)
    return -coef * entropy, {"entropy": masked_mean(entropy.detach(), mask)}


def grpo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor,
              mask: Tensor, *, clip_eps: float, kl_coef: float, kl_estimator: str,
              clip_eps_high: float | None = None) -> tuple[Tensor, Tensor, Metrics]:
    """GRPO (Shao et al., 2024): PPO's clipped surrogate on a sequence advantage, KL in the loss.

        ℓ_t = −min(ρ_t A_i, clip(ρ_t, 1 − ε, 1 + ε_high) A_i)  +  β · k(logp_t, ref_logp_t)
            =  surrogate_t                                     +  penalty_t

    The KL to the reference is a loss term here (k3 is unbiased and ≥ 0), not a reward
    penalty as in PPO, so it does not mix into the group-normalized advantage.
    logp: (B, T) with gradient. old_logp, ref_logp: (B, T). advantages: (B,) one per
    response (e.g. group_normalized_advantages), or (B, T) one per token (A_{i,t}, e.g.
    REINFORCE++'s batch_normalized_returns). mask: (B, T).
    Returns (surrogate (B, T), penalty (B, T), metrics): ℓ = surrogate + penalty, returned
    as its two terms so a recipe can log the surrogate alone. Metrics: those of
    ppo_policy_loss plus kl (token mean of the estimate k).
    """
    _same_shape(logp=logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    token_advantages = advantages if advantages.dim() == 2 else broadcast_sequence_advantages(advantages, mask)
    surrogate, metrics = ppo_policy_loss(logp, old_logp, token_advantages, mask,
                                         clip_eps=clip_eps, clip_eps_high=clip_eps_high)
    return surrogate, *_kl_term(logp, ref_logp, mask, kl_coef, kl_estimator, metrics)


def _kl_term(logp: Tensor, ref_logp: Tensor, mask: Tensor, kl_coef: float, kl_estimator: str,
             metrics: Metrics) -> tuple[Tensor, Metrics]:
    """(β · k(logp, ref_logp) (B, T), metrics with kl = its token mean)."""
    kl = get_kl_estimator(kl_estimator)(logp, ref_logp.detach())
    metrics["kl"] = masked_mean(kl.detach(), mask)
    return kl_coef * kl, metrics


def truncated_importance_weights(old_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *,
                                 cap: float) -> tuple[Tensor, Metrics]:
    """Truncated importance sampling (TIS) for tokens drawn by another engine than the trainer.

        w_t = min(π_old(y_t) / μ(y_t), C) = min(exp(old_logp_t − sampler_logp_t), C)

    μ is the sampler that drew the tokens (a vLLM server: other kernels, maybe another dtype),
    π_old the trainer's policy on the same weights. The surrogate's gradient, an expectation
    under π_old, is estimated from samples of μ by weighting each token's term by w_t;
    truncating at C bounds the variance that rare tokens μ over-samples would bring (Yao et
    al., 2025, "Your efficient RL framework secretly brings you off-policy RL training"; C = 2
    is TRL's default). The weights carry no gradient.
    old_logp, sampler_logp, mask: (B, T). Returns (w (B, T), metrics: is_weight_mean, the
    token mean of w, and is_capped_frac, the fraction of tokens where C bound it).
    """
    _same_shape(old_logp=old_logp, sampler_logp=sampler_logp, mask=mask)
    if cap <= 0:
        raise ValueError(f"the importance weight cap must be > 0, got {cap}")
    raw = torch.exp(old_logp.detach() - sampler_logp.detach())
    w = raw.clamp(max=cap)
    return w, {"is_weight_mean": masked_mean(w, mask), "is_capped_frac": masked_mean((raw > cap).float(), mask)}


def gspo_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor,
              mask: Tensor, *, clip_eps: float, kl_coef: float, kl_estimator: str,
              clip_eps_high: float | None = None) -> tuple[Tensor, Tensor, Metrics]:
    """GSPO (Zheng et al., 2025): the clipped surrogate on a sequence-level importance ratio.

        s_i     = exp((1/|y_i|) Σ_t (logp_{i,t} − old_logp_{i,t}))      geometric mean of the token ratios
        ℓ_{i,t} = −min(s_i A_i, clip(s_i, 1 − ε, 1 + ε_high) A_i)  +  β · k(logp_{i,t}, ref_logp_{i,t})

    One ratio and one clip decision per response, so a response is kept or dropped whole
    and a few off-policy tokens cannot dominate it. Its ratio stays near 1, hence the paper's
    narrow band (ε = 3e-4, ε_high = 4e-4). Per token the ratio is written
    s_{i,t} = sg[s_i] · π_{i,t} / sg[π_{i,t}]: equal to s_i in value, and with the "sequence"
    aggregation (a mean over each response's tokens) the gradient is exactly that of
    −min(s_i A_i, clip(s_i) A_i), i.e. −A_i s_i (1/|y_i|) Σ_t ∇ logp_{i,t} while unclipped.
    logp: (B, T) with gradient. old_logp, ref_logp: (B, T). advantages: (B,) one per response.
    mask: (B, T). Returns (surrogate (B, T), penalty (B, T), metrics) as grpo_loss. Metrics:
    clipfrac (share of tokens in clipped responses), approx_kl, ratio_mean (token mean of s_i),
    kl.
    """
    _same_shape(logp=logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
    if advantages.shape != (mask.shape[0],):
        raise ValueError(f"GSPO needs one advantage per response, (B,) = ({mask.shape[0]},); "
                         f"got {tuple(advantages.shape)}")
    high = _clip_high(clip_eps, clip_eps_high)
    advantages, old_logp = advantages.detach(), old_logp.detach()
    log_s = masked_mean(logp.detach() - old_logp, mask, dim=1)               # (B,) log s_i
    ratio = torch.exp(log_s.unsqueeze(1) + logp - logp.detach())              # value s_i, gradient of π_t
    token_advantages = broadcast_sequence_advantages(advantages, mask)
    surrogate, clip_active = _clipped_surrogate(ratio, token_advantages, clip_eps, high)
    metrics = {
        "clipfrac": masked_mean(clip_active, mask).detach(),
        "approx_kl": approx_kl(old_logp, logp, mask),
        "ratio_mean": masked_mean(ratio.detach(), mask),
    }
    return surrogate, *_kl_term(logp, ref_logp, mask, kl_coef, kl_estimator, metrics)


def reinforce_loss(logp: Tensor, advantages: Tensor, mask: Tensor) -> tuple[Tensor, Metrics]:
    """REINFORCE with a baseline (also RLOO and ReMax, which differ only in A): on-policy.

        ℓ_{i,t} = −A_i · logp_{i,t}        ("seq-mean-token-sum": 1/B Σ_i −A_i Σ_t logp_{i,t})

    logp: (B, T) with gradient, from the policy that sampled the tokens. advantages: (B,)
    r_i − b_i (detached here). mask: (B, T). Returns ℓ (B, T). Metrics: advantage_mean,
    logp_sum_mean (mean over responses of Σ_t logp, the sequence log-likelihood).
    """
    _same_shape(logp=logp, mask=mask)
    token_advantages = broadcast_sequence_advantages(advantages.detach(), mask)
    metrics = {
        "advantage_mean": advantages.detach().mean(),
        "logp_sum_mean": masked_sum(logp.detach(), mask, dim=1).mean(),
    }
    return -token_advantages * logp, metrics
