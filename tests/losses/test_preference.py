"""DPO-family losses against hand-derived values on 2-element batches, and their limits.

The losses return one value per example (B,); a test of a batch mean averages explicitly."""

import math

import pytest
import torch

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
from rlhfkit.losses.preference_registry import (
    LOSS_DEFAULTS,
    PREFERENCE_LOSSES,
    FeedbackLogps,
    PairLogps,
    get_preference_loss,
)
from rlhfkit.losses.reward import non_tie_accuracy


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# The shared batch. Example 0: π_c − ref_c = 2, π_r − ref_r = −1 → h = 3.
#                   Example 1: π_c − ref_c = −1, π_r − ref_r = 1  → h = −2.
POLICY_CHOSEN = torch.tensor([-10.0, -13.0])
POLICY_REJECTED = torch.tensor([-16.0, -11.0])
REF_CHOSEN = torch.tensor([-12.0, -12.0])
REF_REJECTED = torch.tensor([-15.0, -12.0])
BETA = 0.1


def paired(**extra):
    return dict(policy_chosen_logps=POLICY_CHOSEN, policy_rejected_logps=POLICY_REJECTED,
                ref_chosen_logps=REF_CHOSEN, ref_rejected_logps=REF_REJECTED, **extra)


def gap_tensor(h: float):
    """Inputs with log-ratio difference h that require grad through π_c."""
    policy_chosen = torch.tensor([h], requires_grad=True)
    zeros = torch.zeros(1)
    return policy_chosen, dict(policy_chosen_logps=policy_chosen, policy_rejected_logps=zeros,
                               ref_chosen_logps=zeros, ref_rejected_logps=zeros)


# --------------------------------------------------------------------------- DPO

def test_dpo_hand_values_and_metrics():
    # βh = [0.3, −0.2]: −log σ(0.3) = 0.554355, −log σ(−0.2) = 0.798139, mean 0.676247
    loss, metrics = dpo_loss(**paired(), beta=BETA)
    assert loss.tolist() == pytest.approx([0.5543552, 0.7981389], abs=1e-6)
    assert loss.mean().item() == pytest.approx(0.6762471, abs=1e-6)
    # implicit rewards β(π − ref): chosen [0.2, −0.1], rejected [−0.1, 0.1]
    assert metrics["rewards/chosen"].tolist() == pytest.approx([0.2, -0.1])
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(0.05)
    assert metrics["rewards/rejected"].mean().item() == pytest.approx(0.0)
    assert metrics["rewards/margin"].mean().item() == pytest.approx(0.05)   # mean(0.3, −0.2)
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert non_tie_accuracy(metrics).item() == pytest.approx(0.5)
    assert metrics["logps/chosen"].mean().item() == pytest.approx(-11.5)
    assert metrics["logps/rejected"].mean().item() == pytest.approx(-13.5)


def test_dpo_label_smoothing_hand_values():
    # ε = 0.1: 0.9·softplus(−x) + 0.1·softplus(x)
    #   x = 0.3: 0.9·0.554355 + 0.1·0.854355 = 0.584355
    #   x = −0.2: 0.9·0.798139 + 0.1·0.598139 = 0.778139;  mean 0.681247
    loss, _ = dpo_loss(**paired(), beta=BETA, label_smoothing=0.1)
    assert loss.tolist() == pytest.approx([0.5843552, 0.7781389], abs=1e-6)
    assert loss.mean().item() == pytest.approx((0.5843552 + 0.7781389) / 2, abs=1e-6)


