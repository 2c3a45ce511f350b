"""Tests for behaviour that mutation testing (scripts/mutation.py, issue #13) found unchecked in losses/.

Each test names what it pins down; expected values are worked out by hand in the comments.
Recurring themes: every tensor argument's shape is checked (a (1,)-shaped argument would
otherwise broadcast silently), error messages are matched in full, metric names and values
are part of the interface, and outputs keep the data's dtype and device.

The losses return per-example (B,) or per-token (B, T) values; where a hand value is a batch
mean, the test checks the per-example values and their explicit mean (`aggregate` for the
policy losses, with the aggregation the recipes use for them).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from rlhfkit.losses.policy import (
    aggregate,
    entropy_bonus,
    explained_variance,
    grpo_loss,
    loss_units,
    ppo_policy_loss,
    reinforce_loss,
    value_loss,
)
from rlhfkit.losses.preference import (
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    orpo_loss,
    preferred_nll,
    robust_dpo_loss,
    simpo_loss,
)
from rlhfkit.losses.preference_registry import PairLogps, get_preference_loss
from rlhfkit.losses.reward import (
    bradley_terry_loss,
    ensemble_reduce,
    ensemble_summary,
    non_tie_accuracy,
    reward_centering_penalty,
)
from rlhfkit.losses.sft import sft_loss


def t(x, dtype=torch.float64, grad=False):
    return torch.tensor(x, dtype=dtype, requires_grad=grad)


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for the whole message and nothing else."""
    return "^" + re.escape(message) + "$"


def elsewhere():
    """Factory functions default to the 'meta' device inside this block, so a tensor made
    without `device=...` lands on another device than the CPU inputs (as on a GPU run)."""
    return torch.device("meta")


# =========================================================================== policy losses

B2T3 = torch.tensor([[1, 1, 1], [1, 1, 0]])


def per_token(value=0.0):
    return torch.full((2, 3), value, dtype=torch.float64)


POLICY_CASES = {
    # function, its (B, T) tensor arguments, the rest of its call
    "ppo": (ppo_policy_loss, ("logp", "old_logp", "advantages", "mask"), dict(clip_eps=0.2)),
    "value": (value_loss, ("values", "old_values", "returns", "mask"), dict(clip_eps=0.2)),
    "entropy": (entropy_bonus, ("entropy", "mask"), dict(coef=0.01)),
    "grpo": (grpo_loss, ("logp", "old_logp", "ref_logp", "mask"),
             dict(advantages=t([1.0, -1.0]), clip_eps=0.2, kl_coef=0.1, kl_estimator="k3")),
    "reinforce": (reinforce_loss, ("logp", "mask"), dict(advantages=t([1.0, -1.0]))),
}


@pytest.mark.parametrize("case, argument", [(c, a) for c, (_, args, _) in POLICY_CASES.items() for a in args])
def test_policy_losses_check_every_tensor_shape(case, argument):
    fn, args, rest = POLICY_CASES[case]
    inputs = {a: (B2T3 if a == "mask" else per_token(-1.0)) for a in args}
    fn(**inputs, **rest)  # the well-shaped call works
    inputs[argument] = inputs[argument][:1]  # (1, 3): would broadcast against (2, 3)
    with pytest.raises(ValueError, match=r"^these must share one \(B, T\) shape: "):
        fn(**inputs, **rest)


def test_same_shape_message_lists_every_shape():
    with pytest.raises(ValueError, match=exactly(
            "these must share one (B, T) shape: {'logp': (2, 3), 'old_logp': (2, 3), "
            "'advantages': (2, 3), 'mask': (1, 3)}")):
        ppo_policy_loss(per_token(), per_token(), per_token(), B2T3[:1], clip_eps=0.2)


@pytest.mark.parametrize("clip_eps, clip_eps_high, shown", [
    (0.0, None, "0.0, 0.0"),     # ε must be > 0
    (0.0, 0.2, "0.0, 0.2"),      # even with a valid ε_high
    (1.0, None, "1.0, 1.0"),     # and < 1
    (0.2, 0.0, "0.2, 0.0"),      # ε_high must be > 0
])
def test_ppo_clip_range_is_checked(clip_eps, clip_eps_high, shown):
    with pytest.raises(ValueError, match=exactly(
            f"clip_eps must be in (0, 1) and clip_eps_high > 0, got {shown}")):
        ppo_policy_loss(per_token(), per_token(), per_token(), B2T3, clip_eps=clip_eps,
                        clip_eps_high=clip_eps_high)


