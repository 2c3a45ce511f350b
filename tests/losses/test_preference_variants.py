"""APO, BCO-pair, NCA-pair, EXO-pair, IPO's per-token option and the NLL normalizations, against
values worked by hand. β = 1 and log-ratios of ±ln 3 keep every σ a simple fraction:
σ(ln 3) = 3/4, σ(−ln 3) = 1/4, σ(ln 9) = 9/10, σ(0) = 1/2."""

import math

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.losses.preference import preferred_nll
from rlhfkit.losses.preference_registry import PairLogps, check_hyperparameters, get_preference_loss
from rlhfkit.losses.preference_variants import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_reward_shift,
    exo_pair_loss,
    nca_pair_loss,
)
from rlhfkit.recipes.dpo import DPOConfig

LN3 = math.log(3)


def pairs(chosen: list[float], rejected: list[float], **extra):
    """Inputs with reference 0, so the log-ratios (and with β = 1 the rewards) are the policy values."""
    zeros = torch.zeros(len(chosen))
    return dict(policy_chosen_logps=torch.tensor(chosen), policy_rejected_logps=torch.tensor(rejected),
                ref_chosen_logps=zeros, ref_rejected_logps=zeros, **extra)


def test_apo_zero_and_down_by_hand():
    # Pair 0: r_c = ln 3, r_r = −ln 3.  Pair 1: r_c = 0, r_r = ln 3.
    x = pairs([LN3, 0.0], [-LN3, LN3])
    zero, metrics = apo_zero_loss(**x, beta=1.0)
    # 1 − σ(r_c) + σ(r_r): 1 − 3/4 + 1/4 = 0.5;  1 − 1/2 + 3/4 = 1.25
    assert zero.tolist() == pytest.approx([0.5, 1.25])
    down, _ = apo_down_loss(**x, beta=1.0)
    # σ(r_c) + 1 − σ(r_c − r_r): 3/4 + 1 − σ(ln 9) = 0.85;  1/2 + 1 − σ(−ln 3) = 1.25
    assert down.tolist() == pytest.approx([0.85, 1.25])
    assert metrics["rewards/chosen"].tolist() == pytest.approx([LN3, 0.0])
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]
    # β scales the rewards: β = ½ on log-ratios (2 ln 3, −2 ln 3) is pair 0 again
    assert apo_zero_loss(**pairs([2 * LN3], [-2 * LN3]), beta=0.5)[0].item() == pytest.approx(0.5)
    # A tie averages the two orders: zero-anchored swapped = 1 − 1/4 + 3/4 = 1.5 → (0.5 + 1.5)/2
    tie, _ = apo_zero_loss(**pairs([LN3], [-LN3], label=torch.tensor([0.5])), beta=1.0)
    assert tie.item() == pytest.approx(1.0)


def test_apo_gradients_point_where_their_anchors_say():
    # zero: chosen likelihood up and rejected down; down: both down at h = 0 (∂L/∂r_c = 0 there)
    pc, pr = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    apo_zero_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=1.0)[0].sum().backward()
    assert (pc.grad.item(), pr.grad.item()) == pytest.approx((-0.25, 0.25))
    pc.grad = pr.grad = None
    apo_down_loss(pc, pr, torch.zeros(1), torch.zeros(1), beta=1.0)[0].sum().backward()
    assert (pc.grad.item(), pr.grad.item()) == pytest.approx((0.0, 0.25))