def test_dpo_label_smoothing_half_erases_the_label():
    # At ε = 0.5 the loss is ½[softplus(−βh) + softplus(βh)] for every label: what the
    # annotators said no longer matters, and swapping chosen/rejected changes nothing.
    # It is NOT constant in h: log 2 at h = 0 (its minimum), 0.704355 at βh = 0.3.
    base, _ = dpo_loss(**paired(), beta=BETA, label_smoothing=0.5)
    base = base.mean()
    expected = (0.5 * (softplus(-0.3) + softplus(0.3)) + 0.5 * (softplus(0.2) + softplus(-0.2))) / 2
    assert base.item() == pytest.approx(expected, abs=1e-6)
    for label in ([0.0, 0.0], [0.5, 0.5], [1.0, 0.3]):
        other, _ = dpo_loss(**paired(), beta=BETA, label_smoothing=0.5,
                            label=torch.tensor(label))
        assert other.mean().item() == pytest.approx(base.item(), abs=1e-7)
    swapped, _ = dpo_loss(POLICY_REJECTED, POLICY_CHOSEN, REF_REJECTED, REF_CHOSEN,
                          beta=BETA, label_smoothing=0.5)
    assert swapped.mean().item() == pytest.approx(base.item(), abs=1e-7)
    zeros = torch.zeros(2)
    at_zero, _ = dpo_loss(zeros, zeros, zeros, zeros, beta=BETA, label_smoothing=0.5)
    assert at_zero.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)
    assert base.item() > math.log(2)


TIE = torch.tensor([0.5])


@pytest.mark.parametrize("loss_fn,extra", [
    (dpo_loss, {"label": TIE}),
    (dpo_loss, {"label_smoothing": 0.5}),       # ε = 0.5 makes every pair a tie
    (hinge_loss, {"label": TIE}),
    (robust_dpo_loss, {"label": TIE, "flip_rate": 0.2}),
    (ipo_loss, {"label": TIE}),
])
def test_tie_gradient_is_zero_at_equal_log_ratios_and_pulls_toward_it(loss_fn, extra):
    policy_chosen, inputs = gap_tensor(0.0)
    loss_fn(**inputs, beta=BETA, **extra)[0].backward()
    assert policy_chosen.grad.item() == pytest.approx(0.0, abs=1e-7)
    # |βh| = 1.5: outside the hinge's flat band |βh| < 1, where a tie has no gradient
    for h, sign in ((15.0, 1.0), (-15.0, -1.0)):
        policy_chosen, inputs = gap_tensor(h)
        loss_fn(**inputs, beta=BETA, **extra)[0].backward()
        # gradient descent moves h toward 0: dL/dh has the sign of h
        assert policy_chosen.grad.item() * sign > 0


def test_dpo_tie_gradient_hand_value():
    # tie: L = −½ log σ(βh) − ½ log σ(−βh); dL/dh = β(σ(βh) − ½) = 0.1·(σ(0.3) − 0.5) = 0.0074443
    policy_chosen, inputs = gap_tensor(3.0)
    loss, metrics = dpo_loss(**inputs, beta=BETA, label=torch.tensor([0.5]))
    loss.backward()
    assert policy_chosen.grad.item() == pytest.approx(0.0074443, abs=1e-6)
    assert policy_chosen.grad.item() == pytest.approx(BETA * (sigmoid(0.3) - 0.5), abs=1e-7)
    assert metrics["rewards/num_non_tie"].item() == 0


def test_dpo_soft_label_is_bce_with_soft_target():
    # label 0.8 at βh = 0.3: 0.8·softplus(−0.3) + 0.2·softplus(0.3) = 0.614355
    _, inputs = gap_tensor(3.0)
    loss, _ = dpo_loss(**inputs, beta=BETA, label=torch.tensor([0.8]))
    assert loss.item() == pytest.approx(0.8 * softplus(-0.3) + 0.2 * softplus(0.3), abs=1e-6)


# --------------------------------------------------------------------------- IPO, hinge, robust

def test_ipo_hand_values():
    # target 1/(2β) = 5; (3 − 5)² = 4, (−2 − 5)² = 49; mean 26.5
    loss, metrics = ipo_loss(**paired(), beta=BETA)
    assert loss.tolist() == pytest.approx([4.0, 49.0], abs=1e-5)
    assert loss.mean().item() == pytest.approx(26.5, abs=1e-5)
    assert non_tie_accuracy(metrics).item() == pytest.approx(0.5)
    # a tie targets h = 0: (3 − 0)² = 9, (−2 − 0)² = 4; mean 6.5
    tie_loss, _ = ipo_loss(**paired(), beta=BETA, label=torch.tensor([0.5, 0.5]))
    assert tie_loss.tolist() == pytest.approx([9.0, 4.0], abs=1e-5)
    assert tie_loss.mean().item() == pytest.approx(6.5, abs=1e-5)


