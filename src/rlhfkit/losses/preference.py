"""Direct preference losses (the DPO family), one pure function each, registered by name.

Notation used in every docstring:

    π_c, π_r      policy log-probs of the chosen / rejected response, summed over its
                  tokens: (B,)
    ref_c, ref_r  the same under the frozen reference model: (B,)
    h             (π_c − ref_c) − (π_r − ref_r), the log-ratio difference: (B,)
    l             optional soft label P(chosen ≻ rejected): (B,) in [0, 1]; None = 1

Soft labels follow one rule for every paired loss: the loss of a pair with label l is the
expected loss under that label, l·f(chosen ≻ rejected) + (1 − l)·f(rejected ≻ chosen). A
tie (l = 0.5) is therefore symmetric: its gradient with respect to h is zero at h = 0 and
pulls h toward 0, i.e. it asks the policy to like both responses equally (IPO's squared
loss is written in the equivalent regression form, see `ipo_loss`).

Every function returns `(loss, metrics)`: the per-example loss, (B,) float32 (inputs are
upcast, since log σ of bf16 differences loses precision), which the caller sums or averages
over whatever it normalizes by, and detached per-example (B,) metrics with stable names:
``rewards/chosen``, ``rewards/rejected`` (the loss's implicit rewards, e.g. β·(π − ref)),
``rewards/margin``, ``rewards/accuracy``, ``rewards/num_non_tie`` (see
`rlhfkit.losses.reward.pairwise_metrics`) and ``logps/chosen``, ``logps/rejected``
(unpaired KTO also reports per-class batch statistics, see `kto_loss`).

`rlhfkit.losses.preference_registry` maps each name to its function and holds the
hyper-parameter defaults.

Hyper-parameters are checked (β > 0, rates in range); tensor values such as labels are
not, because that would force a device sync every step: the data layer validates them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhfkit.losses.reward import pairwise_metrics
from rlhfkit.ops.stats import masked_mean

LossOutput = tuple[Tensor, dict[str, Tensor]]


# --------------------------------------------------------------------------- helpers

def _check_same_shape(**tensors: Tensor | None) -> None:
    present = {name: t for name, t in tensors.items() if t is not None}
    shapes = {name: tuple(t.shape) for name, t in present.items()}
    first = next(iter(present.values()))
    if first.dim() != 1 or any(s != tuple(first.shape) for s in shapes.values()):
        listing = ", ".join(f"{n}={s}" for n, s in shapes.items())
        raise ValueError(f"expected (B,) tensors of one shape, got {listing}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_rate(name: str, value: float, upper: float, upper_inclusive: bool) -> None:
    ok = 0.0 <= value <= upper if upper_inclusive else 0.0 <= value < upper
    if not ok:
        bracket = "]" if upper_inclusive else ")"
        raise ValueError(f"{name} must be in [0, {upper}{bracket}, got {value}")


def _expected_over_label(loss_if_chosen_better: Tensor, loss_if_rejected_better: Tensor,
                         label: Tensor | None) -> Tensor:
    """l·f(c ≻ r) + (1 − l)·f(r ≻ c): the loss averaged over the annotators' label."""
    if label is None:
        return loss_if_chosen_better
    label = label.float()
    return label * loss_if_chosen_better + (1.0 - label) * loss_if_rejected_better


def _log_ratio_rewards(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                       ref_chosen_logps: Tensor, ref_rejected_logps: Tensor
                       ) -> tuple[Tensor, Tensor]:
    """(π_c − ref_c, π_r − ref_r) in float32."""
    return (policy_chosen_logps.float() - ref_chosen_logps.float(),
            policy_rejected_logps.float() - ref_rejected_logps.float())


