"""Preference pairs and KTO examples as model input: encoding, skipping, batch layout."""

import torch

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import SkipReport
from rlhfkit.data.preference_batches import (
    collate_feedback,
    collate_pairs,
    encode_feedback,
    encode_preference_pairs,
)
from rlhfkit.data.schemas import PreferencePair, UnpairedFeedback, as_conversation
from rlhfkit.models.tiny import tiny_tokenizer


def _pair(chosen, rejected, label=1.0, margin=None):
    return PreferencePair(as_conversation("Hi"), chosen, rejected, label=label, margin=margin)


def test_pairs_share_the_prompt_carry_label_margin_and_tie():
    pairs = encode_preference_pairs(tiny_tokenizer(), [_pair("a", "bb", margin=2.0), _pair("c", "d", label=0.5)])
    first, tie = pairs
    # Prompt "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" = 21 tokens (bytes, one per special);
    # response "a<|im_end|>\n" = 3 tokens, "bb<|im_end|>\n" = 4.
    assert first.chosen.prompt_len == first.rejected.prompt_len == 21
    assert first.chosen.input_ids[:21] == first.rejected.input_ids[:21]
    assert (len(first.chosen), len(first.rejected), len(first)) == (24, 25, 49)
    assert (first.label, first.margin, first.is_tie) == (1.0, 2.0, False)
    assert (tie.label, tie.margin, tie.is_tie) == (0.5, 0.0, True)


def test_identical_and_over_length_pairs_are_skipped_only_as_asked():
    pairs = [_pair("a", "b"), _pair("same", "same"), _pair("x" * 40, "b")]
    skipped = SkipReport()
    kept = encode_preference_pairs(tiny_tokenizer(), pairs, 32, skipped, "p.jsonl", drop_identical=True)
    assert len(kept) == 1
    assert skipped.examples == {"identical responses": ["p.jsonl pair 2"], "longer than max_length": ["p.jsonl pair 3"]}
    # Without drop_identical (the reward-model recipe) the identical pair stays; no max_length keeps all.
    assert len(encode_preference_pairs(tiny_tokenizer(), pairs, 32)) == 2
    assert len(encode_preference_pairs(tiny_tokenizer(), pairs)) == 3


def test_collate_pairs_puts_chosen_first_and_counts_response_tokens():
    pairs = encode_preference_pairs(tiny_tokenizer(), [_pair("a", "bb", margin=1.0), _pair("ccc", "d", label=0.8)])
    for packed in (True, False):
        batch = collate_pairs(pairs, 0, packed=packed)
        assert batch.num_pairs == 2 and batch.ref_logps is None
        # chosen "a", "ccc", then rejected "bb", "d"; each response counts its text, the
        # end-of-turn marker and the "\n" after it: 1 + 2, 3 + 2, 2 + 2, 1 + 2 tokens
        assert batch.response_lengths.tolist() == [3.0, 5.0, 4.0, 3.0]
        assert batch.label.tolist() == [1.0, 0.800000011920929] and batch.margin.tolist() == [1.0, 0.0]
        labels = batch.sequences.labels
        if packed:
            assert labels.shape[0] == 1 and batch.sequences.num_examples == 4
        else:  # rows 0..B−1 chosen, B..2B−1 rejected
            assert labels.shape[0] == 4
            assert int((labels[2] != IGNORE_INDEX).sum()) == 4
    ref = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert collate_pairs(pairs, 0, packed=True, ref_logps=ref).ref_logps is ref


def test_feedback_gets_a_mismatched_sequence_from_another_prompt():
    feedback = [UnpairedFeedback(as_conversation(f"Q{i}"), f"r{i}", i % 2 == 0) for i in range(4)]
    items = encode_feedback(tiny_tokenizer(), feedback, 512, SkipReport(), "mem", seed=0)
    assert [f.desirable for f in items] == [True, False, True, False]
    for item in items:
        prompt = item.completion.input_ids[:item.completion.prompt_len]
        assert item.mismatched.input_ids[:item.mismatched.prompt_len] == prompt
        assert item.mismatched.input_ids[item.mismatched.prompt_len:] != item.completion.input_ids[len(prompt):]
    batch = collate_feedback(items, 0, packed=False)
    assert batch.num_examples == 4 and batch.desirable.tolist() == [True, False, True, False]
    assert batch.completions.input_ids.shape[0] == batch.mismatched.input_ids.shape[0] == 4


def test_skip_report_names_each_place_once():
    from rlhfkit.data.errors import SkipReport

    report = SkipReport()
    for _ in range(7):
        report.add("tie (ties=drop)", "prefs.jsonl")        # a whole-file reason: no line number
    report.add("too long", "prefs.jsonl:3")
    assert report.counts == {"tie (ties=drop)": 7, "too long": 1}
    assert report.describe() == "skipped 7 tie (ties=drop), 1 too long (prefs.jsonl; prefs.jsonl:3)"
    assert SkipReport().describe() == "no records skipped"


def test_shared_prompt_pairs_store_each_prompt_once_and_keep_the_segment_numbering():
    """Two pairs (prompts of 21 tokens; responses 3/4 and 3/3 tokens): chosen whole, then the
    rejected side from the last prompt token on. Segment ids still number chosen sides 0..B−1
    and rejected sides B..2B−1, so per-sequence sums and last-token pooling read them as before.
    (Consecutive pairs of one prompt would share it too: all four sides after one copy.)"""
    other = PreferencePair(as_conversation("Yo"), "c", "d")
    pairs = encode_preference_pairs(tiny_tokenizer(), [_pair("a", "bb"), other])
    batch = collate_pairs(pairs, pad_id=0, packed=True, share_prompts=True).sequences
    plain = collate_pairs(pairs, pad_id=0, packed=True).sequences
    assert batch.num_tokens == 24 + 5 + 24 + 4 and plain.num_tokens == 24 + 25 + 24 + 24
    (segments,) = batch.segment_ids.tolist()
    assert segments == [0] * 24 + [2] * 5 + [1] * 24 + [3] * 4
    (positions,) = batch.position_ids.tolist()
    assert positions == list(range(24)) + list(range(20, 25)) + list(range(24)) + list(range(20, 24))
    # each side's counted labels are its response, in both layouts
    for s in range(4):
        assert batch.labels[(batch.segment_ids == s) & batch.loss_mask].tolist() == \
            plain.labels[(plain.segment_ids == s) & plain.loss_mask].tolist()
