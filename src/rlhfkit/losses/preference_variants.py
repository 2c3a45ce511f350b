"""More paired preference losses with a reference: APO (zero, down), BCO-pair, NCA-pair, EXO-pair.

Same notation, conventions and metrics as `rlhfkit.losses.preference` (read its docstring):
π_c, π_r, ref_c, ref_r are (B,) summed response log-probs, l an optional soft label (B,),
and every function returns `(loss (B,) float32, detached (B,) metrics)`. Here

    r_c = β·(π_c − ref_c),  r_r = β·(π_r − ref_r)     the implicit rewards (B,)

A soft label follows the family's rule: l·f(chosen ≻ rejected) + (1 − l)·f(rejected ≻ chosen),
where f(rejected ≻ chosen) is f with the two responses swapped.

Each equation is written here from its paper; `preference_registry` registers them by name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.losses.preference import (
    LossOutput,
    _check_positive,
    _check_same_shape,
    _expected_over_label,
    _log_ratio_rewards,
    _metrics,
)


def _implicit_rewards(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                      ref_rejected_logps: Tensor, beta: float, label: Tensor | None) -> tuple[Tensor, Tensor]:
    """(r_c, r_r) in float32, after checking shapes and β."""
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, label=label)
    _check_positive("beta", beta)
    chosen_ratio, rejected_ratio = _log_ratio_rewards(policy_chosen_logps, policy_rejected_logps,
                                                      ref_chosen_logps, ref_rejected_logps)
    return beta * chosen_ratio, beta * rejected_ratio


def apo_zero_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float, label: Tensor | None = None) -> LossOutput:
    """APO-zero (D'Oosterlinck et al., 2024, "Anchored Preference Optimization and Contrastive
    Revisions: Addressing Underspecification in Alignment", arXiv:2408.06266).

        f(c ≻ r) = (1 − σ(r_c)) + σ(r_r)                                  (B,), in [0, 2]

    Anchored at zero: it raises the chosen likelihood and lowers the rejected one in absolute
    terms, for data whose chosen responses are better than the model's own outputs. (The paper
    writes −σ(r_c) + σ(r_r); the constant 1 only makes the loss non-negative.) Shapes: the four
    log-prob inputs (B,); label (B,) or None. Implicit rewards r = β·(π − ref).
    """
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta, label)
    loss = _expected_over_label(1.0 - torch.sigmoid(chosen) + torch.sigmoid(rejected),
                                1.0 - torch.sigmoid(rejected) + torch.sigmoid(chosen), label)
    return loss, _metrics(chosen, rejected, label, policy_chosen_logps, policy_rejected_logps)


def apo_down_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float, label: Tensor | None = None) -> LossOutput:
    """APO-down (D'Oosterlinck et al., 2024, arXiv:2408.06266, as `apo_zero_loss`).

        f(c ≻ r) = σ(r_c) + (1 − σ(r_c − r_r))                            (B,), in [0, 2]

    Anchored downward: both likelihoods go down, the rejected one faster, for data whose chosen
    responses are worse than the model's own outputs. (The paper writes σ(r_c) − σ(r_c − r_r);
    the constant 1 only makes the loss non-negative.) Shapes: the four log-prob inputs (B,);
    label (B,) or None. Implicit rewards r = β·(π − ref).
    """
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta, label)
    loss = _expected_over_label(torch.sigmoid(chosen) + 1.0 - torch.sigmoid(chosen - rejected),
                                torch.sigmoid(rejected) + 1.0 - torch.sigmoid(rejected - chosen), label)
    return loss, _metrics(chosen, rejected, label, policy_chosen_logps, policy_rejected_logps)


def bco_reward_shift(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """BCO's reward shift δ: the mean implicit reward over both responses of every pair, detached.
    Inputs (B,) each; returns a scalar. The paper keeps a running mean of it over training; this
    is one batch's term of that mean (a caller may average it over steps itself)."""
    _check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    return torch.cat([chosen_rewards.float(), rejected_rewards.float()]).mean().detach()