def test_hinge_hand_values():
    # max(0, 1 − 0.3) = 0.7, max(0, 1 + 0.2) = 1.2; mean 0.95
    loss, _ = hinge_loss(**paired(), beta=BETA)
    assert loss.tolist() == pytest.approx([0.7, 1.2], abs=1e-6)
    assert loss.mean().item() == pytest.approx(0.95, abs=1e-6)
    # separated by more than 1/β: zero loss and zero gradient
    policy_chosen, inputs = gap_tensor(11.0)
    loss, _ = hinge_loss(**inputs, beta=BETA)
    loss.backward()
    assert loss.item() == 0.0 and policy_chosen.grad.item() == 0.0


def test_robust_dpo_hand_values():
    # ε = 0.2: R(x) = [0.8·softplus(−x) − 0.2·softplus(x)] / 0.6
    #   R(0.3)  = (0.8·0.554355 − 0.2·0.854355)/0.6 = 0.454355
    #   R(−0.2) = (0.8·0.798139 − 0.2·0.598139)/0.6 = 0.864806;  mean 0.659580
    loss, _ = robust_dpo_loss(**paired(), beta=BETA, flip_rate=0.2)
    assert loss.tolist() == pytest.approx([0.4543552, 0.8648056], abs=1e-6)
    assert loss.mean().item() == pytest.approx(0.6595804, abs=1e-6)


def test_robust_dpo_with_zero_flip_rate_is_dpo():
    robust, robust_metrics = robust_dpo_loss(**paired(), beta=BETA, flip_rate=0.0)
    dpo, dpo_metrics = dpo_loss(**paired(), beta=BETA)
    assert robust.tolist() == pytest.approx(dpo.tolist(), abs=1e-7)
    assert robust_metrics.keys() == dpo_metrics.keys()


def test_robust_dpo_is_unbiased_under_known_flips():
    # Averaging R over a label flipped with probability ε gives back the clean DPO loss:
    # (1 − ε)·R(x) + ε·R(−x) = softplus(−x).
    eps = 0.2
    clean, _ = dpo_loss(**paired(), beta=BETA)
    kept, _ = robust_dpo_loss(**paired(), beta=BETA, flip_rate=eps)
    flipped, _ = robust_dpo_loss(POLICY_REJECTED, POLICY_CHOSEN, REF_REJECTED, REF_CHOSEN,
                                 beta=BETA, flip_rate=eps)
    assert ((1 - eps) * kept + eps * flipped).tolist() == pytest.approx(clean.tolist(), abs=1e-6)


# --------------------------------------------------------------------------- SimPO, ORPO

def test_simpo_hand_values():
    # β = 2, γ = 0.5.
    # ex 0: π_c/|y_c| = −4/4 = −1, π_r/|y_r| = −9/3 = −3 → s = (−2, −6), gap 4
    #       loss = −log σ(4 − 0.5) = softplus(−3.5) = 0.029750
    # ex 1: π_c/|y_c| = −6/2 = −3, π_r/|y_r| = −2/4 = −0.5 → s = (−6, −1), gap −5
    #       loss = softplus(5.5) = 5.504078;  mean 2.766914
    loss, metrics = simpo_loss(torch.tensor([-4.0, -6.0]), torch.tensor([-9.0, -2.0]),
                               torch.tensor([4, 2]), torch.tensor([3, 4]), beta=2.0, gamma=0.5)
    assert loss.tolist() == pytest.approx([0.0297502, 5.5040785], abs=1e-5)
    assert loss.mean().item() == pytest.approx(2.7669144, abs=1e-5)
    assert metrics["rewards/chosen"].tolist() == pytest.approx([-2.0, -6.0])
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(-4.0)    # mean(−2, −6)
    assert metrics["rewards/rejected"].mean().item() == pytest.approx(-3.5)  # mean(−6, −1)
    assert non_tie_accuracy(metrics).item() == pytest.approx(0.5)


