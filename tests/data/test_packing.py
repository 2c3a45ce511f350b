"""Tokenization masks, packing without attention leaking across examples, batch plans."""

import pytest
import torch

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.packing import collate_packed, collate_padded, plan_batches
from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair, render_prompt
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.ops.logprobs import gather_logprobs


def test_loss_mask_covers_exactly_the_response():
    tok = tiny_tokenizer()
    enc = encode_pair(tok, as_conversation("Hi"), "ok")
    text = tok.decode(enc.input_ids)
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    prompt_len = len(tok(render_prompt(tok, as_conversation("Hi")), add_special_tokens=False)["input_ids"])
    assert enc.prompt_len == prompt_len
    # labels[t] = ids[t+1] for the response tokens ("ok<|im_end|>\n" = 4 tokens), else ignored
    counted = [(t, lab) for t, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
    assert [lab for _, lab in counted] == enc.input_ids[prompt_len:]
    assert [t for t, _ in counted] == list(range(prompt_len - 1, len(enc) - 1))
    assert tok.decode([lab for _, lab in counted]) == "ok<|im_end|>\n"


def _use(model, attention: str) -> None:
    """fp32-matmul: CPU training; packed-sdpa: GPU training (both rlhfkit's, padding-free)."""
    from rlhfkit.models.attention import NAME, PACKED_SDPA, register

    if attention in ("fp32-matmul", "packed-sdpa"):
        register()
        attention = {"fp32-matmul": NAME, "packed-sdpa": PACKED_SDPA}[attention]
    model.set_attn_implementation(attention)


@pytest.mark.parametrize("attention", ["sdpa", "eager", "fp32-matmul", "packed-sdpa"])
def test_packed_rows_do_not_attend_across_examples(attention):
    tok = tiny_tokenizer()
    model = tiny_causal_lm(seed=3)
    _use(model, attention)
    a = encode_pair(tok, as_conversation("first prompt"), "alpha")
    b = encode_pair(tok, as_conversation("second"), "beta gamma")
    packed = collate_packed([a, b])
    assert packed.input_ids.shape == (1, len(a) + len(b))
    assert packed.position_ids[0, len(a)].item() == 0
    lp_packed = gather_logprobs(model, packed.input_ids, packed.labels, position_ids=packed.position_ids)
    padded = collate_padded([a, b], tok.pad_token_id)
    lp_padded = gather_logprobs(model, padded.input_ids, padded.labels, attention_mask=padded.attention_mask)
    torch.testing.assert_close(lp_packed[0, :len(a)], lp_padded[0, :len(a)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp_packed[0, len(a):], lp_padded[1, :len(b)], atol=1e-5, rtol=1e-5)
    # Changing the first example must not change the second one's log-probs.
    a2 = encode_pair(tok, as_conversation("a very different first prompt"), "zzz")
    packed2 = collate_packed([a2, b])
    lp2 = gather_logprobs(model, packed2.input_ids, packed2.labels, position_ids=packed2.position_ids)
    torch.testing.assert_close(lp2[0, len(a2):], lp_packed[0, len(a):], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "fp32-matmul", "packed-sdpa"])
def test_packing_into_several_rows_keeps_each_examples_logprobs_and_order(attention):
    """With a row cap, first-fit by decreasing length puts the examples in several rows,
    padded at the end; every example's log-probs equal its own padded row's, segment ids keep
    the input order, and padding is masked out."""
    from rlhfkit.ops.logprobs import sequence_logprobs

    tok = tiny_tokenizer()
    model = tiny_causal_lm(seed=3)
    _use(model, attention)
    texts = [("one", "a b c d e f"), ("two", "x"), ("three", "long answer here"), ("four", "y z")]
    exs = [encode_pair(tok, as_conversation(p), r) for p, r in texts]
    lengths = sorted(len(e) for e in exs)
    cap = lengths[-1] + lengths[0]  # the longest and the shortest share a row, the middle two don't
    packed = collate_packed(exs, tok.pad_token_id, row_tokens=cap)
    rows, width = packed.input_ids.shape
    assert 1 < rows < len(exs) and width == cap
    assert packed.num_tokens == sum(len(e) for e in exs)
    assert sorted(packed.segment_ids[packed.segment_ids >= 0].unique().tolist()) == [0, 1, 2, 3]
    assert (packed.labels[packed.segment_ids < 0] == IGNORE_INDEX).all()
    lp = gather_logprobs(model, packed.input_ids, packed.labels, position_ids=packed.position_ids)
    padded = collate_padded(exs, tok.pad_token_id)
    lp_pad = gather_logprobs(model, padded.input_ids, padded.labels, attention_mask=padded.attention_mask)
    seq_packed = sequence_logprobs(lp, packed.loss_mask, packed.segment_ids, len(exs))
    seq_padded = sequence_logprobs(lp_pad, padded.loss_mask)
    torch.testing.assert_close(seq_packed, seq_padded, atol=1e-4, rtol=1e-5)
    # without a cap (the default holds 2048 tokens) the same examples share one row
    assert collate_packed(exs, tok.pad_token_id).input_ids.shape == (1, sum(len(e) for e in exs))


def test_plan_batches_deterministic_complete_and_grouped():
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    p1 = plan_batches(lengths, 2, seed=1, epoch=0)
    assert p1 == plan_batches(lengths, 2, seed=1, epoch=0)
    assert p1 != plan_batches(lengths, 2, seed=1, epoch=1)
    assert sorted(i for b in p1 for i in b) == list(range(8))
    # length grouping: each batch holds two short or two long examples
    for b in p1:
        assert len({lengths[i] > 20 for i in b}) == 1


def test_rows_are_balanced_to_the_narrowest_width_first_fit_finds():
    """Hand-derived: Σ = 4925 tokens need 3 rows of ≤ 2048; two of the four longest (1020, 943,
    896, 808) share a row, so the width is at least 896 + 808 = 1704, and first-fit at 1704
    reaches it: {1020, 462, 73} = 1555, {943, 426, 297} = 1666, {896, 808} = 1704. Rows padded
    to the first packing's widest row instead would hold 3 × 2036 positions."""
    from rlhfkit.data.packing import pack_rows
    from rlhfkit.data.tokenize import Encoded

    lengths = [896, 426, 808, 943, 462, 73, 297, 1020]
    assert pack_rows(lengths, 2048) == [[7, 4, 5], [3, 1, 6], [0, 2]]
    exs = [Encoded(list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n)), 1) for n in lengths]
    packed = collate_packed(exs, 0)
    assert packed.input_ids.shape == (3, 1704)
    assert packed.attention_mask.sum().item() == packed.num_tokens == sum(lengths)
    for i, n in enumerate(lengths):  # every example whole, positions 0 … n−1
        assert packed.position_ids[packed.segment_ids == i].tolist() == list(range(n))
    assert pack_rows([3, 2, 5], 16) == [[2, 0, 1]]  # one row: nothing to balance
    assert pack_rows([], 16) == []