def test_ppo_and_grpo_metric_names_and_dtypes():
    # On-policy (ρ = 1), A = 1 on 5 real tokens: ℓ = −1 everywhere, loss −1, nothing clipped.
    logp = per_token(-1.0)
    loss, metrics = ppo_policy_loss(logp, logp, per_token(1.0), B2T3, clip_eps=0.2)
    assert set(metrics) == {"clipfrac", "approx_kl", "ratio_mean"}
    assert (loss == -1.0).all()
    assert aggregate(loss, B2T3, "token").item() == -1.0
    assert metrics["clipfrac"].dtype == torch.float64 and metrics["clipfrac"].item() == 0.0
    # GRPO: the same surrogate, and a k3 penalty of 0 (ref = π)
    surrogate, penalty, metrics = grpo_loss(logp, logp, logp, t([1.0, 1.0]), B2T3, clip_eps=0.2,
                                            kl_coef=0.1, kl_estimator="k3")
    assert set(metrics) == {"clipfrac", "approx_kl", "ratio_mean", "kl"}
    assert aggregate(surrogate, B2T3, "token").item() == -1.0
    assert aggregate(penalty, B2T3, "token").item() == 0.0


def test_grpo_uses_the_upper_clip_bound():
    # One token, ρ = 1.5, A = +1, ε = 0.2, ε_high = 0.5: clip(1.5, 0.8, 1.5) = 1.5, so
    # ℓ = −min(1.5, 1.5) = −1.5 (with ε_high = ε it would be clipped to −1.2). KL 0 (ref = π).
    logp = t([[-1.0 + math.log(1.5)]])
    surrogate, penalty, _ = grpo_loss(logp, t([[-1.0]]), logp, t([1.0]), torch.ones(1, 1), clip_eps=0.2,
                                      kl_coef=0.1, kl_estimator="k3", clip_eps_high=0.5)
    assert (surrogate + penalty).item() == pytest.approx(-1.5)
    assert surrogate.item() == pytest.approx(-1.5)


def test_reinforce_metric_names():
    # A = [1, −1], logp −1 on 5 real tokens: Σ_t logp = [−3, −2];
    # loss = mean(−1·−3, +1·−2) = 0.5; advantage_mean 0; logp_sum_mean −2.5
    loss, metrics = reinforce_loss(per_token(-1.0), t([1.0, -1.0]), B2T3)
    assert set(metrics) == {"advantage_mean", "logp_sum_mean"}
    assert (loss * B2T3).sum(dim=1).tolist() == [3.0, -2.0]  # per response: −A_i·Σ_t logp
    assert aggregate(loss, B2T3, "seq-mean-token-sum").item() == 0.5
    assert metrics["advantage_mean"].item() == 0.0
    assert metrics["logp_sum_mean"].item() == -2.5


