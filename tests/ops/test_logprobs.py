"""Chunked log-probs against hand values and against the plain full-logits computation."""

import math

import pytest
import torch

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.models.tiny import tiny_causal_lm
from rlhfkit.ops.logprobs import gather_logprobs, sequence_logprobs, target_logprobs
from rlhfkit.ops.stats import masked_mean, masked_sum, masked_whiten


def test_target_logprobs_hand_values():
    # h = [1, 0], W rows = [1,0], [0,1], [0,0]  → logits [1, 0, 0]
    # log p(0) = 1 − log(e + 2) = 1 − log(4.71828) = −0.551445
    # log p(2) = 0 − log(e + 2) = −1.551445
    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    out = target_logprobs(h, W, torch.tensor([0, 2]), chunk_size=1)
    assert out.tolist() == pytest.approx([1 - math.log(math.e + 2), -math.log(math.e + 2)], abs=1e-6)


def test_target_logprobs_gradients_match_autograd():
    torch.manual_seed(0)
    h = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    assert torch.autograd.gradcheck(lambda h, W: target_logprobs(h, W, t, chunk_size=4, temperature=0.7), (h, W))


@pytest.mark.parametrize("chunk", [1, 3, 512])
def test_gather_logprobs_equals_full_logits(chunk, token_logprobs_from_logits):
    model = tiny_causal_lm(seed=1)
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 7))
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = IGNORE_INDEX
    labels[0, :3] = IGNORE_INDEX  # a prompt that does not count
    ref = token_logprobs_from_logits(model(ids).logits, labels)
    got = gather_logprobs(model, ids, labels, chunk_size=chunk)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got[labels == IGNORE_INDEX] == 0).all()
    # gradients agree too
    g1 = torch.autograd.grad(got.sum(), model.model.embed_tokens.weight)[0]
    g2 = torch.autograd.grad(token_logprobs_from_logits(model(ids).logits, labels).sum(),
                             model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_sequence_logprobs_plain_and_packed():
    lp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert sequence_logprobs(lp, mask).tolist() == [-6.0]
    assert sequence_logprobs(lp, mask, average=True).tolist() == [-2.0]
    seg = torch.tensor([[0, 0, 1, -1]])
    assert sequence_logprobs(lp, mask, seg, 2).tolist() == [-3.0, -3.0]
    assert sequence_logprobs(lp, mask, seg, 2, average=True).tolist() == [-1.5, -3.0]


def test_masked_stats_hand_values():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    assert masked_sum(x, m).item() == 10.0
    assert masked_mean(x, m).item() == 2.5
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 3.5]
    assert masked_mean(x, torch.zeros_like(m), dim=1).tolist() == [0.0, 0.0]  # no NaN
    w = masked_whiten(x, m)
    # mean 2.5, unbiased var = (2.25+0.25+0.25+2.25)/3 = 5/3
    assert w[0, 0].item() == pytest.approx(-1.5 / math.sqrt(5 / 3), abs=1e-6)
    assert w[:, 2].tolist() == [0.0, 0.0]
