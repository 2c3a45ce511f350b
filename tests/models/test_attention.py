"""The fp32 matmul attention kernel: the same outputs and gradients as SDPA in fp32, close to
SDPA's in bf16 (closer than transformers' eager kernel), masks respected."""

import pytest
import torch

from rlhfkit.data.packing import collate_padded
from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models import attention
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.ops.logprobs import gather_logprobs


def _batch():
    tok = tiny_tokenizer()
    rows = [encode_pair(tok, as_conversation("first prompt, a longer one"), "alpha beta"),
            encode_pair(tok, as_conversation("second"), "gamma")]
    return collate_padded(rows, tok.pad_token_id)


def _logprobs(model, batch):
    return gather_logprobs(model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask)


def test_fp32_matmul_equals_sdpa_in_fp32_forward_and_backward():
    batch = _batch()
    out, grads = {}, {}
    for impl in ("sdpa", attention.register()):
        model = tiny_causal_lm(seed=1)
        model.set_attn_implementation(impl)
        lp = _logprobs(model, batch)
        lp.sum().backward()
        out[impl] = lp.detach()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters()])
    a, b = out.values()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ga, gb = grads.values()
    torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4)


def test_in_bf16_it_stays_closer_to_sdpa_than_eager_does():
    batch = _batch()
    model = tiny_causal_lm(seed=1)
    lps = {}
    for impl in ("sdpa", "eager", attention.register()):
        model.set_attn_implementation(impl)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            lps[impl] = _logprobs(model, batch).float()
    ours = (lps[attention.NAME] - lps["sdpa"]).abs().max()
    eager = (lps["eager"] - lps["sdpa"]).abs().max()
    assert ours <= eager


def test_large_calls_go_to_sdpa_with_the_same_result(monkeypatch):
    batch = _batch()  # right-padded: the second row has fully masked (padding) query rows
    model = tiny_causal_lm(seed=1)
    model.set_attn_implementation(attention.register())
    small = _logprobs(model, batch).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        small_bf16 = _logprobs(model, batch)
    monkeypatch.setattr(attention, "MATMUL_MAX_ELEMENTS", 0)
    torch.testing.assert_close(_logprobs(model, batch).detach(), small, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 queries, an fp32 additive mask
        large_bf16 = _logprobs(model, batch)
    large_bf16.sum().backward()
    assert torch.isfinite(large_bf16).all() and all(torch.isfinite(p.grad).all() for p in model.parameters())
    torch.testing.assert_close(large_bf16.detach(), small_bf16.detach(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # 4 query heads: grouped 4, 2, none
def test_grouped_query_heads_are_shared(kv_heads):
    batch = _batch()
    out = {}
    for impl in ("sdpa", attention.register()):
        model = tiny_causal_lm(seed=2, kv_heads=kv_heads)
        model.set_attn_implementation(impl)
        out[impl] = _logprobs(model, batch).detach()
    a, b = out.values()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
