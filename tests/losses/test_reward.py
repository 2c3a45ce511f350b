"""Reward-model losses against hand-derived values on 2-element batches.

The losses and metrics are per pair (B,); a test of a batch mean averages explicitly."""

import math

import pytest
import torch

from rlhfkit.losses.reward import (
    bradley_terry_loss,
    ensemble_reduce,
    ensemble_summary,
    non_tie_accuracy,
    pairwise_metrics,
    reward_centering_penalty,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_hard_labels():
    # Δ = r_c − r_r = [2 − 1, 0 − 0.5] = [1, −0.5]
    # loss = mean(−log σ(1), −log σ(−0.5)) = mean(0.313262, 0.974077) = 0.643669
    r_chosen = torch.tensor([2.0, 0.0])
    r_rejected = torch.tensor([1.0, 0.5])
    loss, metrics = bradley_terry_loss(r_chosen, r_rejected)
    assert loss.tolist() == pytest.approx([0.3132617, 0.9740770], abs=1e-6)
    assert loss.mean().item() == pytest.approx(0.6436693, abs=1e-6)
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]         # only pair 0 right
    assert non_tie_accuracy(metrics).item() == pytest.approx(0.5)
    assert metrics["rewards/num_non_tie"].sum().item() == 2
    assert metrics["rewards/margin"].tolist() == pytest.approx([1.0, -0.5])
    assert metrics["rewards/margin"].mean().item() == pytest.approx(0.25)    # mean(1, −0.5)
    assert metrics["rewards/chosen"].mean().item() == pytest.approx(1.0)
    assert metrics["rewards/rejected"].mean().item() == pytest.approx(0.75)


def test_bradley_terry_margin_is_subtracted_inside_sigmoid():
    # margin [0.5, 0]: Δ = [1 − 0.5, −0.5] → mean(softplus(−0.5), softplus(0.5))
    #   = mean(0.474077, 0.974077) = 0.724077
    loss, metrics = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.5]),
                                       margin=torch.tensor([0.5, 0.0]))
    assert loss.tolist() == pytest.approx([0.4740770, 0.9740770], abs=1e-6)
    assert loss.mean().item() == pytest.approx(0.7240770, abs=1e-6)
    # accuracy reads the raw rewards, not the margin-shifted difference
    assert non_tie_accuracy(metrics).item() == pytest.approx(0.5)


def test_bradley_terry_soft_label():
    # label 0.75 at Δ = 1: −[0.75·log σ(1) + 0.25·log σ(−1)]
    #   = 0.75·0.313262 + 0.25·1.313262 = 0.563262
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]),
                                 label=torch.tensor([0.75]))
    assert loss.item() == pytest.approx(0.75 * softplus(-1) + 0.25 * softplus(1), abs=1e-6)
    assert loss.item() == pytest.approx(0.5632617, abs=1e-6)


def test_bradley_terry_tie_has_zero_gradient_at_equal_rewards_and_pulls_together():
    # tie (label 0.5): d/dΔ = σ(Δ) − 0.5 → 0 at Δ = 0; at Δ = 2: σ(2) − 0.5 = 0.380797 (/B)
    r_chosen = torch.tensor([0.3, 2.0], requires_grad=True)
    r_rejected = torch.tensor([0.3, 0.0], requires_grad=True)
    loss, metrics = bradley_terry_loss(r_chosen, r_rejected, label=torch.tensor([0.5, 0.5]))
    loss.mean().backward()
    assert r_chosen.grad[0].item() == pytest.approx(0.0, abs=1e-7)
    expected = (1 / (1 + math.exp(-2)) - 0.5) / 2
    assert r_chosen.grad[1].item() == pytest.approx(expected, abs=1e-6)
    assert r_rejected.grad[1].item() == pytest.approx(-expected, abs=1e-6)
    # ties are left out of accuracy
    assert metrics["rewards/num_non_tie"].sum().item() == 0
    assert non_tie_accuracy(metrics).item() == 0.0


def test_bradley_terry_mis_click_noise():
    # ε = 0.1, Δ = 1: P = 0.9·σ(1) + 0.1·σ(−1) = 0.9·0.731059 + 0.1·0.268941 = 0.684847
    # loss = −log 0.684847 = 0.378560
    loss, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), noise=0.1)
    assert loss.item() == pytest.approx(0.3785600, abs=1e-6)
    # a confidently "wrong" label costs at most −log ε = log 10, however large the gap
    loss_far, _ = bradley_terry_loss(torch.tensor([-60.0]), torch.tensor([0.0]), noise=0.1)
    assert loss_far.item() == pytest.approx(math.log(10), abs=1e-5)
    plain_far, _ = bradley_terry_loss(torch.tensor([-60.0]), torch.tensor([0.0]))
    assert plain_far.item() == pytest.approx(60.0, abs=1e-4)


def test_bradley_terry_soft_label_accuracy_follows_label_direction():
    # pair 0: label 0.2 → annotators prefer `rejected`; model agrees (Δ = −1) → correct
    # pair 1: label 0.9, Δ = −1 → wrong
    metrics = pairwise_metrics(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0]),
                               torch.tensor([0.2, 0.9]))
    assert metrics["rewards/accuracy"].tolist() == [1.0, 0.0]
    assert non_tie_accuracy(metrics).item() == pytest.approx(0.5)


def test_bradley_terry_rejects_bad_shapes_and_noise():
    with pytest.raises(ValueError, match="shape"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="label"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), label=torch.zeros(3))
    with pytest.raises(ValueError, match="noise"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(2), noise=0.5)


def test_reward_centering_penalty():
    # coef 0.01 · mean((1 + 2)², (−1 + 0)²) = 0.01 · mean(9, 1) = 0.05
    penalty, metrics = reward_centering_penalty(torch.tensor([1.0, -1.0]),
                                                torch.tensor([2.0, 0.0]), coef=0.01)
    assert penalty.tolist() == pytest.approx([0.09, 0.01])
    assert penalty.mean().item() == pytest.approx(0.05)
    assert metrics["rewards/centering_sq"].tolist() == pytest.approx([9.0, 1.0])
    assert metrics["rewards/centering_sq"].mean().item() == pytest.approx(5.0)


def test_ensemble_reduce():
    # 3 members, 2 examples. column 0: 1, 3, 2 → mean 2, min 1, sample std 1
    #                        column 1: 2, 0, 4 → mean 2, min 0, sample std 2
    rewards = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    assert ensemble_reduce(rewards, "mean").tolist() == [2.0, 2.0]
    assert ensemble_reduce(rewards, "min").tolist() == [1.0, 0.0]
    # mean − 0.5·std = [2 − 0.5, 2 − 1]
    assert ensemble_reduce(rewards, "mean_minus_std", k=0.5).tolist() == [1.5, 1.0]
    summary = ensemble_summary(rewards)
    assert summary["std"].tolist() == [1.0, 2.0]
    assert summary["max"].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="mean_minus_std"):
        ensemble_reduce(rewards, "mean_minus_sd")
    with pytest.raises(ValueError, match="at least 2"):
        ensemble_reduce(rewards[:1], "mean_minus_std")