def _metrics(chosen_rewards: Tensor, rejected_rewards: Tensor, label: Tensor | None,
             policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    metrics = pairwise_metrics(chosen_rewards, rejected_rewards, label)
    metrics["logps/chosen"] = policy_chosen_logps.detach().float()
    metrics["logps/rejected"] = policy_rejected_logps.detach().float()
    return metrics


# --------------------------------------------------------------------------- paired, with reference

def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
             label_smoothing: float = 0.0, label: Tensor | None = None) -> LossOutput:
    """DPO (Rafailov et al., 2023), with conservative label smoothing and soft labels.

        t    = l·(1 − ε) + (1 − l)·ε
        loss = −[ t·log σ(β·h) + (1 − t)·log σ(−β·h) ]                     (B,)

    With l = 1 and ε = 0 this is −log σ(β·h). Label smoothing ε in [0, 0.5] (conservative
    DPO) assumes each label is flipped with probability ε; it is the soft label l = 1 − ε.
    At ε = 0.5 the label carries no information: the loss no longer depends on l or on which
    response is called chosen (it is symmetric in h, equal to log 2 at its minimum h = 0),
    so it only pulls h toward 0. A tie l = 0.5 behaves the same way for that pair.

    Shapes: the four log-prob inputs (B,); label (B,) or None. Implicit rewards β·(π − ref).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                      label=label)
    _check_positive("beta", beta)
    _check_rate("label_smoothing", label_smoothing, 0.5, upper_inclusive=True)
    chosen_ratio, rejected_ratio = _log_ratio_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen_ratio - rejected_ratio)
    label_value = torch.ones_like(logits) if label is None else label.float()
    target = label_value * (1.0 - label_smoothing) + (1.0 - label_value) * label_smoothing
    loss = -(target * F.logsigmoid(logits) + (1.0 - target) * F.logsigmoid(-logits))
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, label,
                          policy_chosen_logps, policy_rejected_logps)


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
             label: Tensor | None = None) -> LossOutput:
    """IPO (Azar et al., 2023): regress h onto a finite target instead of pushing it to ∞.

        loss = (h − (l − ½)/β)²                  (B,); l = 1: (h − 1/(2β))², the paper's loss

    β plays the role of the paper's τ: the smaller it is, the larger the log-ratio gap the
    policy is asked to open. For a soft label, the expected loss over the label,
    l·(h − 1/(2β))² + (1 − l)·(−h − 1/(2β))², differs from the form above only by a
    constant, so both have the same gradient; this form is 0 at its optimum. A tie targets
    h = 0.

    The inputs are taken as given: pass per-token averages π/|y| (and ref/|y|) for the
    averaged variant (TRL's choice), as the registry does with ``ipo_average``. Shapes: the four log-prob inputs (B,);
    label (B,) or None. Implicit rewards β·(π − ref).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                      label=label)
    _check_positive("beta", beta)
    chosen_ratio, rejected_ratio = _log_ratio_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    log_ratio_gap = chosen_ratio - rejected_ratio
    label_value = torch.ones_like(log_ratio_gap) if label is None else label.float()
    target = (label_value - 0.5) / beta
    loss = (log_ratio_gap - target) ** 2
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, label,
                          policy_chosen_logps, policy_rejected_logps)


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
               label: Tensor | None = None) -> LossOutput:
    """Hinge / SLiC (Zhao et al., 2023) on the reference-adjusted log-ratio difference.

        loss = l·max(0, 1 − β·h) + (1 − l)·max(0, 1 + β·h)                (B,)

    Zero once the pair is separated by 1/β nats; no push beyond that. For a tie the loss is
    flat (zero gradient) while |β·h| < 1 and pulls h back inside that band. Shapes: the four
    log-prob inputs (B,); label (B,) or None. Implicit rewards β·(π − ref).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                      label=label)
    _check_positive("beta", beta)
    chosen_ratio, rejected_ratio = _log_ratio_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen_ratio - rejected_ratio)
    loss = _expected_over_label(F.relu(1.0 - logits), F.relu(1.0 + logits), label)
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, label,
                          policy_chosen_logps, policy_rejected_logps)


def robust_dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                    ref_chosen_logps: Tensor, ref_rejected_logps: Tensor, *, beta: float,
                    flip_rate: float, label: Tensor | None = None) -> LossOutput:
    """Robust DPO (Chowdhury et al., 2024) for labels flipped with a known rate ε in [0, ½).

        f(x)  = −log σ(x)
        R(x)  = [ (1 − ε)·f(x) − ε·f(−x) ] / (1 − 2ε)
        loss  = l·R(β·h) + (1 − l)·R(−β·h)                                (B,)

    R is an unbiased estimate of the clean-label DPO loss: averaging it over a label that is
    flipped with probability ε gives back f. Unlike conservative DPO it is not bounded below
    (the −ε·f(−x) term), by design. ε = 0 is plain DPO. Shapes: the four log-prob inputs
    (B,); label (B,) or None. Implicit rewards β·(π − ref).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                      label=label)
    _check_positive("beta", beta)
    _check_rate("flip_rate", flip_rate, 0.5, upper_inclusive=False)
    chosen_ratio, rejected_ratio = _log_ratio_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    logits = beta * (chosen_ratio - rejected_ratio)
    nll_chosen_better = -F.logsigmoid(logits)
    nll_rejected_better = -F.logsigmoid(-logits)
    scale = 1.0 / (1.0 - 2.0 * flip_rate)
    robust_chosen_better = scale * ((1 - flip_rate) * nll_chosen_better
                                    - flip_rate * nll_rejected_better)
    robust_rejected_better = scale * ((1 - flip_rate) * nll_rejected_better
                                      - flip_rate * nll_chosen_better)
    loss = _expected_over_label(robust_chosen_better, robust_rejected_better, label)
    return loss, _metrics(beta * chosen_ratio, beta * rejected_ratio, label,
                          policy_chosen_logps, policy_rejected_logps)