def test_value_clipping_with_a_moving_old_value_by_hand():
    # ε = 0.2, old V = 1 on both real tokens:
    #   V = 0.5, R = 0: V − old = −0.5 → clipped to −0.2, V_clip = 0.8;
    #                   (0.5 − 0)² = 0.25 vs (0.8 − 0)² = 0.64 → ½·0.64 = 0.32 (clipped term larger)
    #   V = 1.1, R = 2: inside the band, V_clip = V; both (−0.9)² = 0.81 → ½·0.81 = 0.405, a tie
    #                   (not counted as clipped)
    # loss (0.32 + 0.405)/2 = 0.3625, vf_clipfrac ½.
    # explained variance: Var[R] = Var[0, 2] = 2; R − V = [−0.5, 0.9], mean 0.2,
    # Σ(·−0.2)² = 0.49 + 0.49 → var 0.98; 1 − 0.98/2 = 0.51
    values = t([[0.5, 1.1, 7.0]])
    old, returns = t([[1.0, 1.0, 0.0]]), t([[0.0, 2.0, -5.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss[:, :2], t([[0.32, 0.405]]))
    assert aggregate(loss, mask, "token").item() == pytest.approx(0.3625)
    assert set(metrics) == {"vf_clipfrac", "explained_variance"}
    assert metrics["vf_clipfrac"].item() == 0.5 and metrics["vf_clipfrac"].dtype == torch.float64
    assert metrics["explained_variance"].item() == pytest.approx(0.51)
    with pytest.raises(ValueError, match=exactly("clip_eps must be > 0, got 0.0")):
        value_loss(values, old, returns, mask, clip_eps=0.0)


def test_explained_variance_nan_keeps_dtype_and_device():
    values, returns, mask = t([[0.0, 2.0]]), t([[1.0, 1.0]]), torch.ones(1, 2)  # no variance: NaN
    with elsewhere():
        ev = explained_variance(values, returns, mask)
    assert math.isnan(ev.item()) and ev.dtype == torch.float64 and ev.device.type == "cpu"


def test_unknown_aggregation_without_a_close_name():
    with pytest.raises(ValueError, match=exactly(
            "unknown aggregation 'zzz' (choose from ['seq-mean-token-sum', 'sequence', 'token'])")):
        aggregate(per_token(), B2T3, "zzz")


# =========================================================================== preference losses

# Example 0: π_c − ref_c = 2, π_r − ref_r = 4  → h = −2
# Example 1: π_c − ref_c = −1, π_r − ref_r = −2 → h = 1
# (rejected log-ratios other than ±1, so β·x and β/x differ)
PC, PR = torch.tensor([-10.0, -13.0]), torch.tensor([-11.0, -14.0])
RC, RR = torch.tensor([-12.0, -12.0]), torch.tensor([-15.0, -12.0])
BETA = 0.1
LABEL = torch.tensor([0.0, 1.0])  # example 0: the *rejected* response is preferred


def with_reference(**extra):
    return dict(policy_chosen_logps=PC, policy_rejected_logps=PR, ref_chosen_logps=RC,
                ref_rejected_logps=RR, **extra)


LENGTHS_C, LENGTHS_R = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 2.0])


def length_normalized(**extra):
    return dict(policy_chosen_logps=PC, policy_rejected_logps=PR, chosen_lengths=LENGTHS_C,
                rejected_lengths=LENGTHS_R, **extra)


PREFERENCE_CASES = {
    "dpo": (dpo_loss, with_reference, dict(beta=BETA)),
    "ipo": (ipo_loss, with_reference, dict(beta=BETA)),
    "hinge": (hinge_loss, with_reference, dict(beta=BETA)),
    "robust": (robust_dpo_loss, with_reference, dict(beta=BETA, flip_rate=0.1)),
    "simpo": (simpo_loss, length_normalized, dict(beta=BETA, gamma=0.5)),
    "orpo": (orpo_loss, length_normalized, dict(chosen_nll=torch.tensor(1.0), odds_ratio_weight=0.1)),
    "preferred_nll": (preferred_nll, length_normalized, {}),
}


@pytest.mark.parametrize("case, argument", [
    (case, argument) for case, (_, inputs, _) in PREFERENCE_CASES.items()
    for argument in [*inputs(), "label"]])
def test_preference_losses_check_every_tensor_shape(case, argument):
    fn, inputs, rest = PREFERENCE_CASES[case]
    kwargs = inputs(label=LABEL)
    fn(**kwargs, **rest)  # the well-shaped call works
    kwargs[argument] = kwargs[argument][:1]  # (1,): would broadcast against (2,)
    with pytest.raises(ValueError, match=r"^expected \(B,\) tensors of one shape, got "):
        fn(**kwargs, **rest)


@pytest.mark.parametrize("argument", ["policy_logps", "ref_logps", "desirable"])
def test_kto_checks_every_tensor_shape(argument):
    kwargs = dict(policy_logps=PC, ref_logps=RC, desirable=torch.tensor([True, False]))
    kwargs[argument] = kwargs[argument][:1]
    with pytest.raises(ValueError, match=r"^expected \(B,\) tensors of one shape, got "):
        kto_loss(**kwargs, kl_reference=0.0, beta=BETA)


@pytest.mark.parametrize("argument", [0, 1])
def test_kto_reference_point_checks_both_shapes(argument):
    inputs = [PC, RC]
    inputs[argument] = inputs[argument][:1]
    with pytest.raises(ValueError, match=r"^expected \(B,\) tensors of one shape, got "):
        kto_reference_point(*inputs)