def bco_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, reward_shift: Tensor | float, *, beta: float,
                  label: Tensor | None = None) -> LossOutput:
    """BCO on pairs (Jung et al., 2024, "Binary Classifier Optimization for Large Language Model
    Alignment", arXiv:2404.04656): a binary classifier with logit r − δ, chosen = positive.

        f(c ≻ r) = −log σ(r_c − δ) − log σ(−(r_r − δ))                    (B,)

    δ = reward_shift, a scalar (detached here), e.g. `bco_reward_shift` of the batch or its
    running mean. Unlike DPO the two responses are classified separately, against δ, not
    against each other. Shapes: the four log-prob inputs (B,); label (B,) or None. Implicit
    rewards r = β·(π − ref).
    """
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta, label)
    delta = torch.as_tensor(reward_shift, dtype=torch.float32, device=chosen.device).detach()
    if delta.dim() != 0:
        raise ValueError(f"reward_shift must be a scalar, got shape {tuple(delta.shape)}")
    loss = _expected_over_label(-F.logsigmoid(chosen - delta) - F.logsigmoid(delta - rejected),
                                -F.logsigmoid(rejected - delta) - F.logsigmoid(delta - chosen), label)
    metrics = _metrics(chosen, rejected, label, policy_chosen_logps, policy_rejected_logps)
    metrics["bco/reward_shift"] = delta.expand_as(loss)
    return loss, metrics


def nca_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float, label: Tensor | None = None) -> LossOutput:
    """NCA, pairwise form (Chen et al., 2024, "Noise Contrastive Alignment of Language Models
    with Explicit Rewards", arXiv:2402.05369).

        f(c ≻ r) = −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)            (B,)

    The K-response NCA loss with K = 2 and target weights (1, 0): each response's reward is
    judged on its own (against 0), not only relative to the other, so unlike DPO the chosen
    likelihood is not pushed down along with the rejected one. For a soft label l the target
    weights are (l, 1 − l), which is the family's expected-over-label rule. Shapes: the four
    log-prob inputs (B,); label (B,) or None. Implicit rewards r = β·(π − ref).
    """
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta, label)
    both_down = -0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    loss = _expected_over_label(-F.logsigmoid(chosen), -F.logsigmoid(rejected), label) + both_down
    return loss, _metrics(chosen, rejected, label, policy_chosen_logps, policy_rejected_logps)


def exo_pair_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                  ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float,
                  label: Tensor | None = None) -> LossOutput:
    """EXO, pairwise form (Ji et al., 2024, "Towards Efficient Exact Optimization of Language
    Model Alignment", arXiv:2402.00856): the reverse KL from the policy's preference to the label's.

        p        = σ(r_c − r_r)                          the policy's P(c ≻ r)
        f(c ≻ r) = p·[log p − log(1 − ε)] + (1 − p)·[log(1 − p) − log ε]
                 = KL(Bern(p) ‖ Bern(1 − ε))                                (B,), ≥ 0

    DPO minimizes the forward KL(Bern(1 − ε) ‖ Bern(p)); EXO's reverse KL is mode-seeking.
    ε = label_smoothing in (0, 0.5] (the target must be inside (0, 1); the paper uses a small
    value, e.g. 1e-3). Only this K = 2 form is implemented, not the paper's K-sample one.
    Shapes: the four log-prob inputs (B,); label (B,) or None. Implicit rewards r = β·(π − ref).
    """
    if not 0.0 < label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in (0, 0.5] for exo_pair, got {label_smoothing}")
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta, label)
    log_keep, log_flip = math.log1p(-label_smoothing), math.log(label_smoothing)

    def reverse_kl(logits: Tensor) -> Tensor:
        log_p, log_q = F.logsigmoid(logits), F.logsigmoid(-logits)
        return log_p.exp() * (log_p - log_keep) + log_q.exp() * (log_q - log_flip)

    gap = chosen - rejected
    loss = _expected_over_label(reverse_kl(gap), reverse_kl(-gap), label)
    return loss, _metrics(chosen, rejected, label, policy_chosen_logps, policy_rejected_logps)
