"""Tests for behaviour that mutation testing (scripts/mutation.py, issue #13) found unchecked in ops/.

Each test names what it pins down; expected values are worked out by hand in the comments.
Three recurring themes:

- error messages are part of the interface, so they are matched in full;
- outputs keep the dtype of the data, whatever the dtype of the mask;
- tensors a function creates go on the device of its inputs. Without a GPU that is checked
  by making "meta" the default device (`elsewhere()`): a tensor created without
  `device=...` then lands on another device than the CPU inputs and the next operation
  that mixes the two fails, as it would on a GPU run whose default device is the CPU.
"""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhfkit.models.tiny import tiny_causal_lm
from rlhfkit.ops import logprobs as logprobs_module
from rlhfkit.ops.advantages import (
    MovingAverageBaseline,
    baseline_advantages,
    broadcast_sequence_advantages,
    group_normalized_advantages,
    kl_penalized_rewards,
    leave_one_out_advantages,
)
from rlhfkit.ops.gae import gae
from rlhfkit.ops.kl import get_kl_estimator
from rlhfkit.ops.logprobs import (
    IGNORE_INDEX,
    gather_logprobs,
    hidden_states,
    sequence_logprobs,
    split_causal_lm,
    target_logprobs,
)
from rlhfkit.ops.stats import masked_mean, masked_sum, masked_var, masked_whiten


def t(x, dtype=torch.float64):
    return torch.tensor(x, dtype=dtype)


def exactly(message: str) -> str:
    """A `pytest.raises(match=...)` pattern for the whole message and nothing else."""
    return "^" + re.escape(message) + "$"


def elsewhere():
    """Factory functions default to the 'meta' device inside this block (see the module doc)."""
    return torch.device("meta")


# ------------------------------------------------------------------ advantages: messages