@pytest.mark.parametrize("seed", range(5))
def test_balanced_rows_keep_every_example_once_within_the_cap(seed):
    import random

    from rlhfkit.data.packing import pack_rows

    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(2, 30))]
    rows = pack_rows(lengths, 512)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    widths = [sum(lengths[i] for i in row) for row in rows]
    assert max(widths) <= 512 and max(widths) >= max(max(lengths), -(-sum(lengths) // len(rows)))


def test_collate_shared_prompts_stores_a_run_of_equal_prompts_once():
    """Sequences 1–3 share the prompt 5 6 7 (P = 3): the first whole, the others from the last
    prompt token on, at positions 2, 3, … (a branch continuing the first two tokens); the 4th
    has its own prompt. The counted labels, row by row, are the four responses in order."""
    from rlhfkit.data.packing import collate_shared_prompts

    I = IGNORE_INDEX
    seqs = [([5, 6, 7, 8, 9], [I, I, 8, 9, I]), ([5, 6, 7, 10], [I, I, 10, I]),
            ([5, 6, 7, 11, 12, 13], [I, I, 11, 12, 13, I]), ([4, 7, 14], [I, 14, I])]
    batch = collate_shared_prompts(seqs, [3, 3, 3, 2])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 7, 10, 7, 11, 12, 13, 4, 7, 14]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 2, 3, 4, 5, 0, 1, 2]]
    assert batch.labels.tolist() == [[I, I, 8, 9, I, 10, I, 11, 12, 13, I, I, 14, I]]
    assert batch.segment_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]]
    assert batch.labels[batch.labels != I].tolist() == [8, 9, 10, 11, 12, 13, 14]
    assert batch.attention_mask.tolist() == [[1] * 14]  # one row, no padding
    # equal prompts that are not consecutive are not shared; a label inside a shared prompt is refused
    apart = collate_shared_prompts([seqs[0], seqs[3], seqs[1]], [3, 2, 3])
    assert apart.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="sequence 1: a label before the last token of its shared prompt"):
        collate_shared_prompts([seqs[0], ([5, 6, 7, 10], [6, I, 10, I])], [3, 3])
    with pytest.raises(ValueError, match="sequence 0: prompt length 4 for 3 tokens"):
        collate_shared_prompts([seqs[3]], [4])


def test_positions_from_mask_count_real_tokens_and_never_step_back_on_right_padding():
    """Left padding: the real tokens count from 0 (pads at 0). Right padding keeps counting, so
    the row stays one sequence for rlhfkit's kernels (a repeated position would be a branch)."""
    from rlhfkit.data.batches import positions_from_mask
    from rlhfkit.models.attention import Span, sequence_spans

    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    positions = positions_from_mask(mask)
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    assert sequence_spans(positions[[0, 2]], 2, 5) == [[Span(0, 5)], [Span(0, 5)]]
