import math

import pytest
import torch

from rlhfkit.ops.advantages import (
    MovingAverageBaseline,
    baseline_advantages,
    broadcast_sequence_advantages,
    group_normalized_advantages,
    kl_penalized_rewards,
    leave_one_out_advantages,
)


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- KL-shaped rewards (PPO)

# Row 0 has 3 real tokens, row 1 only 1 (then two pads with junk log-probs).
LOGP = t([[-1.0, -2.0, -1.0], [-1.0, -5.0, -5.0]])
REF = t([[-1.5, -1.0, -1.0], [-0.5, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
SCORES = t([2.0, 3.0])


def test_score_on_last_real_token_and_kl_on_every_token():
    # k1 = logp − ref = [[0.5, −1, 0], [−0.5, (pad), (pad)]], β = 0.1
    # row 0: [−0.05, +0.1, 0 + 2]      (score 2 on index 2 = 3 − 1)
    # row 1: [+0.05 + 3, 0, 0]         (score 3 on index 0 = 1 − 1; padding stays 0)
    rewards, kl = kl_penalized_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_clamp=None, estimator="k1")
    torch.testing.assert_close(kl, t([[0.5, -1.0, 0.0], [-0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, t([[-0.05, 0.1, 2.0], [3.05, 0.0, 0.0]]))


def test_kl_clamp_bounds_each_token_keeping_sign():
    logp = t([[1.0, -3.0, 0.1], [-1.0, 0.0, 0.0]])
    ref = t([[-1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    # k1 = [[2, −3, 0.1], [0, pad, pad]] → clamp(±0.6) = [[0.6, −0.6, 0.1], [0, 0, 0]]
    rewards, kl = kl_penalized_rewards(SCORES, logp, ref, MASK, kl_coef=1.0, kl_clamp=0.6, estimator="k1")
    torch.testing.assert_close(kl, t([[0.6, -0.6, 0.1], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, t([[-0.6, 0.6, -0.1 + 2.0], [3.0, 0.0, 0.0]]))


def test_other_estimator_by_name():
    _, kl = kl_penalized_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_clamp=None, estimator="k2")
    torch.testing.assert_close(kl, t([[0.125, 0.5, 0.0], [0.125, 0.0, 0.0]]))


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[1, 1, 1], [0, 0, 0]]), "no response tokens"),
    (torch.tensor([[1, 1, 1], [0, 1, 1]]), "right-padded"),
])
def test_bad_masks_are_rejected(mask, match):
    with pytest.raises(ValueError, match=match):
        kl_penalized_rewards(SCORES, LOGP, REF, mask, kl_coef=0.1, kl_clamp=None, estimator="k1")


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="scores must be"):
        kl_penalized_rewards(t([1.0]), LOGP, REF, MASK, kl_coef=0.1, kl_clamp=None, estimator="k1")
    with pytest.raises(ValueError, match="same"):
        kl_penalized_rewards(SCORES, LOGP[:, :2], REF, MASK, kl_coef=0.1, kl_clamp=None, estimator="k1")


# ---------------------------------------------------------------- GRPO / Dr. GRPO

def test_group_normalized_by_hand():
    # group [1,0,0,1]: mean ½, sample std = √(4·¼ / 3) = 1/√3 → ±½·√3
    # group [3,3,3,3]: all equal → 0 (no signal)
    adv = group_normalized_advantages(t([1, 0, 0, 1, 3, 3, 3, 3]), 4, scale=True, eps=0.0)
    h = 0.5 * math.sqrt(3.0)
    torch.testing.assert_close(adv, t([h, -h, -h, h, 0, 0, 0, 0]))


def test_group_normalized_without_scale_is_mean_only():
    adv = group_normalized_advantages(t([1, 0, 0, 1, 2, 4, 6, 8]), 4, scale=False)
    torch.testing.assert_close(adv, t([0.5, -0.5, -0.5, 0.5, -3, -1, 1, 3]))


def test_group_errors():
    with pytest.raises(ValueError, match="whole number of groups"):
        group_normalized_advantages(t([1, 2, 3]), 2, scale=True)
    with pytest.raises(ValueError, match="group_size"):
        group_normalized_advantages(t([1, 2]), 1, scale=True)


# ---------------------------------------------------------------- RLOO

def test_leave_one_out_by_hand():
    # [1,2,3,6], sum 12: 1 − 11/3, 2 − 10/3, 3 − 9/3, 6 − 6/3
    adv = leave_one_out_advantages(t([1, 2, 3, 6]), 4)
    torch.testing.assert_close(adv, t([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    assert float(adv.sum()) == pytest.approx(0.0, abs=1e-12)
    # k/(k−1) × (r − mean): the RLOO baseline is a rescaled group-mean baseline
    torch.testing.assert_close(adv, 4 / 3 * (t([1, 2, 3, 6]) - 3.0))


def test_leave_one_out_needs_two():
    with pytest.raises(ValueError, match="≥ 2"):
        leave_one_out_advantages(t([1, 2]), 1)


# ---------------------------------------------------------------- ReMax / REINFORCE baseline

def test_remax_subtracts_greedy_score_per_prompt():
    sampled, greedy = t([1.0, 0.5]), t([0.5, 1.0])
    torch.testing.assert_close(baseline_advantages(sampled, greedy), t([0.5, -0.5]))
    torch.testing.assert_close(baseline_advantages(sampled, 0.25), t([0.75, 0.25]))
    with pytest.raises(ValueError, match="baseline must be"):
        baseline_advantages(sampled, t([1.0, 2.0, 3.0]))


def test_moving_average_baseline_and_resume():
    tracker = MovingAverageBaseline(decay=0.9)
    assert tracker.value == 0.0
    assert tracker.update(t([1.0, 3.0])) == pytest.approx(2.0)      # first batch: its mean
    assert tracker.update(t([0.0, 0.0])) == pytest.approx(1.8)      # 0.9·2 + 0.1·0
    resumed = MovingAverageBaseline(decay=0.9)
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.update(t([1.0])) == tracker.update(t([1.0])) == pytest.approx(1.72)
    with pytest.raises(ValueError, match="decay"):
        MovingAverageBaseline(decay=0.5).load_state_dict(tracker.state_dict())
    with pytest.raises(ValueError, match="decay"):
        MovingAverageBaseline(decay=1.0)


def test_broadcast_sequence_advantages():
    out = broadcast_sequence_advantages(t([2.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    torch.testing.assert_close(out, t([[2, 2, 0], [-1, 0, 0]]))


def test_group_normalized_default_eps_is_close_and_equal_group_exactly_zero():
    adv = group_normalized_advantages(t([1, 0, 0, 1, 2, 2, 2, 2]), 4, scale=True)
    torch.testing.assert_close(adv[:4], t([1, -1, -1, 1]) * 0.5 * math.sqrt(3.0),
                               rtol=1e-5, atol=0)
    assert torch.equal(adv[4:], torch.zeros(4, dtype=torch.float64))