LOGP = t([[-1.0, -2.0, -1.0], [-1.0, -5.0, -5.0]])
REF = t([[-1.5, -1.0, -1.0], [-0.5, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])
SCORES = t([2.0, 3.0])
# kl_penalized_rewards' keyword arguments: β = 0.1, the k1 estimate, no clamp.
SHAPING = dict(kl_coef=0.1, kl_clamp=None, estimator="k1")


def test_kl_penalized_rewards_error_messages():
    # B = 2 and T = 3 differ, so a message that printed T for B would show.
    with pytest.raises(ValueError, match=exactly("scores must be (B,) = (2,), got (1,)")):
        kl_penalized_rewards(t([1.0]), LOGP, REF, MASK, **SHAPING)
    # ref_logp alone has another (broadcastable) shape: still an error, not a silent broadcast.
    with pytest.raises(ValueError, match=exactly(
            "logp (2, 3), ref_logp (1, 3) and mask (2, 3) must have the same (B, T) shape")):
        kl_penalized_rewards(SCORES, LOGP, REF[:1], MASK, **SHAPING)
    # kl_clamp must be strictly positive: 0 would zero every KL term.
    with pytest.raises(ValueError, match=exactly("kl_clamp must be > 0 or None, got 0.0")):
        kl_penalized_rewards(SCORES, LOGP, REF, MASK, kl_coef=0.1, kl_clamp=0.0, estimator="k1")
    # Row 1 is empty: the message lists exactly the empty rows.
    with pytest.raises(ValueError, match=exactly(
            "rows [1] have no response tokens, so no token can carry the score")):
        kl_penalized_rewards(SCORES, LOGP, REF, torch.tensor([[1, 1, 1], [0, 0, 0]]), **SHAPING)
    with pytest.raises(ValueError, match=exactly(
            "mask must be right-padded: 1s on real response tokens, then 0s")):
        kl_penalized_rewards(SCORES, LOGP, REF, torch.tensor([[1, 1, 1], [0, 1, 1]]), **SHAPING)
    # A 1-D batch passes the shape checks (B = T = 3) and is stopped by the mask check.
    with pytest.raises(ValueError, match=exactly("mask must be (B, T), got shape (3,)")):
        kl_penalized_rewards(t([1.0, 2.0, 3.0]), t([0.0, 0.0, 0.0]), t([0.0, 0.0, 0.0]),
                             torch.ones(3), **SHAPING)


def test_a_mask_that_is_not_zero_one_is_rejected():
    # 1.5 is non-zero, so as booleans the row looks right-padded ([T, T, F]); as a
    # 0/1 mask it is not the expected [1, 1, 0].
    with pytest.raises(ValueError, match="right-padded"):
        kl_penalized_rewards(SCORES, LOGP, REF, t([[1.5, 1.0, 0.0], [1.0, 0.0, 0.0]]), **SHAPING)


def test_grouped_and_baseline_error_messages():
    with pytest.raises(ValueError, match=exactly("scores must be (B,), got shape (1, 2)")):
        group_normalized_advantages(t([[1.0, 2.0]]), 2, scale=True)
    with pytest.raises(ValueError, match=exactly("eps must be ≥ 0, got -1.0")):
        group_normalized_advantages(t([1.0, 2.0]), 2, scale=True, eps=-1.0)
    with pytest.raises(ValueError, match=exactly("scores must be (B,), got shape (1, 1)")):
        baseline_advantages(t([[1.0]]), 0.0)
    # B = 2, T = 4: the message must quote B.
    with pytest.raises(ValueError, match=exactly("advantages must be (B,) = (2,), got (3,)")):
        broadcast_sequence_advantages(t([1.0, 2.0, 3.0]), torch.ones(2, 4))


def test_moving_average_baseline_error_messages():
    tracker = MovingAverageBaseline(decay=0.9)
    with pytest.raises(ValueError, match=exactly(
            "cannot update the baseline with an empty batch of scores")):
        tracker.update(t([]))
    # mean(1, inf) = inf
    with pytest.raises(ValueError, match=exactly("scores contain a non-finite value (batch mean inf)")):
        tracker.update(t([1.0, math.inf]))


# ------------------------------------------------------------------ advantages: values

def test_dr_grpo_accepts_groups_of_one():
    # scale=False only centres, which a group of 1 allows: each score minus itself = 0.
    adv = group_normalized_advantages(t([1.0, 2.0]), 1, scale=False)
    assert adv.tolist() == [0.0, 0.0]


def test_group_normalized_eps_is_added_to_the_std():
    # [1, 3]: mean 2, sample std √((1 + 1)/1) = √2; eps = 1 → ±1/(1 + √2) = ±0.414214
    adv = group_normalized_advantages(t([1.0, 3.0]), 2, scale=True, eps=1.0)
    expected = 1.0 / (1.0 + math.sqrt(2.0))
    torch.testing.assert_close(adv, t([-expected, expected]))


def test_leave_one_out_keeps_groups_apart():
    # Two groups of 3 (B ≠ k, so a wrong reduction axis cannot broadcast by luck).
    # [1, 2, 3], sum 6:     1 − 5/2, 2 − 4/2, 3 − 3/2      = −1.5, 0, 1.5
    # [10, 20, 60], sum 90: 10 − 80/2, 20 − 70/2, 60 − 30/2 = −30, −15, 45
    adv = leave_one_out_advantages(t([1.0, 2.0, 3.0, 10.0, 20.0, 60.0]), 3)
    torch.testing.assert_close(adv, t([-1.5, 0.0, 1.5, -30.0, -15.0, 45.0]))


def test_moving_average_baseline_zero_decay_and_update_count():
    # (decay has no default any more: it lives in the recipe config, ReinforceConfig.baseline_decay)
    tracker = MovingAverageBaseline(decay=0.0)   # 0 is allowed: the baseline is the last batch mean
    assert tracker.state_dict()["num_updates"] == 0
    assert tracker.update(t([1.0, 3.0])) == 2.0  # first update: the batch mean
    assert tracker.update(t([5.0])) == 5.0       # 0·2 + 1·5
    assert tracker.state_dict()["num_updates"] == 2
    assert tracker.state_dict() == {"decay": 0.0, "value": 5.0, "num_updates": 2}


def test_outputs_keep_the_data_dtype_whatever_the_mask_dtype():
    mask64 = MASK.to(torch.float64)
    logp32, ref32 = LOGP.float(), REF.float()
    # Same values as in test_advantages (k1 = logp − ref, β = 0.1), now in fp32 with an
    # fp64 mask and fp64 scores: the rewards stay fp32.
    rewards, kl = kl_penalized_rewards(SCORES, logp32, ref32, mask64, **SHAPING)
    assert rewards.dtype == kl.dtype == torch.float32
    torch.testing.assert_close(rewards, t([[-0.05, 0.1, 2.0], [3.05, 0.0, 0.0]], torch.float32))
    out = broadcast_sequence_advantages(t([2.0, -1.0], torch.float32), mask64)
    assert out.dtype == torch.float32
    # a (B,) baseline of another dtype is cast to the scores' dtype: [1 − 0.5, 0.5 − 1]
    adv = baseline_advantages(t([1.0, 0.5], torch.float32), t([0.5, 1.0]))
    assert adv.dtype == torch.float32 and adv.tolist() == [0.5, -0.5]


def test_advantage_tensors_are_created_on_the_inputs_device():
    with elsewhere():
        rewards, _ = kl_penalized_rewards(SCORES, LOGP, REF, MASK, **SHAPING)
    torch.testing.assert_close(rewards, t([[-0.05, 0.1, 2.0], [3.05, 0.0, 0.0]]))
    # scores on another device than a (B,) baseline: the baseline follows the scores.
    adv = baseline_advantages(torch.zeros(2, device="meta"), t([1.0, 2.0]))
    assert adv.device.type == "meta" and adv.shape == (2,)


# ------------------------------------------------------------------ GAE

def test_gae_gamma_zero_is_allowed_and_lambda_above_one_is_not():
    # γ = 0: no bootstrapping, A_t = r_t − V_t = [1 − 0.5, 2 − 0.25]; R = A + V = r.
    rewards, values, mask = t([[1.0, 2.0]]), t([[0.5, 0.25]]), torch.ones(1, 2)
    adv, ret = gae(rewards, values, mask, gamma=0.0, lam=0.95)
    torch.testing.assert_close(adv, t([[0.5, 1.75]]))
    torch.testing.assert_close(ret, t([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=exactly("gamma and lam must be in [0, 1], got gamma=0.9, lam=1.5")):
        gae(rewards, values, mask, gamma=0.9, lam=1.5)


def test_gae_returns_the_values_dtype():
    # fp32 rewards and values with an fp64 mask: advantages and returns stay fp32.
    adv, ret = gae(t([[1.0, 2.0]], torch.float32), t([[0.5, 0.25]], torch.float32),
                   torch.ones(1, 2, dtype=torch.float64), gamma=1.0, lam=1.0)
    # A_1 = 2 − 0.25 = 1.75; A_0 = 1 + 0.25 − 0.5 + 1.75 = 2.5; R = A + V = [3, 2]
    assert adv.dtype == ret.dtype == torch.float32
    assert adv.tolist() == [[2.5, 1.75]] and ret.tolist() == [[3.0, 2.0]]


# ------------------------------------------------------------------ KL registry

def test_unknown_kl_estimator_without_a_close_name_has_no_hint():
    with pytest.raises(ValueError, match=exactly("unknown KL estimator 'zzz' (choose from ['k1', 'k2', 'k3'])")):
        get_kl_estimator("zzz")


# ------------------------------------------------------------------ masked statistics

def test_masked_stats_keep_the_data_dtype_with_a_float64_mask():
    x = t([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]], torch.float32)
    m = t([[1, 1, 0], [1, 1, 0]])
    assert masked_sum(x, m).dtype == torch.float32
    assert masked_mean(x, m).dtype == torch.float32
    assert masked_mean(x, m, dim=1).dtype == torch.float32
    assert masked_whiten(x, m).dtype == torch.float32


def test_masked_var_by_hand():
    # [1, 3]: mean 2, Σ(x − μ)² = 2; unbiased 2/(2 − 1) = 2
    assert masked_var(t([[1.0, 3.0]]), torch.ones(1, 2)).item() == 2.0
    # [1, 2, 3] (100 is padding): mean 2, Σ(x − μ)² = 2; biased 2/3
    x, m = t([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    assert masked_var(x, m, unbiased=False).item() == pytest.approx(2 / 3, abs=1e-15)


def test_masked_whiten_eps_and_shift_mean():
    # [1, 3]: mean 2, unbiased var 2; eps = 1 → (x − 2)/√3 = ∓0.57735
    w = masked_whiten(t([[1.0, 3.0]]), torch.ones(1, 2), eps=1.0)
    torch.testing.assert_close(w, t([[-1.0, 1.0]]) / math.sqrt(3.0))
    # shift_mean=False adds μ back: (x − 2)/√2 + 2 on real tokens, 0 on padding
    w = masked_whiten(t([[1.0, 3.0, 100.0]]), torch.tensor([[1, 1, 0]]), shift_mean=False, eps=0.0)
    torch.testing.assert_close(w, t([[2.0 - 1 / math.sqrt(2.0), 2.0 + 1 / math.sqrt(2.0), 0.0]]))


# ------------------------------------------------------------------ sequence log-probs

def test_sequence_logprobs_average_per_row_and_packed_prompt_tokens():
    lp = t([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # per-row means: −6/3 and −4/1 (a one-token row is divided by 1)
    assert sequence_logprobs(lp, mask, average=True).tolist() == [-2.0, -4.0]
    # Packed row: token 0 belongs to sequence 0 but is a prompt token (mask 0), so only
    # −2 counts for sequence 0; sequence 1 = −3 − 4 = −7.
    lp, mask, seg = t([[-1.0, -2.0, -3.0, -4.0]]), torch.tensor([[0, 1, 1, 1]]), torch.tensor([[0, 0, 1, 1]])
    assert sequence_logprobs(lp, mask, seg, 2).tolist() == [-2.0, -7.0]


def test_sequence_logprobs_dtype_and_device():
    lp32 = t([[-1.0, -2.0]], torch.float32)
    assert sequence_logprobs(lp32, t([[1, 1]])).dtype == torch.float32
    # packed fp64 log-probs: sums and counts accumulate in fp64 (−1.25 = (−1 − 1.5)/2)
    lp = t([[-1.0, -1.5, -7.0]])
    seg, ones = torch.tensor([[0, 0, 1]]), torch.ones(1, 3)
    with elsewhere():
        out = sequence_logprobs(lp, ones, seg, 2, average=True)
    assert out.dtype == torch.float64 and out.tolist() == [-1.25, -7.0]


# ------------------------------------------------------------------ chunked target log-probs

def reference_logprobs(h, W, targets, bias=None, temperature=1.0):
    logits = h @ W.T if bias is None else h @ W.T + bias
    return torch.log_softmax(logits / temperature, dim=-1).gather(1, targets[:, None]).squeeze(1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_target_logprobs_with_bias_equals_autograd_in_fp64(temperature):
    # N = 5 rows in chunks of 2 (the last one short), with a bias and a temperature.
    # In fp64 the chunked forward and the hand-written backward must agree with plain
    # autograd to rounding (1e-12), which also catches any fp32 intermediate.
    torch.manual_seed(0)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, 3, 3, 1])
    got = target_logprobs(h, W, targets, bias=b, chunk_size=2, temperature=temperature)
    ref = reference_logprobs(h, W, targets, b, temperature)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5], dtype=torch.float64)
    g_got = torch.autograd.grad((got * upstream).sum(), (h, W, b))
    g_ref = torch.autograd.grad((ref * upstream).sum(), (h, W, b))
    for a, e in zip(g_got, g_ref):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_target_logprobs_frozen_head_gives_only_the_hidden_gradient():
    # LoRA and frozen-head setups: only the hidden states need a gradient.
    torch.manual_seed(1)
    h = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(5, 4, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    targets = torch.tensor([4, 0, 2])
    (g,) = torch.autograd.grad(target_logprobs(h, W, targets, bias=b, chunk_size=2).sum(), h)
    (e,) = torch.autograd.grad(reference_logprobs(h, W, targets, b).sum(), h)
    torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


def test_target_logprobs_one_row_and_no_rows():
    # One row: h = [1, 0], W rows [1, 0], [0, 1] → logits [1, 0]; log p(0) = 1 − log(e + 1)
    out = target_logprobs(t([[1.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0]))
    assert out.shape == (1,)
    assert out.item() == pytest.approx(1 - math.log(math.e + 1), abs=1e-12)
    # No rows (a micro-batch with no counted token): an empty fp32 result that still
    # back-propagates, whatever the compute dtype.
    h = torch.zeros(0, 4, dtype=torch.bfloat16, requires_grad=True)
    out = target_logprobs(h, torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32
    out.sum().backward()
    assert h.grad is not None and h.grad.shape == (0, 4)


def test_target_logprobs_backward_creates_its_buffers_on_the_inputs_device():
    # Autograd runs backward outside the default-device mode, so the backward is called
    # directly here, with the context the forward pass would have saved.
    torch.manual_seed(2)
    h, W, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5)
    targets = torch.tensor([1, 2, 3])
    lse = torch.logsumexp(h @ W.T + b, dim=-1)
    ctx = SimpleNamespace(saved_tensors=(h, W, b, targets, lse), chunk_size=2, dtype=torch.float32,
                          temperature=1.0, needs_input_grad=(True, True, True, False, False, False, False))
    upstream = torch.ones(3)
    with elsewhere():
        grads = logprobs_module._ChunkedTargetLogprob.backward(ctx, upstream)
    hr, Wr, br = (x.clone().requires_grad_() for x in (h, W, b))
    expected = torch.autograd.grad(reference_logprobs(hr, Wr, targets, br).sum(), (hr, Wr, br))
    for a, e in zip(grads[:3], expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_target_logprobs_of_a_bf16_model_is_fp32_with_an_fp32_softmax():
    # bf16 hidden states and head (a model loaded in bf16, no autocast): the matmul runs
    # in bf16, the log-softmax in fp32, and the result is fp32. Here the logits are all
    # near 40 (h ≈ 1, W ≈ 5, H = 8), so the softmax is spread and log-sum-exp ≈ 43, where
    # bf16 values are 0.25 apart: a log-sum-exp kept in bf16 would be off by up to 0.125
    # and scale every probability of the backward pass by up to e^0.125.
    torch.manual_seed(0)
    h = (1 + 0.1 * torch.randn(5, 8)).bfloat16().requires_grad_()
    W = (5 + torch.randn(9, 8)).bfloat16().requires_grad_()
    targets = torch.tensor([0, 8, 4, 4, 2])
    got = target_logprobs(h, W, targets, chunk_size=2)
    assert got.dtype == torch.float32
    ref = torch.log_softmax((h @ W.T).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    g_got = torch.autograd.grad(got.sum(), (h, W))
    g_ref = torch.autograd.grad(ref.sum(), (h, W))
    for a, e in zip(g_got, g_ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e.float(), rtol=2e-2, atol=5e-2)


def test_target_logprobs_casts_the_head_to_the_hidden_dtype():
    # fp32 hidden states with a bf16 head and bias: computed in fp32 (the hidden's dtype),
    # i.e. exactly the fp32 computation with the head's bf16 values.
    torch.manual_seed(7)
    h = torch.randn(4, 6)
    W, b = torch.randn(5, 6).bfloat16(), torch.randn(5).bfloat16()
    targets = torch.tensor([0, 1, 2, 4])
    got = target_logprobs(h, W, targets, bias=b, chunk_size=3)
    torch.testing.assert_close(got, reference_logprobs(h, W.float(), targets, b.float()),
                               rtol=0, atol=1e-6)


def test_target_logprobs_accumulates_the_head_gradient_in_fp32_under_autocast():
    # 512 identical rows in chunks of 1 under bf16 autocast: every chunk adds the same
    # bf16 product x to the head gradient, so it must be 512·x (to bf16 rounding of x,
    # 0.4 %). Summed in bf16 it would stall near 256·x (its 8-bit mantissa cannot add x
    # to a sum 256 times larger), half the true value.
    torch.manual_seed(8)
    h = torch.ones(512, 4, requires_grad=True)
    W = (torch.randn(3, 4) * 0.1).requires_grad_()
    targets = torch.zeros(512, dtype=torch.long)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target_logprobs(h, W, targets, chunk_size=1)
    (g_got,) = torch.autograd.grad(got.sum(), W)
    ref = torch.log_softmax((h.bfloat16() @ W.bfloat16().T).float(), dim=-1)[:, 0]
    (g_ref,) = torch.autograd.grad(ref.sum(), W)
    torch.testing.assert_close(g_got, g_ref, rtol=2e-2, atol=1e-3)


def test_target_logprobs_under_autocast_matches_the_bf16_matmul_reference():
    # Under CPU autocast the matmuls run in bf16 (the logits are rounded to bf16, as
    # autocast would) while the softmax is fp32; the reference does the same in plain
    # autograd. fp32 parameters, bf16 compute, fp32 results and gradients.
    torch.manual_seed(3)
    h = torch.randn(6, 8, requires_grad=True)
    W = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    targets = torch.tensor([0, 1, 2, 3, 4, 10])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target_logprobs(h, W, targets, bias=b, chunk_size=4)
    assert got.dtype == torch.float32
    logits = torch.addmm(b.bfloat16(), h.bfloat16(), W.bfloat16().T).float()
    ref = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    g_got = torch.autograd.grad(got.sum(), (h, W, b))
    g_ref = torch.autograd.grad(ref.sum(), (h, W, b))
    for a, e in zip(g_got, g_ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------ gather_logprobs on models

@pytest.fixture
def model_reference(token_logprobs_from_logits):
    """model_reference(model, ids, labels, **forward_kwargs): log-probs from the full logits."""
    def reference(model, ids, labels, **kwargs):
        return token_logprobs_from_logits(model(ids, **kwargs).logits, labels)
    return reference


def batch(seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(3, 200, (2, 6))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    return ids, labels


def test_gather_logprobs_passes_the_attention_mask_and_position_ids(model_reference):
    model = tiny_causal_lm(seed=1)
    ids, labels = batch()
    # Row 1 is left-padded by two tokens: with the mask the pads are not attended to.
    am = torch.ones_like(ids)
    am[1, :2] = 0
    labels[1, :2] = IGNORE_INDEX
    with torch.no_grad():
        got = gather_logprobs(model, ids, labels, attention_mask=am)
        torch.testing.assert_close(got, model_reference(model, ids, labels, attention_mask=am),
                                   atol=1e-5, rtol=1e-5)
        # and they would change the result (so the check above means something)
        assert not torch.allclose(got, model_reference(model, ids, labels), atol=1e-3)
        # Packed rows: no attention mask, positions restart at 0 for the second sequence;
        # without a KV cache transformers reads the sequence boundaries from the positions
        # (block-diagonal attention), so the second sequence does not see the first.
        pos = torch.tensor([[0, 1, 2, 0, 1, 2]] * 2)
        got = gather_logprobs(model, ids, labels, position_ids=pos)
        packed = model_reference(model, ids, labels, position_ids=pos, use_cache=False)
        torch.testing.assert_close(got, packed, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, model_reference(model, ids, labels), atol=1e-3)


def test_gather_logprobs_temperature_logit_scale_and_head_bias(model_reference, token_logprobs_from_logits):
    ids, labels = batch(1)
    model = tiny_causal_lm(seed=2)
    with torch.no_grad():
        logits = model(ids).logits
        # temperature 2: log_softmax(logits / 2)
        torch.testing.assert_close(gather_logprobs(model, ids, labels, temperature=2.0),
                                   token_logprobs_from_logits(logits / 2.0, labels), atol=1e-5, rtol=1e-5)
        # a config logit_scale s multiplies the logits (Cohere-style): log_softmax(s·logits / T)
        model.config.logit_scale = 0.5
        torch.testing.assert_close(gather_logprobs(model, ids, labels, temperature=2.0),
                                   token_logprobs_from_logits(logits * 0.5 / 2.0, labels), atol=1e-5, rtol=1e-5)
        # logit_scale None means no scaling
        model.config.logit_scale = None
        torch.testing.assert_close(gather_logprobs(model, ids, labels),
                                   token_logprobs_from_logits(logits, labels), atol=1e-5, rtol=1e-5)
    # An output head with a bias: values and the bias gradient match the full-logits path.
    model = tiny_causal_lm(seed=3)
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(torch.linspace(-2.0, 2.0, head.out_features))
    model.lm_head = head
    got = gather_logprobs(model, ids, labels, chunk_size=3)
    ref = model_reference(model, ids, labels)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad(got.sum(), head.bias)
    (g_ref,) = torch.autograd.grad(ref.sum(), head.bias)
    torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-4)


def test_gather_logprobs_output_is_fp32_on_the_labels_device(model_reference):
    model = tiny_causal_lm(seed=1)
    ids, labels = batch()
    with torch.no_grad():
        ref = model_reference(model, ids, labels)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            got = gather_logprobs(model, ids, labels)
        finally:
            torch.set_default_dtype(previous)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        with elsewhere():
            got = gather_logprobs(model, ids, labels)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_gather_logprobs_never_holds_more_than_chunk_size_rows_of_logits(monkeypatch):
    # The module's promise: at most chunk_size × V logits at a time. Count the rows of
    # every logits block the forward pass reduces: 2 rows × 5 labels = 10 positions in
    # chunks of 3 → blocks of 3, 3, 3, 1.
    model = tiny_causal_lm(seed=1)
    ids, labels = batch()
    rows = []
    original = torch.logsumexp

    def spy(x, *args, **kwargs):
        rows.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(torch, "logsumexp", spy)
    with torch.no_grad():
        gather_logprobs(model, ids, labels, chunk_size=3)
    assert rows == [3, 3, 3, 1]


def test_gather_logprobs_through_a_peft_wrapper(model_reference):
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm(seed=4)
    ids, labels = batch(2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.1)  # a non-zero adapter, so the wrapper's forward matters
        torch.testing.assert_close(gather_logprobs(peft_model, ids, labels),
                                   model_reference(peft_model, ids, labels), atol=1e-5, rtol=1e-5)
    assert split_causal_lm(peft_model).head is model.lm_head


class TupleBackbone(nn.Module):
    """A backbone that returns a plain tuple and records how it was called."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.calls = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        self.calls.append({"attention_mask": attention_mask, "position_ids": position_ids,
                           "use_cache": use_cache})
        return (self.embed(input_ids),)


class TupleLM(nn.Module):
    base_model_prefix = "body"

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.body = TupleBackbone()
        self.head = nn.Linear(3, 6, bias=False)
        self.config = SimpleNamespace()

    def get_output_embeddings(self):
        return self.head


def test_hidden_states_of_a_tuple_returning_backbone_without_a_kv_cache(token_logprobs_from_logits):
    model = TupleLM()
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    am, pos = torch.ones_like(ids), torch.tensor([[0, 1, 2], [0, 1, 2]])
    h = hidden_states(model, ids, am, pos)
    torch.testing.assert_close(h, model.body.embed(ids))
    call = model.body.calls[-1]
    assert call["attention_mask"] is am and call["position_ids"] is pos
    assert call["use_cache"] is False  # a training forward: no KV cache is built
    labels = torch.tensor([[2, 3, IGNORE_INDEX], [5, 0, IGNORE_INDEX]])
    with torch.no_grad():
        got = gather_logprobs(model, ids, labels)
        torch.testing.assert_close(got, token_logprobs_from_logits(model.head(model.body.embed(ids)), labels))


def test_split_causal_lm_rejects_what_it_cannot_split():
    model = tiny_causal_lm(seed=1)
    model.base_model_prefix = "no_such_backbone"
    with pytest.raises(TypeError, match=exactly("LlamaForCausalLM is not a causal LM with a linear output head")):
        split_causal_lm(model)
    model = tiny_causal_lm(seed=1)
    model.lm_head = nn.Identity()
    with pytest.raises(TypeError, match=exactly("LlamaForCausalLM is not a causal LM with a linear output head")):
        split_causal_lm(model)
    model = tiny_causal_lm(seed=1)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match=exactly(
            "models with logit soft-capping are not supported by chunked log-probs")):
        split_causal_lm(model)


def test_compute_dtype_under_autocast():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert logprobs_module._compute_dtype(torch.zeros(1)) == torch.bfloat16
    assert logprobs_module._compute_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64