def test_bco_pair_by_hand_and_its_reward_shift():
    x = pairs([LN3], [-LN3])
    # δ = 0: −log σ(ln 3) − log σ(ln 3) = 2 log(4/3)
    assert bco_pair_loss(**x, reward_shift=0.0, beta=1.0)[0].item() == pytest.approx(2 * math.log(4 / 3))
    # δ = ln 3: −log σ(0) − log σ(2 ln 3) = log 2 + log(10/9)
    loss, metrics = bco_pair_loss(**x, reward_shift=torch.tensor(LN3), beta=1.0)
    assert loss.item() == pytest.approx(math.log(2) + math.log(10 / 9))
    assert metrics["bco/reward_shift"].tolist() == pytest.approx([LN3])
    # δ = mean of all four rewards (ln 3, 0, −ln 3, ln 3) = ln 3 / 4; the registry uses exactly that
    assert bco_reward_shift(torch.tensor([LN3, 0.0]), torch.tensor([-LN3, LN3])).item() == pytest.approx(LN3 / 4)
    two = pairs([LN3, 0.0], [-LN3, LN3])
    inputs = PairLogps(two["policy_chosen_logps"], two["policy_rejected_logps"], torch.ones(2), torch.ones(2),
                       ref_chosen=torch.zeros(2), ref_rejected=torch.zeros(2))
    by_name = get_preference_loss("bco_pair").compute(inputs, {"beta": 1.0})[0]
    assert by_name.tolist() == pytest.approx(bco_pair_loss(**two, reward_shift=LN3 / 4, beta=1.0)[0].tolist())
    with pytest.raises(ValueError, match="scalar"):
        bco_pair_loss(**x, reward_shift=torch.zeros(2), beta=1.0)


def test_nca_pair_by_hand():
    # −log σ(ln 3) − ½ log σ(−ln 3) − ½ log σ(−(−ln 3)) = log(4/3) + ½ log 4 + ½ log(4/3)
    loss, _ = nca_pair_loss(**pairs([LN3], [-LN3]), beta=1.0)
    assert loss.item() == pytest.approx(1.5 * math.log(4 / 3) + math.log(2))
    # soft label l: target weights (l, 1 − l) on the first term, the ½ terms unchanged
    soft, _ = nca_pair_loss(**pairs([LN3], [-LN3], label=torch.tensor([0.25])), beta=1.0)
    expected = 0.25 * math.log(4 / 3) + 0.75 * math.log(4) + 0.5 * math.log(4) + 0.5 * math.log(4 / 3)
    assert soft.item() == pytest.approx(expected)


def test_exo_pair_by_hand_zero_at_its_target():
    # r_c − r_r = ln 3 → p = 3/4. With ε = 1/4 the target is Bern(3/4): KL = 0.
    x = pairs([LN3], [0.0])
    assert exo_pair_loss(**x, beta=1.0, label_smoothing=0.25)[0].item() == pytest.approx(0.0, abs=1e-6)
    # ε = ½: KL(Bern(3/4) ‖ Bern(1/2)) = ¾ log(3/2) + ¼ log(1/2)
    loss = exo_pair_loss(**x, beta=1.0, label_smoothing=0.5)[0].item()
    assert loss == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    # label 0: the same pair judged the other way, p = 1/4 vs 1 − ε = 3/4 (ε = 1/4):
    # ¼ log(1/3) + ¾ log(3)
    flipped = exo_pair_loss(**pairs([LN3], [0.0], label=torch.tensor([0.0])), beta=1.0, label_smoothing=0.25)
    assert flipped[0].item() == pytest.approx(0.25 * math.log(1 / 3) + 0.75 * math.log(3))
    with pytest.raises(ValueError, match="label_smoothing"):
        exo_pair_loss(**x, beta=1.0, label_smoothing=0.0)


def test_ipo_average_divides_policy_and_reference_by_the_lengths():
    # π_c = −6, ref_c = −9 over 3 tokens → per token +1; π_r = −8, ref_r = −4 over 4 → −1.
    # Averaged h = 2, β = ½ → (2 − 1)² = 1.  Summed h = 3 + 4 = 7 → (7 − 1)² = 36.
    inputs = PairLogps(torch.tensor([-6.0]), torch.tensor([-8.0]), torch.tensor([3.0]), torch.tensor([4.0]),
                       ref_chosen=torch.tensor([-9.0]), ref_rejected=torch.tensor([-4.0]))
    ipo = get_preference_loss("ipo")
    assert ipo.compute(inputs, {"beta": 0.5, "ipo_average": True})[0].item() == pytest.approx(1.0)
    assert ipo.compute(inputs, {"beta": 0.5, "ipo_average": False})[0].item() == pytest.approx(36.0)


