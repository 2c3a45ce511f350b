"""`rlhfkit.losses.sft.sft_loss` against values worked out on paper.

The batch used throughout (B = 2 rows, T = 4 positions; m = mask):

    row 0  log-probs [−1.0, −2.0, −3.0, −4.0]   m [0, 1, 1, 0]   counted: −2, −3        (2 tokens)
    row 1  log-probs [−0.5, −1.5, −1.0, −9.0]   m [1, 1, 1, 0]   counted: −0.5, −1.5, −1 (3 tokens)

    Σ_t m·(−log π) = (2 + 3) + (0.5 + 1.5 + 1.0) = 5 + 3 = 8,   N = Σ m = 5

    sft_loss = 8 / 5 = 1.6      (per-token mean over the counted tokens of the whole batch)

which is neither the mean of the per-row means, (5/2 + 3/3)/2 = 1.75, nor the mean of the
per-row sums, 8/2 = 4: the normalization is pinned by the value.
"""

import pytest
import torch

from rlhfkit.losses.sft import sft_loss

LOGPS = [[-1.0, -2.0, -3.0, -4.0],
         [-0.5, -1.5, -1.0, -9.0]]
MASK = [[0, 1, 1, 0],
        [1, 1, 1, 0]]


def batch(dtype=torch.float64):
    return torch.tensor(LOGPS, dtype=dtype), torch.tensor(MASK)


def test_two_row_batch_by_hand_is_the_per_token_mean_nll():
    logps, mask = batch()
    loss, metrics = sft_loss(logps, mask)
    assert loss.item() == pytest.approx(1.6, abs=1e-12)          # 8 / 5
    assert loss.item() != pytest.approx(1.75) and loss.item() != pytest.approx(4.0)
    assert metrics["nll_sum"].item() == pytest.approx(8.0, abs=1e-12)
    assert metrics["tokens"].item() == 5
    # metrics are detached; the loss is a 0-dim tensor
    assert not metrics["nll_sum"].requires_grad and loss.dim() == 0


def test_explicit_normalizer_replaces_the_token_count():
    # The recipe passes the token count of the whole optimizer step (all micro-batches, all
    # processes): 8 / 10 = 0.8 here; the reported token count stays this batch's 5.
    logps, mask = batch()
    loss, metrics = sft_loss(logps, mask, normalizer=10.0)
    assert loss.item() == pytest.approx(0.8, abs=1e-12)
    assert metrics["tokens"].item() == 5 and metrics["nll_sum"].item() == pytest.approx(8.0)
    # Two micro-batches normalized by the step's total give exactly the one-batch mean:
    # row 0 alone 5/5 = 1.0, row 1 alone 3/5 = 0.6, sum 1.6.
    a, _ = sft_loss(logps[:1], mask[:1], normalizer=5.0)
    b, _ = sft_loss(logps[1:], mask[1:], normalizer=5.0)
    assert (a + b).item() == pytest.approx(1.6, abs=1e-12)


def test_ignored_positions_do_not_count():
    # Positions with m = 0 (prompt, padding) may hold anything finite: the loss, the sum and
    # the count do not move, and they get no gradient.
    logps, mask = batch()
    changed = logps.clone()
    changed[mask == 0] = torch.tensor([-1000.0, 123.0, -7.0], dtype=changed.dtype)  # (0,0), (0,3), (1,3)
    loss, metrics = sft_loss(changed, mask)
    assert loss.item() == pytest.approx(1.6, abs=1e-12)
    assert metrics["nll_sum"].item() == pytest.approx(8.0) and metrics["tokens"].item() == 5


def test_sign_gradient_is_minus_one_over_n_on_counted_tokens():
    # L = −Σ m·logπ / N  ⇒  ∂L/∂logπ_t = −m_t / N = −1/5 = −0.2 on counted tokens, 0 elsewhere:
    # raising the target's log-prob lowers the loss.
    logps, mask = batch()
    logps.requires_grad_(True)
    loss, _ = sft_loss(logps, mask)
    loss.backward()
    expected = -torch.tensor(MASK, dtype=torch.float64) / 5
    torch.testing.assert_close(logps.grad, expected, atol=1e-12, rtol=0)


def test_loss_decreases_when_the_target_log_prob_increases():
    # Raise the counted log-prob at (1, 2) from −1.0 to −0.5: Σ NLL 8 → 7.5, loss 1.6 → 1.5.
    logps, mask = batch()
    better = logps.clone()
    better[1, 2] = -0.5
    assert sft_loss(better, mask)[0].item() == pytest.approx(1.5, abs=1e-12)
    assert sft_loss(better, mask)[0] < sft_loss(logps, mask)[0]
    # and the loss is positive for log-probs ≤ 0 (a negative NLL would be a flipped sign)
    assert sft_loss(logps, mask)[0].item() > 0


def test_mask_dtype_and_precision():
    # A bool or float mask gives the same value; float32 inputs give float32 out.
    logps, mask = batch(torch.float32)
    for m in (mask.bool(), mask.float(), mask.long()):
        loss, _ = sft_loss(logps, m)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(1.6, abs=1e-6)


def test_no_counted_token_gives_zero_not_nan():
    # N is clamped at 1: an all-masked batch contributes 0 (and a 0 count), never NaN.
    logps, _ = batch()
    loss, metrics = sft_loss(logps, torch.zeros(2, 4))
    assert loss.item() == 0.0 and metrics["tokens"].item() == 0