# --------------------------------------------------------------------------- paired, reference-free

def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
               chosen_lengths: Tensor, rejected_lengths: Tensor, *, beta: float,
               gamma: float, label: Tensor | None = None) -> LossOutput:
    """SimPO (Meng et al., 2024): reference-free, length-normalized, with a target margin γ.

        s_c = β·π_c/|y_c|,  s_r = β·π_r/|y_r|
        loss = l·(−log σ(s_c − s_r − γ)) + (1 − l)·(−log σ(s_r − s_c − γ))  (B,)

    π_c, π_r are *summed* log-probs; the division by the response lengths |y| (token
    counts, (B,), > 0) happens here. Shapes: all inputs (B,); label (B,) or None.
    Implicit rewards s = β·π/|y|.
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                      label=label)
    _check_positive("beta", beta)
    chosen_scores = beta * policy_chosen_logps.float() / chosen_lengths.float()
    rejected_scores = beta * policy_rejected_logps.float() / rejected_lengths.float()
    gap = chosen_scores - rejected_scores
    loss = _expected_over_label(-F.logsigmoid(gap - gamma), -F.logsigmoid(-gap - gamma), label)
    return loss, _metrics(chosen_scores, rejected_scores, label,
                          policy_chosen_logps, policy_rejected_logps)


def _log_odds(mean_logp: Tensor) -> Tensor:
    """log[p/(1 − p)] from log p ≤ 0, computed without forming 1 − p.

    log(1 − p) = log(−expm1(log p)) near p = 1 and log1p(−p) elsewhere (both accurate
    there); log p is clamped just below 0 so a response the model is certain of gives a
    large finite log-odds instead of +∞.
    """
    log_p = mean_logp.clamp(max=-torch.finfo(mean_logp.dtype).tiny)
    near_one = log_p > -0.6931471805599453
    # Each branch gets a harmless stand-in where it is not selected: torch.where still
    # back-propagates through both, and 0·inf from the unused branch would give NaN.
    stand_in = torch.full_like(log_p, -1.0)
    log_one_minus_p = torch.where(near_one,
                                  torch.log(-torch.expm1(torch.where(near_one, log_p, stand_in))),
                                  torch.log1p(-torch.exp(torch.where(near_one, stand_in, log_p))))
    return log_p - log_one_minus_p


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
              chosen_lengths: Tensor, rejected_lengths: Tensor, chosen_nll: Tensor, *,
              odds_ratio_weight: float, label: Tensor | None = None) -> LossOutput:
    """ORPO (Hong et al., 2024): SFT loss plus an odds-ratio preference term, no reference.

        log p_y   = π_y/|y|                            (mean per-token log-prob)
        o_y       = log p_y − log(1 − p_y)             (log odds)
        L_OR      = l·(−log σ(o_c − o_r)) + (1 − l)·(−log σ(o_r − o_c))
        loss      = chosen_nll + λ·L_OR                                   (B,)

    π_c, π_r are summed log-probs and the lengths token counts, all (B,). chosen_nll is the
    supervised NLL of the chosen responses, computed by the caller as it prefers: (B,) per
    example, or a scalar (a token-level mean over the batch, added to every pair).
    λ = odds_ratio_weight. The implicit rewards reported are the log odds o_c, o_r;
    ``orpo/nll`` and ``orpo/odds_ratio_loss`` (B,) are the two parts before weighting.
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps,
                      policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                      label=label)
    if chosen_nll.dim() > 1 or (chosen_nll.dim() == 1
                                and chosen_nll.shape != policy_chosen_logps.shape):
        raise ValueError(f"chosen_nll must be a scalar or (B,) = "
                         f"{tuple(policy_chosen_logps.shape)}, got {tuple(chosen_nll.shape)}")
    _check_positive("odds_ratio_weight", odds_ratio_weight)
    chosen_log_odds = _log_odds(policy_chosen_logps.float() / chosen_lengths.float())
    rejected_log_odds = _log_odds(policy_rejected_logps.float() / rejected_lengths.float())
    log_odds_ratio = chosen_log_odds - rejected_log_odds
    odds_ratio_loss = _expected_over_label(-F.logsigmoid(log_odds_ratio),
                                           -F.logsigmoid(-log_odds_ratio), label)
    nll = chosen_nll.float().expand_as(odds_ratio_loss)
    loss = nll + odds_ratio_weight * odds_ratio_loss
    metrics = _metrics(chosen_log_odds, rejected_log_odds, label,
                       policy_chosen_logps, policy_rejected_logps)
    metrics["orpo/nll"] = nll.detach()
    metrics["orpo/odds_ratio_loss"] = odds_ratio_loss.detach()
    return loss, metrics


