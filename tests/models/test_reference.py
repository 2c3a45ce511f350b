"""The frozen reference: a copy that later updates of the policy do not reach, or the policy's
own weights when asked; summed log-probs equal to the policy's at the start; modes restored."""

import torch

from rlhfkit.data.packing import collate_padded
from rlhfkit.data.reference_cache import sequence_sums
from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer


def _batch():
    tok = tiny_tokenizer()
    return collate_padded([encode_pair(tok, as_conversation("Hi"), "yes"),
                           encode_pair(tok, as_conversation("Name a fruit."), "a pear")], 0)


def test_copy_is_frozen_and_shared_weights_follow_the_model():
    model = tiny_causal_lm(seed=1)
    batch = _batch()
    copied = ReferencePolicy(model)
    shared = ReferencePolicy(model, share_weights=True, identity="tiny(seed=1)")
    with torch.no_grad():
        start = sequence_sums(TokenLogprobs(model), batch, 2)
    torch.testing.assert_close(copied.sequence_sums(batch, 2), start, atol=1e-6, rtol=0)
    torch.testing.assert_close(shared.sequence_sums(batch, 2), start, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in copied.model.parameters()) and shared.identity == "tiny(seed=1)"
    # per-token log-probs sum to the same totals
    torch.testing.assert_close(copied.logprobs(batch).sum(-1), start, atol=1e-6, rtol=0)
    with torch.no_grad():  # an "update" of the policy
        for p in model.parameters():
            p.add_(0.05)
    torch.testing.assert_close(copied.sequence_sums(batch, 2), start, atol=1e-6, rtol=0)
    assert (shared.sequence_sums(batch, 2) - start).abs().max() > 1e-3


def test_scoring_runs_in_eval_without_grad_and_restores_the_mode():
    model = tiny_causal_lm(seed=2).train()
    reference = ReferencePolicy(model, share_weights=True)
    with reference.active() as scorer:
        assert not model.training and not torch.is_grad_enabled()
        assert scorer(_batch()).requires_grad is False
    assert model.training
    assert reference.sequence_sums(_batch(), 2).requires_grad is False and model.training
