"""Per-token KL estimators between the policy π and the reference π_ref, from log-probs.

Only the log-probs of the *sampled* tokens are available (not full distributions), so the
KL D(π ‖ π_ref) = E_{y~π}[log π(y) − log π_ref(y)] is estimated per token from one sample.
Write logp = log π(y_t), logq = log π_ref(y_t), and r = logq − logp:

    k1 = logp − logq              unbiased, high variance, can be negative
    k2 = ½ (logp − logq)²         biased, low variance, ≥ 0
    k3 = exp(r) − r − 1           unbiased, low variance, ≥ 0   (Schulman, "Approximating KL")

k3 is unbiased because E_{y~π}[exp(r)] = E_π[π_ref/π] = 1, so E[k3] = E[−r] = KL; it is ≥ 0
because eˣ ≥ 1 + x. All estimators take and return tensors of the same shape (usually (B, T)).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from rlhfkit.config import did_you_mean
from rlhfkit.ops.stats import masked_mean

KLEstimator = Callable[[Tensor, Tensor], Tensor]


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = logp − ref_logp, per token. logp, ref_logp: same shape; returns that shape."""
    return logp - ref_logp


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (logp − ref_logp)², per token. logp, ref_logp: same shape; returns that shape."""
    return 0.5 * (logp - ref_logp) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(r) − r − 1 with r = ref_logp − logp, per token; always ≥ 0.

    logp, ref_logp: same shape; returns that shape. No clamping of r is done here: exp(r)
    overflows fp32 only when the reference is e⁸⁸ times likelier than the policy on a token
    the policy sampled, which a clamp would hide rather than fix.
    """
    log_ratio = ref_logp - logp
    return log_ratio.exp() - log_ratio - 1.0


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def get_kl_estimator(name: str) -> KLEstimator:
    """The estimator registered under `name` ("k1", "k2", "k3"); a clear error otherwise."""
    try:
        return KL_ESTIMATORS[name]
    except KeyError:
        hint = did_you_mean(name, KL_ESTIMATORS)
        raise ValueError(
            f"unknown KL estimator '{name}' (choose from {sorted(KL_ESTIMATORS)}){hint}"
        ) from None


def approx_kl(old_logp: Tensor, new_logp: Tensor, mask: Tensor) -> Tensor:
    """PPO diagnostic: how far one update moved the policy, KL(π_old ‖ π_new), as a scalar.

    The tokens were sampled from π_old, so π_old plays the role of π above and k3 applies:
    mean over counted tokens of (ρ − 1) − log ρ, with ρ = π_new/π_old.
    old_logp, new_logp, mask: (B, T). Returns a 0-dim tensor (detached: a metric, not a loss).
    """
    return masked_mean(kl_k3(old_logp.detach(), new_logp.detach()), mask)
