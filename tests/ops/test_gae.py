import pytest
import torch

from rlhfkit.ops.gae import gae


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def gae_reference_loop(rewards, values, mask, *, gamma: float, lam: float):
    """The same equations as `gae`, one row and one token at a time in plain Python floats.

    Slow on purpose: it is the readable definition the vectorized version is tested against.
    A padding position ends the episode: the token before it sees V = 0 and A = 0 after it.
    """
    advantages = torch.zeros_like(values, dtype=torch.float64)
    returns = torch.zeros_like(values, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        advantage_after, value_after = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if float(mask[b, t]) == 0.0:
                advantage_after, value_after = 0.0, 0.0
                continue
            r, v = float(rewards[b, t]), float(values[b, t])
            delta = r + gamma * value_after - v
            advantage = delta + gamma * lam * advantage_after
            advantages[b, t] = advantage
            returns[b, t] = advantage + v
            advantage_after, value_after = advantage, v
    return advantages.to(values.dtype), returns.to(values.dtype)


def test_gamma_lambda_one_gives_reward_to_go():
    # T=2, γ=λ=1: A_1 = r_1 − V_1 = 1 − 0.7 = 0.3
    #             A_0 = r_0 + V_1 − V_0 + A_1 = 0.5 + 0.7 − 0.3 + 0.3 = 1.2
    # returns = A + V = [1.5, 1.0] = [r_0 + r_1, r_1]
    rewards, values, mask = t([[0.5, 1.0]]), t([[0.3, 0.7]]), torch.ones(1, 2)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, t([[1.2, 0.3]]))
    torch.testing.assert_close(ret, t([[1.5, 1.0]]))


def test_discounted_case_with_padding_by_hand():
    # γ=0.9, λ=0.5, last column is padding with junk reward/value that must not leak in.
    # A_1 = 1 − 0.4 = 0.6 (V after the last real token is 0)
    # δ_0 = 0 + 0.9·0.4 − 0.2 = 0.16 ; A_0 = 0.16 + 0.45·0.6 = 0.43
    rewards, values = t([[0.0, 1.0, 9.0]]), t([[0.2, 0.4, 5.0]])
    mask = torch.tensor([[1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, t([[0.43, 0.6, 0.0]]))
    torch.testing.assert_close(ret, t([[0.63, 1.0, 0.0]]))


def test_lambda_zero_is_one_step_td():
    rewards, values = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.25, 1.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # δ_t = r_t + 0.5·V_{t+1} − V_t
    torch.testing.assert_close(adv, t([[1 + 0.125 - 0.5, 2 + 0.5 - 0.25, 3 - 1.0]]))


@pytest.mark.parametrize("batch, length", [(1, 1), (3, 5), (8, 17)])
@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0), (0.9, 0.3)])
def test_vectorized_matches_loop_on_ragged_masks(batch, length, gamma, lam):
    g = torch.Generator().manual_seed(batch * 100 + length)
    rewards = torch.randn(batch, length, generator=g, dtype=torch.float64)
    values = torch.randn(batch, length, generator=g, dtype=torch.float64)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[0] = length  # at least one full row
    mask = (torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)).long()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    adv_ref, ret_ref = gae_reference_loop(rewards, values, mask, gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)
    assert (adv[mask == 0] == 0).all() and (ret[mask == 0] == 0).all()


def test_no_gradient_and_shape_errors():
    values = torch.zeros(2, 3, requires_grad=True)
    adv, ret = gae(torch.ones(2, 3), values, torch.ones(2, 3), gamma=1.0, lam=1.0)
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="same"):
        gae(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 3), gamma=1.0, lam=1.0)
    with pytest.raises(ValueError, match="gamma"):
        gae(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), gamma=1.5, lam=1.0)