def test_shape_message_lists_every_shape():
    with pytest.raises(ValueError, match=exactly(
            "expected (B,) tensors of one shape, got policy_chosen_logps=(2,), "
            "policy_rejected_logps=(2,), ref_chosen_logps=(2,), ref_rejected_logps=(1,)")):
        dpo_loss(PC, PR, RC, RR[:1], beta=BETA)


@pytest.mark.parametrize("call, message", [
    (lambda: dpo_loss(**with_reference(), beta=0.0), "beta must be > 0, got 0.0"),
    (lambda: ipo_loss(**with_reference(), beta=0.0), "beta must be > 0, got 0.0"),
    (lambda: hinge_loss(**with_reference(), beta=0.0), "beta must be > 0, got 0.0"),
    (lambda: robust_dpo_loss(**with_reference(), beta=0.0, flip_rate=0.1), "beta must be > 0, got 0.0"),
    (lambda: simpo_loss(**length_normalized(), beta=0.0, gamma=0.5), "beta must be > 0, got 0.0"),
    (lambda: orpo_loss(**length_normalized(), chosen_nll=torch.tensor(1.0), odds_ratio_weight=0.0),
     "odds_ratio_weight must be > 0, got 0.0"),
    (lambda: kto_loss(PC, RC, torch.tensor([True, False]), 0.0, beta=0.0), "beta must be > 0, got 0.0"),
    (lambda: kto_loss(PC, RC, torch.tensor([True, False]), 0.0, beta=BETA, desirable_weight=0.0),
     "desirable_weight must be > 0, got 0.0"),
    (lambda: kto_loss(PC, RC, torch.tensor([True, False]), 0.0, beta=BETA, undesirable_weight=0.0),
     "undesirable_weight must be > 0, got 0.0"),
    (lambda: kto_loss(PC, RC, torch.tensor([True, False]), torch.zeros(2), beta=BETA),
     "kl_reference must be a scalar, got shape (2,)"),
    # closed upper end for label smoothing, open for the flip rate
    (lambda: dpo_loss(**with_reference(), beta=BETA, label_smoothing=0.6),
     "label_smoothing must be in [0, 0.5], got 0.6"),
    (lambda: robust_dpo_loss(**with_reference(), beta=BETA, flip_rate=0.5),
     "flip_rate must be in [0, 0.5), got 0.5"),
    # chosen_nll: a scalar or (B,); (3,) and (1, 2) are neither
    (lambda: orpo_loss(**length_normalized(), chosen_nll=torch.ones(3), odds_ratio_weight=0.1),
     "chosen_nll must be a scalar or (B,) = (2,), got (3,)"),
    (lambda: orpo_loss(**length_normalized(), chosen_nll=torch.ones(1, 2), odds_ratio_weight=0.1),
     "chosen_nll must be a scalar or (B,) = (2,), got (1, 2)"),
])
def test_preference_hyperparameter_messages(call, message):
    with pytest.raises(ValueError, match=exactly(message)):
        call()


@pytest.mark.parametrize("case", ["dpo", "ipo", "hinge", "robust"])
def test_reference_losses_report_implicit_rewards_and_label_accuracy(case):
    # Implicit rewards β(π − ref): chosen [0.2, −0.1] → mean 0.05; rejected [0.4, −0.2] → 0.1;
    # margin mean(−0.2, 0.1) = −0.05. With the label [0, 1] example 0 prefers the rejected
    # response, whose reward is higher, and example 1 the chosen one, also higher: accuracy
    # 1 (ignoring the label, only example 1 would count: 0.5).
    fn, inputs, rest = PREFERENCE_CASES[case]
    _, metrics = fn(**inputs(label=LABEL), **rest)
    per_pair = dict(atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.2, -0.1]), **per_pair)
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([0.4, -0.2]), **per_pair)
    torch.testing.assert_close(metrics["rewards/margin"], torch.tensor([-0.2, 0.1]), **per_pair)
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(0.05)
    assert metrics["rewards/rejected"].mean().item() == pytest.approx(0.1)
    assert metrics["rewards/margin"].mean().item() == pytest.approx(-0.05)
    assert metrics["rewards/accuracy"].tolist() == [1.0, 1.0]
    assert non_tie_accuracy(metrics).item() == 1.0
    assert metrics["logps/chosen"].tolist() == [-10.0, -13.0]
    assert metrics["logps/rejected"].tolist() == [-11.0, -14.0]
    assert metrics["logps/chosen"].mean().item() == -11.5 and metrics["logps/rejected"].mean().item() == -12.5


