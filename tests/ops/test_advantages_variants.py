"""The GRPO family's advantage and reward pieces, by hand: TRL's scale_rewards, DAPO's
dynamic-sampling filter and overlong punishment, REINFORCE++'s batch-whitened returns."""

import math

import pytest
import torch

from rlhfkit.ops.advantages import (
    batch_normalized_returns,
    informative_rows,
    kl_penalized_rewards,
    overlong_penalty,
    scaled_group_advantages,
)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# Two groups of k = 2: (1, 3) and (0, 4); centred r − mean_g = [−1, 1, −2, 2].
SCORES = t([1.0, 3.0, 0.0, 4.0])


def test_scale_rewards_group_batch_none_by_hand():
    # group: std_g (n − 1) = √2 and √8 = 2√2  →  [−1/√2, 1/√2, −2/(2√2), 2/(2√2)] = ±0.707107 each
    r2 = 1 / math.sqrt(2)
    torch.testing.assert_close(scaled_group_advantages(SCORES, 2, scale="group", eps=0.0), t([-r2, r2, -r2, r2]))
    # batch: mean 2, deviations [−1, 1, −2, 2], Σ² = 10, var = 10/3, std_B = √(10/3) = 1.825742
    #   → [−1, 1, −2, 2] / 1.825742 = [−0.547723, 0.547723, −1.095445, 1.095445]
    s = math.sqrt(10 / 3)
    torch.testing.assert_close(scaled_group_advantages(SCORES, 2, scale="batch", eps=0.0),
                               t([-1 / s, 1 / s, -2 / s, 2 / s]))
    # none (Dr. GRPO): the centred rewards themselves
    torch.testing.assert_close(scaled_group_advantages(SCORES, 2, scale="none"), t([-1.0, 1.0, -2.0, 2.0]))


def test_scale_rewards_batch_keeps_group_spread_and_equal_batch_is_zero():
    # group scaling gives both groups unit spread; batch scaling keeps group 2 twice as spread
    adv = scaled_group_advantages(SCORES, 2, scale="batch")
    assert float(adv[3] / adv[1]) == pytest.approx(2.0)
    assert torch.equal(scaled_group_advantages(t([2.0, 2.0, 2.0, 2.0]), 2, scale="batch", eps=0.0), t([0.0] * 4))
    with pytest.raises(ValueError, match="scale must be one of group, batch, none"):
        scaled_group_advantages(SCORES, 2, scale="bacth")


def test_informative_rows_drop_zero_variance_groups():
    # groups of 2: (1, 1) all equal, (0, 1) spread, (2, 2) all equal
    keep = informative_rows(t([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert keep.tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="not a whole number of groups"):
        informative_rows(t([1.0, 2.0, 3.0]), 2)


def test_overlong_penalty_by_hand():
    # L_max = 10, L_cache = 4: free up to 6 tokens, then (6 − L)/4, −1 beyond 10
    #   L = 5, 6 → 0;  7 → −1/4;  8 → −2/4;  10 → −4/4 = −1;  11 → −1
    lengths = torch.tensor([5, 6, 7, 8, 10, 11])
    torch.testing.assert_close(overlong_penalty(lengths, max_length=10, cache=4),
                               torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0]))
    # L_cache = 0: a hard −1 past L_max only
    torch.testing.assert_close(overlong_penalty(torch.tensor([10, 11]), max_length=10, cache=0),
                               torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="0 ≤ cache ≤ max_length"):
        overlong_penalty(lengths, max_length=4, cache=5)


def test_batch_normalized_returns_by_hand():
    # rewards [[1, 0, 2], [0, 3, pad]] → returns-to-go [[3, 2, 2], [3, 3, ·]]
    # the 5 real returns: mean 13/5 = 2.6, deviations [0.4, −0.6, −0.6, 0.4, 0.4],
    # Σ² = 3·0.16 + 2·0.36 = 1.2, var (n − 1) = 0.3  →  A = deviation / √0.3
    rewards = t([[1.0, 0.0, 2.0], [0.0, 3.0, 9.0]])       # 9 on the pad must not count
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    s = math.sqrt(0.3)
    expected = t([[0.4 / s, -0.6 / s, -0.6 / s], [0.4 / s, 0.4 / s, 0.0]])
    torch.testing.assert_close(batch_normalized_returns(rewards, mask, eps=0.0), expected)


def test_reinforce_pp_token_kl_enters_the_returns():
    # β = 0.5, k1 = logp − ref = [[0.2, −0.4], [0.6, pad]]; scores [1, 0]:
    #   r = [[−0.1, 0.2 + 1], [−0.3 + 0, ·]]  →  G = [[1.1, 1.2], [−0.3, ·]]
    #   mean 2/3, deviations [0.433333, 0.533333, −0.966667], Σ² = 0.187778 + 0.284444 + 0.934444
    #   = 1.406667, var = 0.703333
    logp, ref = t([[-1.0, -2.0], [-0.5, 0.0]]), t([[-1.2, -1.6], [-1.1, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    rewards, _ = kl_penalized_rewards(t([1.0, 0.0]), logp, ref, mask, kl_coef=0.5, kl_clamp=None, estimator="k1")
    s = math.sqrt(1.406667 / 2)
    expected = t([[0.433333 / s, 0.533333 / s], [-0.966667 / s, 0.0]])
    torch.testing.assert_close(batch_normalized_returns(rewards, mask, eps=0.0), expected, atol=2e-6, rtol=0)
