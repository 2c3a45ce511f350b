"""The fp32 matmul attention kernel: the same outputs and gradients as SDPA in fp32, close to
SDPA's in bf16 (closer than transformers' eager kernel), masks respected. Right-padded rows
build no mask (causal attention within each row); left-padded ones go through the masked paths."""

import dataclasses

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from rlhfkit.data.batches import IGNORE_INDEX, LMBatch, pad_right
from rlhfkit.data.packing import collate_padded
from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair, render_prompt
from rlhfkit.models import attention
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.ops.logprobs import gather_logprobs


def _batch(padding: str = "right"):
    tok = tiny_tokenizer()
    rows = [encode_pair(tok, as_conversation("first prompt, a longer one"), "alpha beta"),
            encode_pair(tok, as_conversation("second"), "gamma")]
    batch = collate_padded(rows, tok.pad_token_id)
    if padding == "left":  # each row's padding moved to its front: a mask the kernel must apply
        shifts = [int(n) for n in (batch.attention_mask == 0).sum(-1)]
        roll = lambda x: torch.stack([r.roll(n) for r, n in zip(x, shifts, strict=True)])  # noqa: E731
        batch = dataclasses.replace(batch, input_ids=roll(batch.input_ids), labels=roll(batch.labels),
                                    attention_mask=roll(batch.attention_mask))
    return batch


def _logprobs(model, batch):
    return gather_logprobs(model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_fp32_matmul_equals_sdpa_in_fp32_forward_and_backward(padding):
    batch = _batch(padding)
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
    batch = _batch("left")  # the second row has fully masked (padding) query rows
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


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])  # 4 query heads: grouped 4, 2, none
def test_grouped_query_heads_are_shared(kv_heads, padding):
    batch = _batch(padding)
    out = {}
    for impl in ("sdpa", attention.register()):
        model = tiny_causal_lm(seed=2, kv_heads=kv_heads)
        model.set_attn_implementation(impl)
        out[impl] = _logprobs(model, batch).detach()
    a, b = out.values()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_right_padded_mask_over_the_rows_own_tokens_is_not_built():
    built = attention._unless_packed(lambda **kwargs: "built")
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    plain = dict(mask_function=causal_mask_function, q_length=4, kv_length=4, q_offset=0, kv_offset=0)
    assert built(attention_mask=right, **plain) is None  # causal attention needs no padding mask here
    assert built(attention_mask=None, **plain) is None  # packed rows: masked per sequence by the kernel
    assert built(attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), **plain) == "built"  # left padding
    assert built(attention_mask=torch.tensor([[1, 0, 1, 1]]), **plain) == "built"  # a hole
    assert built(attention_mask=right, **{**plain, "q_length": 1, "q_offset": 3}) == "built"  # after a cache
    window = {**plain, "mask_function": sliding_window_causal_mask_function(2)}
    assert built(attention_mask=right, **window) == "built"  # any mask function but the causal one
    assert attention.right_padded(right) and not attention.right_padded(torch.tensor([[0, 1]]))


def test_right_padded_rows_reach_the_causal_kernel_without_a_mask(monkeypatch):
    """The padded batch goes through one causal SDPA call per layer (not the masked matmul),
    with the real tokens' log-probs and the gradients of the masked computation."""
    batch = _batch("right")
    model = tiny_causal_lm(seed=1)
    model.set_attn_implementation(attention.register())
    masked = []
    monkeypatch.setattr(attention, "_matmul", lambda *a, **k: masked.append(1) or pytest.fail("masked path"))
    lp = _logprobs(model, batch)
    lp.sum().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    reference = tiny_causal_lm(seed=1)
    reference.set_attn_implementation("eager")  # transformers' own masked matmul attention
    ref = _logprobs(reference, batch)
    ref.sum().backward()
    torch.testing.assert_close(lp.detach(), ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, torch.cat([p.grad.flatten() for p in reference.parameters()]),
                               atol=1e-5, rtol=1e-4)


def test_sequence_spans_of_packed_rows():
    S = attention.Span
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert attention.sequence_spans(pos, 2, 6) == [[S(0, 3), S(3, 5), S(5, 6)], [S(0, 4), S(4, 6)]]
    assert attention.sequence_spans(None, 2, 6) == [[S(0, 6)], [S(0, 6)]]
    assert attention.sequence_spans(torch.arange(6)[None], 2, 6) == [[S(0, 6)], [S(0, 6)]]  # broadcast row


def test_sequence_spans_read_branches_from_position_ids_that_step_back():
    # 0 1 2 3 4 | 2 3 4 | 2 3 → the sequences 0..4, 0 1 + 2 3 4 and 0 1 + 2 3; then a plain one, 0 1
    pos = torch.tensor([[0, 1, 2, 3, 4, 2, 3, 4, 2, 3, 0, 1]])
    (row,) = attention.sequence_spans(pos, 1, 12)
    assert row == [attention.Span(0, 10, ((3, 2), (2, 2))), attention.Span(10, 12)]
    assert row[0].trunk == 5
    attention._last_spans[0] = None
    with pytest.raises(ValueError, match="starts at position 3, but its sequence's trunk has 2 tokens"):
        attention.sequence_spans(torch.tensor([[0, 1, 3, 4]]), 1, 4)  # a gap: no trunk to continue