def test_simpo_tie_is_symmetric():
    # β = 2, γ = 0.5, ex 0 of the test above (gap 4), label 0.5:
    #   ½·softplus(0.5 − 4) + ½·softplus(0.5 + 4) = ½·(0.029750 + 4.511100) = 2.270425
    tie = torch.tensor([0.5])
    loss, _ = simpo_loss(torch.tensor([-4.0]), torch.tensor([-9.0]), torch.tensor([4]),
                         torch.tensor([3]), beta=2.0, gamma=0.5, label=tie)
    assert loss.item() == pytest.approx(0.5 * (softplus(-3.5) + softplus(4.5)), abs=1e-6)
    # equal normalized log-probs: zero gradient
    policy_chosen = torch.tensor([-6.0], requires_grad=True)
    loss, _ = simpo_loss(policy_chosen, torch.tensor([-3.0]), torch.tensor([4]),
                         torch.tensor([2]), beta=2.0, gamma=0.5, label=tie)
    loss.backward()
    assert policy_chosen.grad.item() == pytest.approx(0.0, abs=1e-7)


def test_simpo_without_margin_and_equal_lengths_is_reference_free_dpo():
    # γ = 0, |y| = L everywhere: −log σ(β/L·(π_c − π_r)) = DPO with ref = 0 and β' = β/L
    lengths = torch.tensor([5, 5])
    simpo, _ = simpo_loss(POLICY_CHOSEN, POLICY_REJECTED, lengths, lengths, beta=2.0, gamma=0.0)
    zeros = torch.zeros(2)
    dpo, _ = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, zeros, zeros, beta=2.0 / 5)
    assert simpo.tolist() == pytest.approx(dpo.tolist(), abs=1e-6)


def test_orpo_hand_values():
    # ex 0: chosen mean log-prob log 0.5 (3 tokens) → odds 1, log odds 0
    #       rejected mean log-prob log 0.2 (2 tokens) → odds 0.25, log odds −log 4
    #       L_OR = softplus(−log 4) = log(1 + 1/4) = log 1.25 = 0.223144
    # ex 1: the reverse → L_OR = softplus(log 4) = log 5 = 1.609438
    # mean L_OR = ½·log 6.25 = log 2.5 = 0.916291; nll mean(0.7, 1.3) = 1.0
    # loss = 1.0 + 0.1·0.916291 = 1.091629
    chosen = torch.tensor([3 * math.log(0.5), 2 * math.log(0.2)])
    rejected = torch.tensor([2 * math.log(0.2), 3 * math.log(0.5)])
    loss, metrics = orpo_loss(chosen, rejected, torch.tensor([3, 2]), torch.tensor([2, 3]),
                              torch.tensor([0.7, 1.3]), odds_ratio_weight=0.1)
    # per pair: 0.7 + 0.1·log 1.25 = 0.722314, 1.3 + 0.1·log 5 = 1.460944
    assert loss.tolist() == pytest.approx([0.7 + 0.1 * math.log(1.25), 1.3 + 0.1 * math.log(5)], abs=1e-6)
    assert loss.mean().item() == pytest.approx(1.0916291, abs=1e-6)
    assert metrics["orpo/odds_ratio_loss"].mean().item() == pytest.approx(math.log(2.5), abs=1e-6)
    assert metrics["orpo/nll"].mean().item() == pytest.approx(1.0)
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(-math.log(4) / 2, abs=1e-6)
    # a scalar nll is taken as is (added to every pair)
    scalar, _ = orpo_loss(chosen, rejected, torch.tensor([3, 2]), torch.tensor([2, 3]),
                          torch.tensor(1.0), odds_ratio_weight=0.1)
    assert scalar.mean().item() == pytest.approx(1.0916291, abs=1e-6)