# --------------------------------------------------------------------------- RPO's NLL term

NLL_REDUCTIONS = ("sequence", "token")


def preferred_nll(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
                  rejected_lengths: Tensor, label: Tensor | None = None, *, reduction: str = "sequence") -> Tensor:
    """The NLL term that RPO adds to a pairwise loss (Pang et al. 2024, "Iterative Reasoning
    Preference Optimization"; TRL's ``rpo_alpha``): the negative log-likelihood of the preferred
    response, so the policy keeps (or raises) the likelihood of good answers while the pairwise
    term separates them from bad ones. Two normalizations, each returned per pair (B,) so that
    its batch mean is the named quantity:

        "sequence"  nll_i = −[ l_i·π_c,i/|y_c,i| + (1 − l_i)·π_r,i/|y_r,i| ]
                    mean = the mean over pairs of per-response token averages: every pair
                    weighs the same, a short response's tokens count more;
        "token"     nll_i = −B·[ l_i·π_c,i + (1 − l_i)·π_r,i ] / Σ_j [ l_j·|y_c,j| + (1 − l_j)·|y_r,j| ]
                    mean = the NLL per token over all the batch's preferred tokens (the
                    cross-entropy an SFT step on them would give, TRL's choice): every token
                    weighs the same, a long response counts more.

    π_c, π_r: summed log-probs (B,); |y_c|, |y_r|: response token counts (B,); l: soft label
    (B,), None = 1 (a tie weighs both responses ½). Returns nll (B,) float32; a recipe adds
    α · nll_i to each pair's loss. "token" couples the pairs of one batch (its denominator).
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, label=label)
    if reduction not in NLL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(NLL_REDUCTIONS)}, got {reduction!r}")
    weight = torch.ones_like(policy_chosen_logps, dtype=torch.float32) if label is None else label.float()
    if reduction == "token":
        summed = weight * policy_chosen_logps.float() + (1 - weight) * policy_rejected_logps.float()
        tokens = (weight * chosen_lengths.float() + (1 - weight) * rejected_lengths.float()).sum()
        return -summed * summed.numel() / tokens
    chosen = policy_chosen_logps.float() / chosen_lengths.float()
    rejected = policy_rejected_logps.float() / rejected_lengths.float()
    return -(weight * chosen + (1 - weight) * rejected)


# --------------------------------------------------------------------------- unpaired

def kto_reference_point(policy_mismatched_logps: Tensor, ref_mismatched_logps: Tensor
                        ) -> Tensor:
    """KTO's reference point z0 = max(0, mean(π − ref)) over mismatched (x, y′) pairs, i.e.
    responses paired with another example's prompt: a cheap, biased estimate of
    KL(π ‖ ref), detached. Inputs (B,) summed log-probs; returns a scalar."""
    _check_same_shape(policy_mismatched_logps=policy_mismatched_logps,
                      ref_mismatched_logps=ref_mismatched_logps)
    kl_estimate = (policy_mismatched_logps.float() - ref_mismatched_logps.float()).mean()
    return kl_estimate.clamp(min=0).detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor,
             kl_reference: Tensor | float, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> LossOutput:
    """KTO (Ethayarajh et al., 2024) on unpaired thumbs-up / thumbs-down examples.

        r     = π − ref                                  (B,)
        v     = λ_D·σ(β·(r − z0))   if desirable
                λ_U·σ(β·(z0 − r))   if undesirable
        loss  = λ_y − v                          (B,); λ_y = λ_D or λ_U by the example

    policy_logps, ref_logps: (B,) summed log-probs of each example's response.
    desirable: (B,) bool. kl_reference z0: scalar, detached here (no gradient flows through
    the reference point); estimate it with `kto_reference_point`. λ_D, λ_U =
    desirable_weight, undesirable_weight: set them so λ_D·n_D / (λ_U·n_U) is about 1 to 4/3
    when the classes are imbalanced. Metrics, per example (B,): ``rewards/accuracy`` (1
    where the example lies on its class's side of the reference point: r − z0 > 0 for a
    desirable one, < 0 for an undesirable one). Batch statistics (scalars, since a class
    mean is not a sum over examples): ``rewards/desirable``, ``rewards/undesirable`` (mean
    β·r of each class, 0 for an absent class), ``logps/desirable``, ``logps/undesirable``,
    ``kto/num_desirable``, ``kto/num_undesirable``, ``kto/kl_reference`` (z0).
    """
    _check_same_shape(policy_logps=policy_logps, ref_logps=ref_logps, desirable=desirable)
    _check_positive("beta", beta)
    _check_positive("desirable_weight", desirable_weight)
    _check_positive("undesirable_weight", undesirable_weight)
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z0 = torch.as_tensor(kl_reference, dtype=torch.float32, device=policy_logps.device).detach()
    if z0.dim() != 0:
        raise ValueError(f"kl_reference must be a scalar, got shape {tuple(z0.shape)}")
    log_ratio = policy_logps.float() - ref_logps.float()
    value = torch.where(desirable,
                        desirable_weight * torch.sigmoid(beta * (log_ratio - z0)),
                        undesirable_weight * torch.sigmoid(beta * (z0 - log_ratio)))
    weight = torch.where(desirable, torch.full_like(log_ratio, desirable_weight),
                         torch.full_like(log_ratio, undesirable_weight))
    loss = weight - value
    implicit_rewards = (beta * log_ratio).detach()
    shifted = log_ratio.detach() - z0
    metrics = {
        "rewards/accuracy": torch.where(desirable, shifted > 0, shifted < 0).float(),
        "rewards/desirable": masked_mean(implicit_rewards, desirable),
        "rewards/undesirable": masked_mean(implicit_rewards, ~desirable),
        "kto/num_desirable": desirable.sum().float(),
        "kto/num_undesirable": (~desirable).sum().float(),
        "kto/kl_reference": z0,
        "logps/desirable": masked_mean(policy_logps.detach().float(), desirable),
        "logps/undesirable": masked_mean(policy_logps.detach().float(), ~desirable),
    }
    return loss, metrics