def test_simpo_reports_label_accuracy():
    # s = β·π/|y|: chosen [0.1·−10/2, 0.1·−13/4] = [−0.5, −0.325];
    # rejected [0.1·−11/1, 0.1·−14/2] = [−1.1, −0.7]. The chosen score is higher in both,
    # so with the label [0, 1] only example 1 is right: accuracy ½ (1 without the label).
    _, metrics = simpo_loss(**length_normalized(label=LABEL), beta=BETA, gamma=0.5)
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([-0.5, -0.325]))
    assert metrics["rewards/chosen"].mean().item() == pytest.approx((-0.5 - 0.325) / 2)
    assert metrics["rewards/accuracy"].tolist() == [0.0, 1.0]
    assert non_tie_accuracy(metrics).item() == 0.5


def test_hinge_by_hand_where_the_two_ratios_do_not_cancel():
    # h = [−2, 1], β = 0.1: max(0, 1 + 0.2) = 1.2, max(0, 1 − 0.1) = 0.9; mean 1.05
    loss, _ = hinge_loss(**with_reference(), beta=BETA)
    torch.testing.assert_close(loss, torch.tensor([1.2, 0.9]))
    assert loss.mean().item() == pytest.approx(1.05, abs=1e-6)


def test_orpo_soft_labels_by_hand():
    # As in test_orpo_hand_values: log odds ratio o_c − o_r = [log 4, −log 4].
    # Label [0, 1]: ex 0 prefers rejected → −log σ(−log 4) = log(1 + 4) = log 5;
    #               ex 1 prefers chosen   → −log σ(−log 4) = log 5.   mean log 5 = 1.609438
    # (label 1 everywhere would give log 2.5). loss = mean(0.7, 1.3) + 0.1·log 5 = 1.160944
    chosen = torch.tensor([3 * math.log(0.5), 2 * math.log(0.2)])
    rejected = torch.tensor([2 * math.log(0.2), 3 * math.log(0.5)])
    loss, metrics = orpo_loss(chosen, rejected, torch.tensor([3, 2]), torch.tensor([2, 3]),
                              torch.tensor([0.7, 1.3]), odds_ratio_weight=0.1, label=LABEL)
    torch.testing.assert_close(metrics["orpo/odds_ratio_loss"], torch.full((2,), math.log(5)))
    assert metrics["orpo/odds_ratio_loss"].mean().item() == pytest.approx(math.log(5), abs=1e-6)
    torch.testing.assert_close(loss, torch.tensor([0.7, 1.3]) + 0.1 * math.log(5))
    assert loss.mean().item() == pytest.approx(1.0 + 0.1 * math.log(5), abs=1e-6)
    # rewards are the log odds, chosen [0, −log 4] vs rejected [−log 4, 0]: the model ranks
    # each pair against its label, accuracy 0 (ignoring the label it would be ½)
    assert metrics["rewards/accuracy"].tolist() == [0.0, 0.0]
    assert non_tie_accuracy(metrics).item() == 0.0


def test_kto_metrics_z0_dtype_and_device():
    # β = 0.1; desirable [T, F, F]; π − ref = [2.5, −1.5, 0.5]
    policy, ref = torch.tensor([-7.5, -11.5, -9.5]), torch.tensor([-10.0, -10.0, -10.0])
    desirable = torch.tensor([True, False, False])
    _, metrics = kto_loss(policy, ref, desirable, torch.tensor(0.5, dtype=torch.float64), beta=0.1)
    assert metrics["kto/num_desirable"].item() == 1 and metrics["kto/num_undesirable"].item() == 2
    assert metrics["logps/desirable"].item() == -7.5
    assert metrics["logps/undesirable"].item() == (-11.5 - 9.5) / 2
    assert metrics["kto/kl_reference"].dtype == torch.float32   # z0 is taken in fp32
    # z0 from a Python float is made on the inputs' device:
    # loss = mean(1 − σ(0.1·(2.5 − 0.5)), 1 − σ(0.1·(0.5 + 1.5)), 1 − σ(0.1·(0.5 − 0.5)))
    with elsewhere():
        loss, _ = kto_loss(policy, ref, desirable, 0.5, beta=0.1)
    s02 = 1 / (1 + math.exp(-0.2))  # σ(0.2); σ(0) = ½
    assert loss.device.type == "cpu"
    torch.testing.assert_close(loss, torch.tensor([1 - s02, 1 - s02, 0.5]))
    assert loss.mean().item() == pytest.approx((3 - 2 * s02 - 0.5) / 3, abs=1e-6)


