import math

import pytest
import torch

from rlhfkit.ops.kl import KL_ESTIMATORS, approx_kl, get_kl_estimator, kl_k1, kl_k2, kl_k3

LOG2 = math.log(2.0)


def test_estimators_by_hand():
    # token 0: π = 0.5, π_ref = 0.25  → logp − logq = log 2,  r = logq − logp = −log 2
    # token 1: π = 0.25, π_ref = 0.5  → logp − logq = −log 2, r = +log 2
    logp = torch.tensor([math.log(0.5), math.log(0.25)], dtype=torch.float64)
    ref = torch.tensor([math.log(0.25), math.log(0.5)], dtype=torch.float64)
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([LOG2, -LOG2], dtype=torch.float64))
    torch.testing.assert_close(kl_k2(logp, ref),
                               torch.tensor([0.5 * LOG2**2, 0.5 * LOG2**2], dtype=torch.float64))
    # k3 = e^r − r − 1: e^{−log2} + log2 − 1 = log2 − ½ ; e^{log2} − log2 − 1 = 1 − log2
    torch.testing.assert_close(kl_k3(logp, ref),
                               torch.tensor([LOG2 - 0.5, 1.0 - LOG2], dtype=torch.float64))


def test_k3_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 16, generator=g) * 8
    ref = -torch.rand(64, 16, generator=g) * 8
    assert (kl_k3(logp, ref) >= 0).all()
    assert (kl_k2(logp, ref) >= 0).all()
    assert (kl_k1(logp, ref) < 0).any()  # k1 is not: that is why PPO clamps it
    assert torch.equal(kl_k3(logp, logp), torch.zeros_like(logp))


def test_k1_and_k3_are_unbiased_exactly():
    # Exact expectation over a 3-token vocabulary (no sampling noise): E_{y~p}[k] = KL(p‖q).
    p = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())
    for estimator in (kl_k1, kl_k3):
        expected = float((p * estimator(p.log(), q.log())).sum())
        assert expected == pytest.approx(true_kl, rel=1e-12)
    # k2 is biased: its expectation differs here
    assert float((p * kl_k2(p.log(), q.log())).sum()) != pytest.approx(true_kl, rel=1e-3)


def test_registry():
    assert get_kl_estimator("k3") is kl_k3
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}
    with pytest.raises(ValueError, match="did you mean 'k3'"):
        get_kl_estimator("k33")


def test_approx_kl_by_hand_ignores_padding():
    # ratios ρ = π_new/π_old = [2, ½] on real tokens, a wild value on the padded one.
    # k3(old→new) = (ρ − 1) − log ρ: 1 − log2 and −½ + log2 → mean = ¼
    old = torch.tensor([[math.log(0.25), math.log(0.5), 0.0]])
    new = torch.tensor([[math.log(0.5), math.log(0.25), -30.0]])
    mask = torch.tensor([[1, 1, 0]])
    assert float(approx_kl(old, new, mask)) == pytest.approx(0.25, abs=1e-6)
    assert not approx_kl(old.requires_grad_(), new, mask).requires_grad
