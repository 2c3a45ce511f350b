"""Reward protocol, running moments, weighted combination and the classifier reward."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rollout.rewards import (
    ClassifierReward,
    FunctionReward,
    RewardSource,
    RunningMoments,
    Sample,
    WeightedRewards,
)


class FixedScores:
    """A reward source that returns preset scores, batch after batch."""

    def __init__(self, name: str, batches: list[list[float]]):
        self.name = name
        self.batches = list(batches)

    def score(self, samples):
        return self.batches.pop(0)


def samples(n: int) -> list[Sample]:
    return [Sample(prompt=f"p{i}", response=f"r{i}", meta={}) for i in range(n)]


# --------------------------------------------------------------------------------------
# RunningMoments
# --------------------------------------------------------------------------------------

def test_running_moments_merge_batches_like_one_pass():
    # [1, 3] then [5]: all values 1, 3, 5 -> mean 3, unbiased var ((−2)²+0²+2²)/2 = 4.
    # Chan merge: n_a=2, μ_a=2, M2_a=2; batch n_b=1, μ_b=5, M2_b=0; δ=3;
    # μ = 2 + 3·1/3 = 3; M2 = 2 + 0 + 9·2·1/3 = 8; var = 8/2 = 4.
    m = RunningMoments()
    m.update([1.0, 3.0])
    assert (m.count, m.mean, m.m2) == (2, 2.0, 2.0)
    m.update([5.0])
    assert m.count == 3
    assert m.mean == pytest.approx(3.0)
    assert m.m2 == pytest.approx(8.0)
    assert m.var == pytest.approx(4.0)
    assert m.normalize([5.0, 1.0]) == pytest.approx([1.0, -1.0])


def test_running_moments_empty_update_and_constant_stream():
    m = RunningMoments()
    m.update([])
    assert m.count == 0 and m.var == 0.0
    m.update([0.1, 0.1, 0.1])
    # σ = 0: normalizing a constant stream gives 0, not inf/NaN.
    assert m.normalize([0.1]) == pytest.approx([0.0], abs=1e-6)


def test_running_moments_state_dict_round_trip_and_validation():
    m = RunningMoments()
    m.update([2.0, 4.0, 9.0])
    restored = RunningMoments()
    restored.load_state_dict(m.state_dict())
    m.update([1.0])
    restored.update([1.0])
    assert restored.state_dict() == m.state_dict()
    with pytest.raises(ValueError, match="missing keys"):
        restored.load_state_dict({"count": 1})


# --------------------------------------------------------------------------------------
# WeightedRewards
# --------------------------------------------------------------------------------------

def test_weighted_rewards_without_normalization_is_the_weighted_sum():
    # A = [1, 3] with w=0.5, B = [0, 1] with w=2  ->  [0.5·1 + 2·0, 0.5·3 + 2·1] = [0.5, 3.5]
    a, b = FixedScores("a", [[1.0, 3.0]]), FixedScores("b", [[0.0, 1.0]])
    combined, raw = WeightedRewards([(a, 0.5), (b, 2.0)]).score_detailed(samples(2))
    assert combined == pytest.approx([0.5, 3.5])
    assert raw == {"a": [1.0, 3.0], "b": [0.0, 1.0]}


def test_weighted_rewards_normalizes_each_source_by_its_running_moments():
    # Batch 1: A = [1, 3]: μ=2, σ=√2 -> [−1/√2, 1/√2]; B = [0, 1]: μ=0.5, σ=1/√2 -> same.
    # Combined with w=(0.5, 2): ∓2.5/√2 = ∓1.76777.
    # Batch 2: A = [5]: A's stream 1, 3, 5 -> μ=3, σ=2 -> (5−3)/2 = 1;
    #          B = [1]: stream 0, 1, 1 -> μ=2/3, var=((4+1+1)/9)/2=1/3 -> (1/3)/(1/√3)=1/√3.
    # Combined: 0.5·1 + 2/√3 = 1.654701.
    a = FixedScores("a", [[1.0, 3.0], [5.0]])
    b = FixedScores("b", [[0.0, 1.0], [1.0]])
    weighted = WeightedRewards([(a, 0.5), (b, 2.0)], normalize=True)
    combined, raw = weighted.score_detailed(samples(2))
    assert combined == pytest.approx([-2.5 / math.sqrt(2), 2.5 / math.sqrt(2)])
    assert raw == {"a": [1.0, 3.0], "b": [0.0, 1.0]}  # raw scores stay raw for logging
    assert weighted.score(samples(1)) == pytest.approx([0.5 + 2 / math.sqrt(3)])


def test_weighted_rewards_resume_continues_the_same_normalization():
    def build(batches_a, batches_b):
        return WeightedRewards([(FixedScores("a", batches_a), 1.0),
                                (FixedScores("b", batches_b), -1.0)], normalize=True)

    first = build([[1.0, 2.0], [7.0, 0.0]], [[3.0, 3.5], [1.0, 2.0]])
    first.score(samples(2))
    resumed = build([[7.0, 0.0]], [[1.0, 2.0]])
    resumed.load_state_dict(first.state_dict())
    expected = first.score(samples(2))
    assert resumed.score(samples(2)) == expected

    fresh = build([[7.0, 0.0]], [[1.0, 2.0]])  # without the saved moments it would differ
    assert fresh.score(samples(2)) != pytest.approx(expected)


def test_weighted_rewards_rejects_bad_sources_and_outputs():
    with pytest.raises(ValueError, match="unique"):
        WeightedRewards([(FixedScores("a", []), 1.0), (FixedScores("a", []), 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        WeightedRewards([])
    short = WeightedRewards([(FixedScores("short", [[1.0]]), 1.0)])
    with pytest.raises(ValueError, match="'short' returned 1 scores for 2 samples"):
        short.score(samples(2))
    nan = WeightedRewards([(FixedScores("nan", [[1.0, float("nan")]]), 1.0)])
    with pytest.raises(ValueError, match=r"non-finite scores at positions \[1\]"):
        nan.score(samples(2))
    weighted = WeightedRewards([(FixedScores("a", []), 1.0)], normalize=True)
    with pytest.raises(ValueError, match="do not match"):
        weighted.load_state_dict({"moments": {"b": {"count": 0, "mean": 0.0, "m2": 0.0}}})


def test_function_reward_scores_each_sample():
    batch = [Sample("q", "abc", {"gold": "abc"}), Sample("q", "abd", {"gold": "abc"})]
    reward = FunctionReward("gold", lambda s: s.response == s.meta["gold"])
    assert reward.score(batch) == [1.0, 0.0]


def test_sources_satisfy_the_protocol():
    assert isinstance(FunctionReward("f", float), RewardSource)
    assert isinstance(FixedScores("a", []), RewardSource)
    assert isinstance(WeightedRewards([(FixedScores("a", []), 1.0)]), RewardSource)


# --------------------------------------------------------------------------------------
# ClassifierReward on a tiny random classifier and a locally built tokenizer
# --------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "you", "are", "nice", "bad", "very", "hello", "what", "is", "it"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="[PAD]", unk_token="[UNK]")


def tiny_classifier(problem_type: str | None = None):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        num_labels=2, id2label={0: "ok", 1: "toxic"}, label2id={"ok": 0, "toxic": 1},
                        problem_type=problem_type)
    return BertForSequenceClassification(config)


def set_constant_logits(model, logits: list[float]) -> None:
    """Zero the classification weights so every input gets exactly `logits`."""
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor(logits))


def test_classifier_reward_is_signed_label_probability(tokenizer):
    # Logits (0, ln 3) for every text: softmax -> P(toxic) = 3/(1+3) = 0.75.
    model = tiny_classifier()
    set_constant_logits(model, [0.0, math.log(3.0)])
    batch = [Sample("q", "you are bad", {}), Sample("q", "hello", {})]
    penalty = ClassifierReward(model, tokenizer, label="toxic", sign=-1.0, batch_size=2, max_length=8)
    assert penalty.score(batch) == pytest.approx([-0.75, -0.75])
    assert penalty.name == "classifier:toxic"
    logit = ClassifierReward(model, tokenizer, label=1, output="logit", batch_size=2, max_length=8)
    assert logit.score(batch) == pytest.approx([math.log(3.0)] * 2)


def test_classifier_reward_multi_label_uses_a_sigmoid(tokenizer):
    # Multi-label: σ(ln 3) = 3/4, independent of the other logit (here 5.0).
    model = tiny_classifier("multi_label_classification")
    set_constant_logits(model, [5.0, math.log(3.0)])
    reward = ClassifierReward(model, tokenizer, label="toxic", batch_size=4, max_length=8)
    assert reward.score([Sample("q", "very nice", {})]) == pytest.approx([0.75])


def test_classifier_reward_batching_and_padding_do_not_change_scores(tokenizer):
    model = tiny_classifier()
    texts = ["you are very very nice", "bad", "hello you", "what is it"]
    batch = [Sample("q", t, {}) for t in texts]
    batched = ClassifierReward(model, tokenizer, label=1, batch_size=3, max_length=16).score(batch)
    one_by_one = ClassifierReward(model, tokenizer, label="toxic", batch_size=1,
                                  max_length=16).score(batch)
    # Recompute directly from the model, one unpadded text at a time.
    expected = []
    with torch.no_grad():
        for t in texts:
            enc = tokenizer(t, return_tensors="pt")
            expected.append(torch.softmax(model(**enc).logits, -1)[0, 1].item())
    assert batched == pytest.approx(expected, abs=1e-5)
    assert one_by_one == pytest.approx(expected, abs=1e-5)
    assert len(set(round(x, 6) for x in expected)) > 1  # the texts really score differently


def test_classifier_reward_prompt_pair_and_truncation(tokenizer):
    model = tiny_classifier()
    with_prompt = ClassifierReward(model, tokenizer, label=0, include_prompt=True, max_length=16)
    alone = ClassifierReward(model, tokenizer, label=0, max_length=16)
    batch = [Sample("what is it", "you are nice", {})]
    assert with_prompt.score(batch) != pytest.approx(alone.score(batch))
    # max_length=2 keeps "you are" of "you are nice ..." : same score as the text "you are".
    short = ClassifierReward(model, tokenizer, label=0, max_length=2)
    assert short.score([Sample("", "you are nice bad", {})]) == pytest.approx(
        alone.score([Sample("", "you are", {})]), abs=1e-5)


def test_classifier_reward_rejects_unknown_labels(tokenizer):
    model = tiny_classifier()
    with pytest.raises(ValueError, match=r"label 'spam' not in the model's labels \['ok', 'toxic'\]"):
        ClassifierReward(model, tokenizer, label="spam")
    with pytest.raises(ValueError, match="out of range"):
        ClassifierReward(model, tokenizer, label=2)
    with pytest.raises(ValueError, match="output"):
        ClassifierReward(model, tokenizer, label=0, output="softmax")