def test_kto_reference_point_is_the_mean_log_ratio():
    # π − ref = [2 − 1, 1 + 3] = [1, 4] → mean 2.5
    assert kto_reference_point(torch.tensor([2.0, 1.0]), torch.tensor([1.0, -3.0])).item() == 2.5


def test_unknown_preference_loss_messages():
    # 'xpo' is 0.667 like 'ipo' and 'dpo', 0.571 like 'orpo', 0.5 like 'simpo': the three
    # best at cutoff 0.5, best first (ties in reverse alphabetical order, as difflib does).
    with pytest.raises(ValueError, match=exactly(
            "unknown preference loss 'xpo'. Did you mean 'ipo' or 'dpo' or 'orpo'? Valid names: "
            "apo_down, apo_zero, bco_pair, dpo, exo_pair, hinge, ipo, kto, nca_pair, orpo, robust, simpo")):
        get_preference_loss("xpo")
    with pytest.raises(ValueError, match=exactly(
            "unknown preference loss 'zzz'. Valid names: apo_down, apo_zero, bco_pair, dpo, exo_pair, hinge, ipo, "
            "kto, nca_pair, orpo, robust, simpo")):
        get_preference_loss("zzz")


# =========================================================================== reward-model losses

def test_bradley_terry_checks_the_margin_shape_and_its_loss():
    with pytest.raises(ValueError, match=exactly("margin must have shape (2,) like the rewards, got (1,)")):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(1))
    # Δ = 0 for both pairs: loss log 2; equal scores are not a correct ranking: accuracy 0
    loss, metrics = bradley_terry_loss(torch.zeros(2), torch.zeros(2))
    torch.testing.assert_close(loss, torch.full((2,), math.log(2)))
    assert loss.mean().item() == pytest.approx(math.log(2))
    assert metrics["rewards/accuracy"].tolist() == [0.0, 0.0]
    assert non_tie_accuracy(metrics).item() == 0.0


def test_accuracy_over_a_single_non_tie_pair():
    # pair 0 decided and right (1 > 0), pair 1 a tie (label ½): accuracy 1/1
    _, metrics = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.zeros(2), label=torch.tensor([1.0, 0.5]))
    assert metrics["rewards/num_non_tie"].tolist() == [1.0, 0.0]
    assert metrics["rewards/num_non_tie"].sum().item() == 1.0
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert non_tie_accuracy(metrics).item() == 1.0


def test_reward_centering_coefficient_zero_and_negative():
    penalty, _ = reward_centering_penalty(torch.ones(2), torch.ones(2), coef=0.0)
    assert penalty.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=exactly("reward centering coef must be >= 0, got -1.0")):
        reward_centering_penalty(torch.ones(2), torch.ones(2), coef=-1.0)


def test_ensemble_reduce_defaults_two_members_and_messages():
    # E = 2, B = 2; column means differ: [2, 10]; sample stds [√2, 0]
    rewards = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    assert ensemble_reduce(rewards).tolist() == [2.0, 10.0]           # mode defaults to mean
    # k defaults to 1: [2 − √2, 10 − 0]
    torch.testing.assert_close(ensemble_reduce(rewards, "mean_minus_std"),
                               torch.tensor([2.0 - math.sqrt(2.0), 10.0]))
    with pytest.raises(ValueError, match=exactly("ensemble rewards must have shape (E, B), got (3,)")):
        ensemble_reduce(torch.zeros(3))
    with pytest.raises(ValueError, match=exactly(
            "mode 'mean_minus_std' needs an ensemble of at least 2 members, got 1")):
        ensemble_reduce(torch.zeros(1, 3), "mean_minus_std")
    with pytest.raises(ValueError, match=exactly(
            "unknown ensemble mode 'mean_minus_sd' (valid: mean, min, mean_minus_std); "
            "did you mean 'mean_minus_std'?")):
        ensemble_reduce(rewards, "mean_minus_sd")
    with pytest.raises(ValueError, match=exactly(
            "unknown ensemble mode 'zzz' (valid: mean, min, mean_minus_std)")):
        ensemble_reduce(rewards, "zzz")


