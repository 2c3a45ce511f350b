"""Linear layers computing from weights reordered once for oneDNN (`models.prepacked`)."""

import pytest
import torch
from torch import nn

from rlhfkit.data.schemas import as_conversation
from rlhfkit.models import prepacked
from rlhfkit.models.prepacked import prepacked_linears
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.rollout.generate import SamplingConfig, generate


def _runs_here() -> bool:
    layer = nn.Linear(8, 4)
    with torch.no_grad(), prepacked_linears(layer) as applied:
        return applied


needs_ops = pytest.mark.skipif(not _runs_here(), reason="this torch build or CPU has no oneDNN fp32 linear")


def _linears(model):
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


@needs_ops
def test_packed_layers_compute_what_the_linear_layers_compute_and_are_restored_after():
    torch.manual_seed(0)
    model = tiny_causal_lm(seed=0).eval()
    ids = torch.randint(0, 288, (3, 11))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with prepacked_linears(model, rows=3) as applied:
            assert applied
            assert all("forward" in m.__dict__ for m in _linears(model))
            packed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert not any("forward" in m.__dict__ for m in _linears(model))
    assert torch.equal(after, plain)  # the layers' own forward is back
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-5)


@needs_ops
def test_a_layer_with_bias_and_any_leading_shape():
    torch.manual_seed(1)
    layer = nn.Linear(24, 40)
    x = torch.randn(2, 5, 24)
    with torch.no_grad(), prepacked_linears(layer, rows=10):
        y = layer(x)
    torch.testing.assert_close(y, x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)


@needs_ops
def test_each_block_reads_the_weights_as_they_are_when_it_starts():
    torch.manual_seed(2)
    layer = nn.Linear(16, 16, bias=False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        with prepacked_linears(layer):
            first = layer(x)
        layer.weight.mul_(2.0)  # an optimizer step between two rollouts
        with prepacked_linears(layer):
            second = layer(x)
    torch.testing.assert_close(second, 2 * first, rtol=1e-5, atol=1e-5)


@needs_ops
def test_the_forward_is_restored_when_the_block_raises():
    layer = nn.Linear(8, 8)
    with pytest.raises(ValueError), torch.no_grad(), prepacked_linears(layer):
        raise ValueError("boom")
    assert "forward" not in layer.__dict__


def test_nothing_is_packed_with_autograd_on_or_for_bf16_weights():
    layer = nn.Linear(8, 8)
    with prepacked_linears(layer) as applied:  # grad enabled: the ops have no backward
        assert not applied and "forward" not in layer.__dict__
        layer(torch.randn(2, 8)).sum().backward()
    assert layer.weight.grad is not None
    bf16 = nn.Linear(8, 8).to(torch.bfloat16)
    with torch.no_grad(), prepacked_linears(bf16) as applied:
        assert not applied and "forward" not in bf16.__dict__


def test_without_the_ops_the_layers_stay_as_they_are(monkeypatch):
    monkeypatch.setattr(prepacked, "_ops_available", lambda: False)
    layer = nn.Linear(8, 8)
    with torch.no_grad(), prepacked_linears(layer) as applied:
        assert not applied and "forward" not in layer.__dict__


@needs_ops
def test_generate_decodes_the_same_greedy_tokens_with_and_without_packing(monkeypatch):
    tok, model = tiny_tokenizer(), tiny_causal_lm(seed=3)
    prompts = [as_conversation(p) for p in ("hello there", "a b c", "the cat sat on", "x")]
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.0, batch_size=3)
    calls = []
    real = prepacked._packed_forward
    monkeypatch.setattr(prepacked, "_packed_forward", lambda *a: calls.append(1) or real(*a))
    packed = generate(model, tok, prompts, cfg)
    assert len(calls) > 15  # generate decoded through the packed layers (15 per forward, one check call)
    monkeypatch.setattr(prepacked, "_ops_available", lambda: False)
    plain = generate(model, tok, prompts, cfg)
    assert [g.response_ids for g in packed] == [g.response_ids for g in plain]


@needs_ops
def test_a_packed_op_that_disagrees_with_f_linear_is_not_used(monkeypatch):
    monkeypatch.setattr(prepacked, "_packed_forward", lambda packed, bias, x: torch.zeros(x.shape[0], 8))
    layer = nn.Linear(8, 8)
    with torch.no_grad(), prepacked_linears(layer) as applied:
        assert not applied and "forward" not in layer.__dict__


def test_a_layer_whose_forward_was_replaced_is_left_alone():
    layer = nn.Linear(8, 8)
    hooked = layer.forward
    layer.forward = hooked  # as accelerate's offload hooks do (an instance attribute)
    with torch.no_grad(), prepacked_linears(layer) as applied:
        assert not applied and layer.__dict__["forward"] is hooked
    assert layer.__dict__["forward"] is hooked