def test_orpo_is_finite_when_the_model_is_certain():
    policy_chosen = torch.tensor([0.0, -1e-9], requires_grad=True)
    loss, _ = orpo_loss(policy_chosen, torch.tensor([-3.0, -3.0]), torch.tensor([2, 2]),
                        torch.tensor([2, 2]), torch.tensor(0.0), odds_ratio_weight=1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(policy_chosen.grad).all()


# --------------------------------------------------------------------------- KTO

def test_kto_both_branches_hand_values():
    # β = 0.1, z0 = 0.5, λ_D = 1, λ_U = 1.5
    # ex 0 desirable,   r = 2.5:  1 − σ(0.1·(2.5 − 0.5)) = 1 − σ(0.2) = 0.450166
    # ex 1 undesirable, r = −1.5: 1.5 − 1.5·σ(0.1·(0.5 + 1.5)) = 1.5·(1 − σ(0.2)) = 0.675249
    # mean 0.562707
    loss, metrics = kto_loss(torch.tensor([-7.5, -11.5]), torch.tensor([-10.0, -10.0]),
                             torch.tensor([True, False]), 0.5, beta=0.1, desirable_weight=1.0,
                             undesirable_weight=1.5)
    assert loss.tolist() == pytest.approx([0.4501660, 0.6752490], abs=1e-6)
    assert loss.mean().item() == pytest.approx((0.4501660 + 0.6752490) / 2, abs=1e-6)
    assert loss.mean().item() == pytest.approx((1 - sigmoid(0.2)) * (1 + 1.5) / 2, abs=1e-6)
    # r − z0 = 2.0 > 0 (desirable: right side), −2.0 < 0 (undesirable: right side)
    assert metrics["rewards/accuracy"].tolist() == [1.0, 1.0]
    assert metrics["rewards/desirable"].item() == pytest.approx(0.25)
    assert metrics["rewards/undesirable"].item() == pytest.approx(-0.15)
    assert metrics["kto/num_desirable"].item() == 1
    assert metrics["kto/kl_reference"].item() == pytest.approx(0.5)


def test_kto_gradients_push_each_branch_its_own_way_and_not_through_z0():
    policy = torch.tensor([-10.0, -10.0], requires_grad=True)
    z0 = torch.tensor(0.3, requires_grad=True)
    loss, metrics = kto_loss(policy, torch.tensor([-10.0, -10.0]), torch.tensor([True, False]),
                             z0, beta=0.1)
    loss.mean().backward()
    # dL/dπ = −λ_D·β·σ'(·)/B < 0 for desirable (raise it), > 0 for undesirable (lower it)
    # at r = 0: σ'(∓0.03) = σ(0.03)σ(−0.03) = 0.249944; |grad| = 0.1·0.249944/2 = 0.0124972
    assert policy.grad[0].item() == pytest.approx(-0.0124972, abs=1e-6)
    assert policy.grad[1].item() == pytest.approx(0.0124972, abs=1e-6)
    assert z0.grad is None
    # only-desirable batch: the undesirable metrics are 0, not NaN
    _, metrics = kto_loss(policy, torch.tensor([-10.0, -10.0]), torch.tensor([True, True]),
                          0.0, beta=0.1)
    assert metrics["rewards/undesirable"].item() == 0.0


def test_kto_reference_point_is_a_clamped_detached_mean():
    # mean(π − ref) = mean(1, −3) = −1 → clamped to 0;  mean(2, 1) = 1.5
    assert kto_reference_point(torch.tensor([1.0, -3.0]), torch.zeros(2)).item() == 0.0
    policy = torch.tensor([2.0, 1.0], requires_grad=True)
    z0 = kto_reference_point(policy, torch.zeros(2))
    assert z0.item() == pytest.approx(1.5) and not z0.requires_grad


# --------------------------------------------------------------------------- checks, registry

def test_bad_hyperparameters_and_shapes_raise():
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(**paired(), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(**paired(), beta=BETA, label_smoothing=0.6)
    with pytest.raises(ValueError, match="flip_rate"):
        robust_dpo_loss(**paired(), beta=BETA, flip_rate=0.5)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, torch.zeros(3), beta=BETA)
    with pytest.raises(ValueError, match="bool"):
        kto_loss(torch.zeros(2), torch.zeros(2), torch.tensor([1, 0]), 0.0, beta=0.1)


def test_registry_specs_match_their_functions():
    assert set(PREFERENCE_LOSSES) == {"dpo", "ipo", "hinge", "robust", "simpo", "orpo", "kto", "apo_zero",
                                      "apo_down", "bco_pair", "nca_pair", "exo_pair"}
    for name, spec in PREFERENCE_LOSSES.items():
        assert spec.name == name
        assert spec.hyperparameters == tuple(LOSS_DEFAULTS[name]), name
    assert not PREFERENCE_LOSSES["kto"].paired
    assert [n for n, spec in PREFERENCE_LOSSES.items() if not spec.needs_reference] == ["simpo", "orpo"]
    assert PREFERENCE_LOSSES["dpo"].with_defaults({"beta": 0.3, "flip_rate": None}) == {"beta": 0.3,
                                                                                        "label_smoothing": 0.0}


def test_registry_call_by_name_matches_direct_call():
    spec = get_preference_loss("robust")
    inputs = PairLogps(POLICY_CHOSEN, POLICY_REJECTED, torch.ones(2), torch.ones(2),
                       ref_chosen=REF_CHOSEN, ref_rejected=REF_REJECTED)
    loss, _ = spec.compute(inputs, {"beta": BETA, "flip_rate": 0.2})
    assert loss.mean().item() == pytest.approx(0.6595804, abs=1e-6)
    # every entry passes each hyper-parameter on: a changed value changes the loss
    lengths = torch.tensor([4.0, 2.0])
    inputs = PairLogps(POLICY_CHOSEN, POLICY_REJECTED, lengths, lengths + 1, label=torch.tensor([1.0, 0.8]),
                       ref_chosen=REF_CHOSEN, ref_rejected=REF_REJECTED)
    kto_inputs = FeedbackLogps(POLICY_CHOSEN, REF_CHOSEN, torch.tensor([True, False]), torch.tensor(0.1))
    for name, spec in PREFERENCE_LOSSES.items():
        x = inputs if spec.paired else kto_inputs
        base = spec.with_defaults({})
        for hp in spec.hyperparameters:
            value = base[hp]
            other = ({"sequence": "token"}[value] if isinstance(value, str) else not value
                     if isinstance(value, bool) else value * 1.5 + 0.05)
            changed = {**base, hp: other}
            assert spec.compute(x, changed)[0].sum().item() != pytest.approx(spec.compute(x, base)[0].sum().item(),
                                                                              abs=1e-9), (name, hp)


def test_unknown_loss_name_suggests_the_closest():
    with pytest.raises(ValueError, match="'dpo'") as info:
        get_preference_loss("dpoo")
    assert "Valid names" in str(info.value)
    with pytest.raises(ValueError, match="'simpo'"):
        get_preference_loss("simpo_loss")


def test_preferred_nll_hand_values():
    # π_c = −6 over 3 tokens → −2 per token; π_r = −2 over 4 tokens → −0.5 per token.
    # label 1: nll = 2; label 0: nll = 0.5; tie: ½·2 + ½·0.5 = 1.25; no labels = all chosen.
    pc, pr = torch.tensor([-6.0, -6.0, -6.0]), torch.tensor([-2.0, -2.0, -2.0])
    lc, lr = torch.tensor([3.0, 3.0, 3.0]), torch.tensor([4.0, 4.0, 4.0])
    label = torch.tensor([1.0, 0.0, 0.5])
    assert preferred_nll(pc, pr, lc, lr, label).tolist() == pytest.approx([2.0, 0.5, 1.25])
    assert float(preferred_nll(pc, pr, lc, lr, label).mean()) == pytest.approx((2.0 + 0.5 + 1.25) / 3)
    assert preferred_nll(pc, pr, lc, lr).tolist() == pytest.approx([2.0, 2.0, 2.0])
    # its gradient on a decided pair lowers the chosen NLL only: ∂/∂π_c = −1/|y_c|, ∂/∂π_r = 0 (B = 1)
    pc1, pr1 = torch.tensor([-6.0], requires_grad=True), torch.tensor([-2.0], requires_grad=True)
    preferred_nll(pc1, pr1, torch.tensor([3.0]), torch.tensor([4.0]), torch.tensor([1.0])).backward()
    assert float(pc1.grad) == pytest.approx(-1 / 3) and float(pr1.grad) == 0.0
    with pytest.raises(ValueError, match="one shape"):
        preferred_nll(pc, pr[:2], lc, lr)