def test_ensemble_summary_by_hand():
    # E = 2 members, B = 3 examples
    rewards = torch.tensor([[1.0, 10.0, 5.0], [3.0, 10.0, 0.0]])
    summary = ensemble_summary(rewards)
    assert set(summary) == {"mean", "min", "max", "std"}
    assert summary["mean"].tolist() == [2.0, 10.0, 2.5]
    assert summary["min"].tolist() == [1.0, 10.0, 0.0]
    assert summary["max"].tolist() == [3.0, 10.0, 5.0]
    # sample std of two values a, b is |a − b|/√2: [2/√2, 0, 5/√2]
    torch.testing.assert_close(summary["std"], torch.tensor([2.0, 0.0, 5.0]) / math.sqrt(2.0))
    # one member: spread 0, not NaN
    single = ensemble_summary(rewards[:1])
    assert single["std"].tolist() == [0.0, 0.0, 0.0] and single["mean"].tolist() == [1.0, 10.0, 5.0]
    with pytest.raises(ValueError, match=exactly("ensemble rewards must have shape (E, B), got (3,)")):
        ensemble_summary(torch.zeros(3))


# =========================================================================== SFT

def test_sft_loss_by_hand():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # response tokens −1, −2, −4: NLL sum 7 over 3 tokens
    loss, metrics = sft_loss(lp, mask)
    assert loss.item() == pytest.approx(7 / 3)
    assert set(metrics) == {"nll_sum", "tokens"}
    assert metrics["nll_sum"].item() == 7.0 and metrics["tokens"].item() == 3.0
    # a normalizer (the whole step's token count) replaces the local count: 7/10
    loss, metrics = sft_loss(lp, mask, normalizer=10.0)
    assert loss.item() == pytest.approx(0.7) and metrics["tokens"].item() == 3.0
    # a single token is divided by 1; no token at all gives 0, not NaN
    assert sft_loss(lp, torch.tensor([[1, 0, 0], [0, 0, 0]]))[0].item() == 1.0
    assert sft_loss(lp, torch.zeros(2, 3))[0].item() == 0.0
    # the loss keeps the log-probs' dtype whatever the mask's
    assert sft_loss(lp, mask.to(torch.float64))[0].dtype == torch.float32


def test_sft_loss_gradient_is_minus_mask_over_count():
    # ∂L/∂logp = −m / N = −1/3 on the 3 response tokens, 0 elsewhere
    lp = torch.zeros(1, 4, requires_grad=True)
    sft_loss(lp, torch.tensor([[0, 1, 1, 1]]))[0].backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, -1 / 3, -1 / 3, -1 / 3]]))


# =========================================================================== after the layering
# Gaps in code restructured for the layering (issue #13), found by the run on that code.

def test_loss_units_of_a_single_response_and_their_device():
    # "sequence" and "seq-mean-token-sum" average over B responses, B = 1 here: units 1.
    # per-token ℓ = [2, 4, 9], mask [1, 1, 0]: sequence (2 + 4)/2 / 1 = 3;
    # seq-mean-token-sum (2 + 4) / 1 = 6 (a floor of 2 responses would halve both)
    per_tok, mask = t([[2.0, 4.0, 9.0]]), torch.tensor([[1, 1, 0]])
    assert loss_units(mask, "sequence").item() == 1.0
    assert aggregate(per_tok, mask, "sequence").item() == 3.0
    assert aggregate(per_tok, mask, "seq-mean-token-sum").item() == 6.0
    # the count of responses is made on the mask's device, not the default one
    with elsewhere():
        units = loss_units(B2T3, "sequence")
    assert units.device.type == "cpu" and units.item() == 2.0


@pytest.mark.parametrize("argument", ["logp", "old_logp"])
def test_grpo_shape_message_names_its_own_arguments(argument):
    # A mis-shaped logp / old_logp is reported by GRPO with GRPO's arguments (ref_logp), not
    # later by the PPO surrogate with its internal token advantages.
    inputs = {a: per_token(-1.0) for a in ("logp", "old_logp", "ref_logp")}
    inputs[argument] = inputs[argument][:1]
    shapes = {a: tuple(v.shape) for a, v in inputs.items()} | {"mask": (2, 3)}
    with pytest.raises(ValueError, match=exactly(f"these must share one (B, T) shape: {shapes}")):
        grpo_loss(**inputs, advantages=t([1.0, -1.0]), mask=B2T3, clip_eps=0.2, kl_coef=0.1,
                  kl_estimator="k3")


