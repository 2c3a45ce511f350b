"""Process reward models on the tiny model: encoding, the head at each step's end, training,
held-out step accuracy, and the `prm:` reward (sequence and dense per-step rewards)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rlhfkit.config import ConfigError
from rlhfkit.data.schemas import as_conversation
from rlhfkit.models.loading import load_tokenizer
from rlhfkit.models.process_reward import (
    collate_steps,
    encode_steps,
    load_process_reward_model,
    load_trained_process_reward_model,
    score_steps,
)
from rlhfkit.models.reward import _parts, tiny_reward_model
from rlhfkit.recipes import ppo
from rlhfkit.recipes.policy_gradient import GRPOConfig, run_policy_gradient
from rlhfkit.recipes.ppo import PPOConfig, run_ppo
from rlhfkit.recipes.process_reward import ProcessRewardConfig, evaluate_steps, run_process_reward
from rlhfkit.rollout.process_rewards import (
    ProcessRewardSource,
    dense_step_rewards,
    place_step_rewards,
    process_token_rewards,
    sequence_reward,
    step_end_tokens,
)
from rlhfkit.rollout.reward_spec import build_reward, parse_reward_spec
from rlhfkit.rollout.rewards import FunctionReward, WeightedRewards
from rlhfkit.rollout.rollout import Rollout
from rlhfkit.train.kl_control import FixedKLController
from rlhfkit.train.metrics import read_metrics

TOKENIZER = load_tokenizer("tiny")  # byte-level, no merges: one token per character of ASCII text
PROMPT = as_conversation("What is 7 + 5?")


def test_step_ends_index_the_last_token_of_each_step():
    encoded = encode_steps(TOKENIZER, PROMPT, ["7 + 5 = 12.", "Answer: 12"], [1, 0])
    prompt_len = len(encode_steps(TOKENIZER, PROMPT, []).input_ids)
    # 11 tokens of step 1, one separator, 10 of step 2
    assert encoded.step_ends == [prompt_len + 10, prompt_len + 21] and len(encoded) == prompt_len + 22
    assert TOKENIZER.decode(encoded.input_ids[prompt_len:]) == "7 + 5 = 12.\nAnswer: 12"
    assert encoded.labels == [1, 0]


def test_the_head_reads_the_hidden_state_at_each_step_end():
    model = load_process_reward_model("tiny", seed=3)
    short = encode_steps(TOKENIZER, PROMPT, ["Answer: 12"])
    long = encode_steps(TOKENIZER, PROMPT, ["7 + 5 = 12.", "Answer: 12"])
    batch = collate_steps([short, long], TOKENIZER.pad_token_id)
    logits = model(batch)
    assert logits.shape == (2, 2) and logits[0, 1] == 0.0  # the padded slot
    backbone, head = _parts(model.model)
    for row, enc in enumerate([short, long]):
        hidden = backbone(input_ids=torch.tensor([enc.input_ids])).last_hidden_state[0]
        expected = head(hidden[enc.step_ends]).float()[:, 0]
        assert torch.allclose(logits[row, :len(enc.step_ends)], expected, atol=1e-5)


class FixedLogits(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, batch):
        return self.logits[:batch.step_mask.shape[0], :batch.step_mask.shape[1]] * batch.step_mask


@pytest.mark.parametrize("logits, step_acc, solution_acc", [
    ([[2.0, 1.0], [3.0, -1.0]], 1.0, 1.0),
    ([[2.0, -1.0], [3.0, 1.0]], 0.5, 0.0),
])
def test_held_out_accuracy_by_hand(logits, step_acc, solution_acc):
    examples = [encode_steps(TOKENIZER, PROMPT, ["a", "b"], labels) for labels in ([1, 1], [1, 0])]
    report = evaluate_steps(FixedLogits(torch.tensor(logits)), examples, 0, batch_size=2)
    assert report["eval/step_accuracy"] == step_acc and report["eval/solution_accuracy"] == solution_acc
    assert report["eval/step_majority_baseline"] == 0.75 and report["eval/solution_majority_baseline"] == 0.5


@pytest.fixture(scope="module")
def trained_prm(tmp_path_factory):
    out = tmp_path_factory.mktemp("prm") / "run"
    cfg = ProcessRewardConfig(model="tiny", tasks="demo", demo_per_family=4, eval_per_family=2, max_steps=3,
                              batch_size=4, precision="fp32", progress=False, output_dir=str(out), lr=1e-3)
    return cfg, run_process_reward(cfg)


def test_prm_trains_and_reports_held_out_step_accuracy(trained_prm):
    cfg, result = trained_prm
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    report = json.loads((Path(cfg.output_dir) / "eval_report.json").read_text())
    assert report == result["eval"] and 0.0 <= report["step_accuracy"] <= 1.0
    # 2 test tasks × 2 families, each the reference + 2 corruptions, 2 steps each
    assert report["num_solutions"] == 12 and report["num_steps"] == 24
    assert rows[-1]["eval/step_accuracy"] == report["step_accuracy"]
    model, tokenizer = load_trained_process_reward_model(result["final"])
    probs = score_steps(model, tokenizer, [PROMPT, PROMPT], [["7 + 5 = 12.", "Answer: 12"], []])
    assert len(probs[0]) == 2 and all(0.0 < p < 1.0 for p in probs[0]) and probs[1] == []


def test_a_config_needs_exactly_one_data_source():
    with pytest.raises(ConfigError, match="exactly one"):
        ProcessRewardConfig(model="tiny")
    with pytest.raises(ConfigError, match="demo_families"):
        ProcessRewardConfig(model="tiny", tasks="demo", demo_families=("strings",))


def test_dense_rewards_telescope_to_the_minimum():
    assert dense_step_rewards([0.9, 0.95, 0.3]) == pytest.approx([0.9, 0.0, -0.6])
    assert dense_step_rewards([0.2, 0.5, 0.1]) == pytest.approx([0.2, 0.0, -0.1])
    assert sequence_reward([0.9, 0.95, 0.3]) == 0.3 and sequence_reward([]) == 0.0
    placed = place_step_rewards([[0.9, -0.6]], [[1, 3]], (1, 5))
    assert torch.allclose(placed, torch.tensor([[0.0, 0.9, 0.0, -0.6, 0.0]]))


def test_step_end_tokens_are_the_tokens_ending_each_line():
    text = "7+5=12.\nAnswer: 12"
    ids = TOKENIZER(text, add_special_tokens=False)["input_ids"] + [TOKENIZER.convert_tokens_to_ids("<|im_end|>")]
    assert step_end_tokens(TOKENIZER, ids, [7, 18]) == [6, 17]


def _fake_prm(texts, probs):
    source = ProcessRewardSource.__new__(ProcessRewardSource)
    source.name, source.last = "prm", (tuple(texts), probs)
    return source


def test_ppo_gets_the_prm_share_as_per_step_rewards_at_the_step_ends():
    texts = ("7+5=12.\nAnswer: 12", "Answer: 3")
    probs = [[0.8, 0.4], [0.6]]
    gold = FunctionReward("gold", lambda s: 1.0)
    reward = WeightedRewards([(_fake_prm(texts, probs), 0.5), (gold, 1.0)])
    ids = [TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in texts]
    response_ids = torch.zeros(2, 18, dtype=torch.long)
    mask = torch.zeros(2, 18)
    for row, seq in enumerate(ids):
        response_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    scores = torch.tensor([0.5 * 0.4 + 1.0, 0.5 * 0.6 + 1.0])
    rest, dense = process_token_rewards(reward, TOKENIZER, texts, response_ids, mask, scores)
    assert torch.allclose(rest, torch.tensor([1.0, 1.0]))
    expected = torch.zeros(2, 18)
    expected[0, 6], expected[0, 17] = 0.5 * 0.8, 0.5 * (0.4 - 0.8)   # r_1 = p_1, r_2 = min − p_1
    expected[1, 8] = 0.5 * 0.6
    assert torch.allclose(dense, expected, atol=1e-6)
    assert torch.allclose(dense.sum(-1) + rest, scores)            # every row's return is unchanged
    unchanged, none = process_token_rewards(WeightedRewards([(gold, 1.0)]), TOKENIZER, texts, response_ids, mask,
                                            scores)
    assert none is None and unchanged is scores
    with pytest.raises(ValueError, match="last scored batch"):
        process_token_rewards(reward, TOKENIZER, texts[::-1], response_ids, mask, scores)


def test_the_prm_term_parses_and_a_missing_folder_is_one_line(tmp_path):
    [term] = parse_reward_spec("prm:runs/prm/final:0.5")
    assert (term.source, term.arg, term.weight) == ("prm", "runs/prm/final", 0.5)
    with pytest.raises(ConfigError, match=r"--reward: term 'prm:nope': no such process reward model folder"):
        build_reward("prm:nope")
    with pytest.raises(ConfigError, match="no config.json"):
        build_reward(f"prm:{tmp_path}")
    rm = tiny_reward_model().model  # a sequence-level reward model is not a PRM
    rm.save_pretrained(tmp_path / "rm")
    TOKENIZER.save_pretrained(tmp_path / "rm")
    with pytest.raises(ConfigError, match="is not a process reward model"):
        build_reward(f"prm:{tmp_path / 'rm'}")


def test_grpo_and_ppo_run_with_a_prm_reward(trained_prm, tmp_path):
    _, result = trained_prm
    reward = build_reward(f"prm:{result['final']}")
    assert isinstance(reward.sources[0][0], ProcessRewardSource)
    cfg = PPOConfig(model="tiny", tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "ppo"), max_steps=1,
                    prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, batch_size=4, precision="fp32",
                    progress=False, reward=f"prm:{result['final']}", inner_epochs=1, minibatches=1)
    run_ppo(cfg)
    row = read_metrics(cfg.output_dir)[0]
    assert 0.0 <= row["reward/prm"] <= 1.0
    with pytest.raises(ConfigError, match="reward_normalize"):
        PPOConfig(model="tiny", tasks="demo", reward="prm:x", reward_normalize=True)


def test_ppo_advantages_see_the_step_rewards_where_the_steps_end():
    # γ = λ = 1, V = 0, β = 0, no whitening: the advantage of token t is Σ_{s ≥ t} r_s.
    text = "7+5=12.\nAnswer: 12"
    ids = torch.tensor([TOKENIZER(text, add_special_tokens=False)["input_ids"]])
    mask = torch.ones(ids.shape)
    zeros = torch.zeros(ids.shape)
    rollout = Rollout(prompt_ids=torch.tensor([[1]]), prompt_mask=torch.tensor([[1]]), response_ids=ids,
                      response_mask=mask, scores=torch.tensor([0.4]), source_scores={}, prompt_index=torch.tensor([0]),
                      group_size=1, finished=torch.tensor([True]), texts=(text,), old_logprobs=zeros,
                      ref_logprobs=zeros, values=zeros)
    cfg = PPOConfig(model="tiny", tasks="demo", kl_coef=0.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    run = SimpleNamespace(cfg=cfg, reward=WeightedRewards([(_fake_prm([text], [[0.8, 0.4]]), 1.0)]),
                          tokenizer=TOKENIZER, kl_controller=FixedKLController(0.0))
    out, _ = ppo.advantages(run, rollout)
    expected = torch.full((1, 18), -0.4)
    expected[0, :7] = 0.4            # r_6 = 0.8, r_17 = −0.4: the return before the first step ends is 0.4
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    assert torch.allclose(out.returns, expected, atol=1e-6)


def test_grpo_runs_with_a_prm_reward(trained_prm, tmp_path):
    _, result = trained_prm
    cfg = GRPOConfig(model="tiny", tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "grpo"), max_steps=1,
                     prompts_per_step=2, samples_per_prompt=2, max_new_tokens=8, batch_size=4, precision="fp32",
                     progress=False, reward=f"prm:{result['final']}")
    run_policy_gradient(cfg)
    assert 0.0 <= read_metrics(cfg.output_dir)[0]["reward/prm"] <= 1.0
