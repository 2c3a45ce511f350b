"""Reward model: the scalar is read at the last real token for right padding, left padding
and packed rows; ensemble heads; saved models reload as AutoModelForSequenceClassification."""

import pytest
import torch

from rlhfkit.data.batches import IGNORE_INDEX, LMBatch
from rlhfkit.models.loading import LoraSettings
from rlhfkit.models.reward import (
    HEAD_INIT_SCALE,
    RewardModel,
    last_token_index,
    load_reward_model,
    segment_last_index,
    tiny_reward_model,
)
from rlhfkit.models.tiny import tiny_causal_lm

# Two hand-written sequences of different lengths (ids in the tiny vocabulary, none is the pad id 0).
A = [5, 17, 42, 9, 30]
B = [11, 3, 8]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    thread pool's waiting costs ten times the work itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batch(ids, mask, position_ids=None, segment_ids=None) -> LMBatch:
    ids = torch.tensor(ids)
    return LMBatch(ids, torch.tensor(mask), torch.full_like(ids, IGNORE_INDEX),
                   None if position_ids is None else torch.tensor(position_ids),
                   None if segment_ids is None else torch.tensor(segment_ids))


def _alone(model, seq) -> torch.Tensor:
    return model(_batch([seq], [[1] * len(seq)]))


def test_last_token_index_by_hand():
    mask = torch.tensor([[1, 1, 1, 0],    # right padding: last real token at 2
                         [0, 1, 1, 1],    # left padding: 3
                         [1, 1, 1, 1],    # no padding: 3
                         [1, 0, 0, 0]])   # one token: 0
    assert last_token_index(mask).tolist() == [2, 3, 3, 0]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))


def test_segment_last_index_by_hand():
    # one packed row [a a b b b pad] → a ends at 1, b at 4
    assert segment_last_index(torch.tensor([[0, 0, 1, 1, 1, -1]]), 2).tolist() == [1, 4]
    # two packed rows (flat indices into B·T = 6): row 0 holds seq 0 and 1, row 1 holds seq 2
    assert segment_last_index(torch.tensor([[0, 0, 1], [2, 2, -1]]), 3).tolist() == [1, 2, 4]


@torch.no_grad()
def test_right_left_and_packed_give_the_rewards_of_each_sequence_alone():
    model = tiny_reward_model(seed=3).eval()
    expected = torch.cat([_alone(model, A), _alone(model, B)])
    right = model(_batch([A, B + [0, 0]], [[1] * 5, [1, 1, 1, 0, 0]]))
    # Pad values are arbitrary under the mask: left padding uses a real token id on purpose.
    left = model(_batch([A, [99, 99] + B], [[1] * 5, [0, 0, 1, 1, 1]]))
    packed = model(_batch([A + B], [[1] * 8], position_ids=[[0, 1, 2, 3, 4, 0, 1, 2]],
                          segment_ids=[[0] * 5 + [1] * 3]))
    assert right.shape == left.shape == packed.shape == (2,)
    torch.testing.assert_close(right, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, expected, atol=1e-5, rtol=1e-5)
    # The read position matters: the rewards of A's and B's prefixes differ from the whole.
    assert not torch.allclose(_alone(model, B[:-1]), expected[1:], atol=1e-4)
    assert not torch.allclose(_alone(model, A[:-1]), expected[:1], atol=1e-4)


@torch.no_grad()
def test_transformers_pooling_misreads_when_pad_equals_the_last_token_and_ours_does_not():
    model = tiny_reward_model(seed=3).eval()
    r_b = _alone(model, B)
    r_b_prefix = _alone(model, B[:-1])
    # SmolLM2's case: the pad id equals the id that ends every response (here B's last id, 8).
    model.model.config.pad_token_id = B[-1]
    batch = _batch([A, B + [8, 8]], [[1] * 5, [1, 1, 1, 0, 0]])
    hf = model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(hf[1:], r_b_prefix, atol=1e-5, rtol=1e-5)   # read one token too early
    torch.testing.assert_close(model(batch)[1:], r_b, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_ensemble_heads_share_the_backbone_and_each_is_a_scalar_head():
    ensemble = tiny_reward_model(seed=0, n_heads=3).eval()
    single = tiny_reward_model(seed=0).eval()   # same seed → same backbone
    batch = _batch([A, B + [0, 0]], [[1] * 5, [1, 1, 1, 0, 0]])
    rewards = ensemble(batch)
    assert rewards.shape == (3, 2) and rewards.dtype == torch.float32
    weight = ensemble.model.score.weight
    assert weight.shape == (3, 32)
    # Fresh heads are small: std HEAD_INIT_SCALE/√H, and distinct.
    assert 0.5 * HEAD_INIT_SCALE / 32 ** 0.5 < float(weight.std()) < 1.5 * HEAD_INIT_SCALE / 32 ** 0.5
    assert not torch.allclose(weight[0], weight[1])
    for head in range(3):
        single.model.score.weight.copy_(weight[head:head + 1])
        torch.testing.assert_close(single(batch), rewards[head], atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_saved_reward_model_reloads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_reward_model(seed=1).eval()
    model.model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_labels == 1 and reloaded.config.id2label == {0: "reward"}
    batch = _batch([A, B + [0, 0]], [[1] * 5, [1, 1, 1, 0, 0]])
    ours = model(batch)
    torch.testing.assert_close(RewardModel(reloaded)(batch), ours, atol=0, rtol=0)
    # Outside rlhfkit, transformers' own pooling reads the same position (pad 0 ends no sequence).
    hf = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
    torch.testing.assert_close(hf, ours, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_load_from_a_causal_lm_folder_matches_the_in_memory_conversion(tmp_path):
    tiny_causal_lm(seed=2).save_pretrained(tmp_path / "lm")
    from_folder = load_reward_model(str(tmp_path / "lm"), n_heads=2, seed=2).eval()
    in_memory = tiny_reward_model(seed=2, n_heads=2).eval()
    batch = _batch([A], [[1] * 5])
    torch.testing.assert_close(from_folder(batch), in_memory(batch), atol=1e-6, rtol=1e-6)
    # A saved reward model keeps its trained heads: nothing is re-initialized.
    with torch.no_grad():
        in_memory.model.score.weight.mul_(7.0)
    in_memory.model.save_pretrained(tmp_path / "rm")
    again = load_reward_model(str(tmp_path / "rm")).eval()
    assert again.n_heads == 2
    torch.testing.assert_close(again(batch), in_memory(batch), atol=0, rtol=0)


def test_lora_trains_adapters_and_head_and_merges_to_a_plain_classifier(tmp_path):
    from transformers import AutoModelForSequenceClassification

    from rlhfkit.train.checkpoint import save_final
    from rlhfkit.train.engine import inner_hf_model

    model = load_reward_model("tiny", lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    assert any("score" in n for n in trainable) and any("lora_B" in n for n in trainable)
    with torch.no_grad():  # stand-in for training: move the adapters and the head off their init
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.eval()
    batch = _batch([A, B + [0, 0]], [[1] * 5, [1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = model(batch)
    save_final(inner_hf_model(model), None, tmp_path / "final")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    with torch.no_grad():
        torch.testing.assert_close(RewardModel(merged)(batch), expected, atol=1e-5, rtol=1e-5)