def _branch_case(tok):
    """Three sequences of one prompt and one of another, as separate padded rows and as
    shared-prompt packed rows (the first prompt stored once)."""
    from rlhfkit.data.packing import collate_shared_prompts

    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first = ids(render_prompt(tok, as_conversation("a shared prompt, longer than its answers")))
    other = ids(render_prompt(tok, as_conversation("another")))
    answers = [(first, "x y"), (first, "one two three four"), (first, "z"), (other, "w v")]
    seqs, lengths = [], []
    for prompt, answer in answers:
        response = ids(answer)
        seqs.append((prompt + response, [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX]))
        lengths.append(len(prompt))
    padded = LMBatch(pad_right([s for s, _ in seqs], 0), pad_right([[1] * len(s) for s, _ in seqs], 0),
                     pad_right([lab for _, lab in seqs], IGNORE_INDEX))
    return padded, collate_shared_prompts(seqs, lengths)


@pytest.mark.parametrize("name", [attention.NAME, attention.PACKED_SDPA])
def test_shared_prompt_rows_give_each_sequences_logprobs_and_gradients(name):
    """Each sequence's response log-probs (read in order) and the gradient of a weighted sum
    of them: the same whether a prompt is stored once per sequence (padded rows, transformers'
    eager kernel) or once for its three sequences (branches in one packed row, each kernel)."""
    tok = tiny_tokenizer()
    padded, shared = _branch_case(tok)
    assert shared.input_ids.shape[0] == 1 and shared.num_tokens < padded.num_tokens
    results = []
    for kernel, batch in (("eager", padded), (name, shared)):
        model = tiny_causal_lm(seed=2)
        attention.register()
        model.set_attn_implementation(kernel)
        lp = gather_logprobs(model, batch.input_ids, batch.labels, position_ids=batch.position_ids,
                             attention_mask=None if batch.packed else batch.attention_mask)
        flat = lp[batch.labels != IGNORE_INDEX]
        (flat * torch.linspace(0.5, 1.5, len(flat))).sum().backward()
        results.append((flat.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (lp_padded, g_padded), (lp_shared, g_shared) = results
    torch.testing.assert_close(lp_shared, lp_padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_shared, g_padded, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", [attention.NAME, attention.PACKED_SDPA])
def test_packed_rows_cost_the_sum_of_squares_not_the_row_squared(name, monkeypatch):
    """No T×T mask is built for a packed row and the kernel sees each sequence alone: scores
    of n_i × n_i, Σ n_i² in all (here 5² + 3² + 4² = 50 of the row's 12² = 144)."""
    from rlhfkit.data.packing import collate_packed

    tok = tiny_tokenizer()
    attention.register()
    model = tiny_causal_lm(seed=1)
    model.set_attn_implementation(name)
    shapes = []
    real = attention._per_sequence

    def spy(kernel, query, key, value, spans):
        shapes.extend((span.end - span.start) for row in spans for span in row)
        return real(kernel, query, key, value, spans)

    monkeypatch.setattr(attention, "_per_sequence", spy)
    exs = [encode_pair(tok, as_conversation(p), r) for p, r in [("one", "a b"), ("two", "c"), ("three", "d e f")]]
    packed = collate_packed(exs, tok.pad_token_id)
    logits = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
    assert torch.isfinite(logits).all()
    layers = model.config.num_hidden_layers
    assert sorted(shapes) == sorted([len(e) for e in exs] * layers)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert ALL_MASK_ATTENTION_FUNCTIONS[name](batch_size=1, attention_mask=None) is None


def test_queries_after_cached_keys_see_every_earlier_token():
    """Decoding with a KV cache (no padding mask): one new query attends to all cached keys,
    as in a full forward pass."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(seed=1)
    model.set_attn_implementation(attention.register())
    ids = torch.tensor([tok("hello there world", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], cache=first.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def _packed_and_padded(tok):
    from rlhfkit.data.packing import collate_packed

    texts = [("one", "a b c d e f"), ("two", "x"), ("three", "long answer here"), ("four", "y z"), ("five", "w")]
    exs = [encode_pair(tok, as_conversation(p), r) for p, r in texts]
    cap = 64  # lengths 35, 25, 42, 28, 26 → rows of 60: {42 + padding}, {35, 25}, {28, 26 + padding}
    return exs, collate_packed(exs, tok.pad_token_id, row_tokens=cap), collate_padded(exs, tok.pad_token_id)


def test_packed_rows_give_the_padded_gradients():
    """Each example's weighted log-prob sum, packed into several rows (sequences cut by split,
    fp32 SDPA per sequence) or padded (fp32 matmul with the mask): same loss, same gradients."""
    from rlhfkit.ops.logprobs import sequence_logprobs

    tok = tiny_tokenizer()
    exs, packed, padded = _packed_and_padded(tok)
    assert packed.input_ids.shape[0] > 1 and (packed.segment_ids < 0).any()
    coef = torch.linspace(0.5, 1.5, len(exs))
    grads = []
    for batch in (packed, padded):
        model = tiny_causal_lm(seed=4)
        model.set_attn_implementation(attention.register())
        lp = gather_logprobs(model, batch.input_ids, batch.labels, position_ids=batch.position_ids,
                             attention_mask=None if batch.packed else batch.attention_mask)
        seq = sequence_logprobs(lp, batch.loss_mask, batch.segment_ids, len(exs))
        (seq * coef).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_packed_sequences_attend_in_fp32_under_bf16_autocast(monkeypatch):
    tok = tiny_tokenizer()
    _, packed, _ = _packed_and_padded(tok)
    model = tiny_causal_lm(seed=4)
    model.set_attn_implementation(attention.register())
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu"), kw["is_causal"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = gather_logprobs(model, packed.input_ids, packed.labels, position_ids=packed.position_ids)
    assert torch.isfinite(lp).all()
    spans = sum(len(row) for row in attention.sequence_spans(packed.position_ids, *packed.input_ids.shape))
    assert seen == [(torch.float32,) * 3 + (False, True)] * (spans * model.config.num_hidden_layers)