def test_kto_accuracy_is_strict_and_measured_from_z0():
    # z0 = 1; r = π − ref = [1, 1.5 | 1, 1.5, 0.5], desirable for the first two:
    # r − z0 = [0, 0.5 | 0, 0.5, −0.5]. Desirable is right when r − z0 > 0, undesirable
    # when < 0, so: [0, 1 | 0, 0, 1]. An example exactly at z0 is right for neither class
    # (at step 0, π = ref and z0 = 0, no example counts as right).
    policy = torch.tensor([-9.0, -8.5, -9.0, -8.5, -9.5])
    ref = torch.full((5,), -10.0)
    desirable = torch.tensor([True, True, False, False, False])
    _, metrics = kto_loss(policy, ref, desirable, 1.0, beta=BETA)
    assert metrics["rewards/accuracy"].tolist() == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert metrics["rewards/accuracy"].mean().item() == pytest.approx(0.4)


# One pair whose rejected response is preferred (label 0), though the model favours the
# chosen one. Policy: π_c = 4·log ½ over 4 tokens (p_c = ½), π_r = 3·log 0.2 over 3 tokens
# (p_r = 0.2). Log-ratios π − ref: chosen 6, rejected −4 → h = 10.
# a = log(1 + e⁻¹) = 0.3132617, and log(1 + e) = 1 + a.
#   dpo    β = 0.1, ε = 0:  β·h = 1; label 0: −log σ(−1) = 1 + a               = 1.3132617
#   ipo    β = 0.1:         (h − (0 − ½)/β)² = (10 + 5)²                     = 225
#   hinge  β = 0.1:         max(0, 1 + β·h) = 2
#   robust β = 0.1, ε = 0.1: R(−1) = [0.9·(1 + a) − 0.1·a]/0.8 = 1.125 + a    = 1.4382617
#   simpo  β = 2, γ = 1:    s = β·π/|y| = 2·log ½, 2·log 0.2; gap = 2·log 2.5;
#                           −log σ(−gap − γ) = log(1 + 6.25·e)              = 2.8897750
#   orpo   λ = 0.1:         SFT term −π_c/|y_c| = log 2; o_c = 0, o_r = log(0.2/0.8) = −log 4;
#                           −log σ(−log 4) = log 5; log 2 + 0.1·log 5        = 0.8540910
# Ignoring the label would give a, 25, 0, a − 0.125, log(1 + e^(1 − gap)) and
# log 2 + 0.1·log 1.25; every implicit reward ranks chosen first, so accuracy is 0 (1 without it).
REGISTRY_PAIR = PairLogps(
    policy_chosen=torch.tensor([4 * math.log(0.5)]), policy_rejected=torch.tensor([3 * math.log(0.2)]),
    chosen_lengths=torch.tensor([4.0]), rejected_lengths=torch.tensor([3.0]), label=torch.tensor([0.0]),
    ref_chosen=torch.tensor([4 * math.log(0.5) - 6.0]), ref_rejected=torch.tensor([3 * math.log(0.2) + 4.0]))
SOFTPLUS_M1 = math.log1p(math.exp(-1.0))  # a above


@pytest.mark.parametrize("name, hyperparameters, expected", [
    ("dpo", {"beta": 0.1, "label_smoothing": 0.0}, 1.0 + SOFTPLUS_M1),
    ("ipo", {"beta": 0.1}, 225.0),
    ("hinge", {"beta": 0.1}, 2.0),
    ("robust", {"beta": 0.1, "flip_rate": 0.1}, 1.125 + SOFTPLUS_M1),
    ("simpo", {"beta": 2.0, "gamma": 1.0}, math.log(1.0 + 6.25 * math.e)),
    ("orpo", {"odds_ratio_weight": 0.1}, math.log(2.0) + 0.1 * math.log(5.0)),
])
def test_registry_passes_the_label_and_orpo_sft_term_by_hand(name, hyperparameters, expected):
    loss, metrics = get_preference_loss(name).compute(REGISTRY_PAIR, hyperparameters)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["rewards/accuracy"].tolist() == [0.0]