def test_preferred_nll_token_and_sequence_normalizations():
    pc, pr = torch.tensor([-6.0, -2.0]), torch.tensor([-1.0, -5.0])
    lc, lr = torch.tensor([3.0, 1.0]), torch.tensor([5.0, 5.0])
    # sequence: per-pair token means [2, 2]; token: 8 nats over 4 tokens = 2 per token, split as
    # B·(−π_c,i)/Σ|y_c| = [2·6/4, 2·2/4] = [3, 1] so that their mean is the token mean
    assert preferred_nll(pc, pr, lc, lr).tolist() == pytest.approx([2.0, 2.0])
    assert preferred_nll(pc, pr, lc, lr, reduction="token").tolist() == pytest.approx([3.0, 1.0])
    # labels (1, 0): chosen of pair 0 (6 nats, 3 tokens), rejected of pair 1 (5 nats, 5 tokens):
    # 11/8 per token → [2·6/8, 2·5/8]
    label = torch.tensor([1.0, 0.0])
    assert preferred_nll(pc, pr, lc, lr, label, reduction="token").tolist() == pytest.approx([1.5, 1.25])
    with pytest.raises(ValueError, match="reduction"):
        preferred_nll(pc, pr, lc, lr, reduction="batch")


def test_orpo_nll_reduction_changes_only_its_nll_term():
    pc, pr = torch.tensor([-6.0, -2.0]), torch.tensor([-9.0, -5.0])
    inputs = PairLogps(pc, pr, torch.tensor([3.0, 1.0]), torch.tensor([5.0, 5.0]))
    orpo = get_preference_loss("orpo")
    seq, m_seq = orpo.compute(inputs, {"odds_ratio_weight": 0.1, "nll_reduction": "sequence"})
    tok, m_tok = orpo.compute(inputs, {"odds_ratio_weight": 0.1, "nll_reduction": "token"})
    assert m_seq["orpo/nll"].tolist() == pytest.approx([2.0, 2.0])
    assert m_tok["orpo/nll"].tolist() == pytest.approx([3.0, 1.0])
    assert (tok - seq).tolist() == pytest.approx([1.0, -1.0])


def test_hyperparameters_are_validated_in_one_line():
    with pytest.raises(ValueError, match=r"^label_smoothing must be in \(0, 0.5\] for loss 'exo_pair', got 0.0$"):
        check_hyperparameters("exo_pair", {"beta": 0.1, "label_smoothing": 0.0})
    with pytest.raises(ValueError, match=r"^nll_reduction must be one of sequence, token, got 'tok'$"):
        check_hyperparameters("orpo", {"odds_ratio_weight": 0.1, "nll_reduction": "tok"})
    with pytest.raises(ConfigError, match=r"^beta must be > 0, got -1.0$"):
        DPOConfig(train_data="x.jsonl", loss="nca_pair", beta=-1.0)
    with pytest.raises(ConfigError, match="label_smoothing must be in"):
        DPOConfig(train_data="x.jsonl", loss="exo_pair", label_smoothing=0.0)
    with pytest.raises(ConfigError, match="'ipo_average' is not used by loss 'dpo'"):
        DPOConfig(train_data="x.jsonl", ipo_average=True)
    with pytest.raises(ConfigError, match="'nll_reduction' is not used by loss 'dpo'"):
        DPOConfig(train_data="x.jsonl", nll_reduction="token")
    with pytest.raises(ConfigError, match="'nll_reduction' must be one of sequence, token"):
        DPOConfig(train_data="x.jsonl", nll_weight=0.5, nll_reduction="tokens")
    assert DPOConfig(train_data="x.jsonl", nll_weight=0.5, nll_reduction="token").nll_reduction == "token"
    assert DPOConfig(train_data="x.jsonl", loss="exo_pair").loss_hyperparameters == {"beta": 0.1,
                                                                                      "label_smoothing": 1e-3}
    assert DPOConfig(train_data="x.jsonl", loss="ipo", ipo_average=True).loss_hyperparameters["ipo_average"]
