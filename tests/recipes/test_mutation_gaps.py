"""Gaps in the recipes' tests found by mutation testing (issue #13, `scripts/mutation.py recipes`).

Each test pins down behaviour that a surviving mutant changed without any test failing:
- every range check of the recipe configs, at its boundary (the edge value accepted, the
  first value past it refused) and with its full message;
- the KTO class-balance warning, the eval loss of SFT, DPO's eval metrics, the summary of
  best-of-n, the online loop's helpers (minibatch order, prompt order, the cross-process mean);
- what the run_* functions leave behind: data reports, skip reports and their warnings,
  the run folder's files, the returned dicts, the reference scored live vs precomputed.

Expected values are derived by hand (a plain forward of the tiny random model for log-probs).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.data.preference_batches import EncodedFeedback, encode_preference_pairs
from rlhfkit.data.schemas import PreferencePair, as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.losses.preference_registry import get_preference_loss
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes import dpo, online, ppo
from rlhfkit.recipes.best_of_n import BestOfN, BestOfNConfig, ExpertIterationConfig, summarize
from rlhfkit.recipes.dpo import DPOConfig
from rlhfkit.recipes.policy_gradient import GRPOConfig, ReinforceConfig
from rlhfkit.recipes.ppo import PPOConfig
from rlhfkit.recipes.reward import RewardConfig
from rlhfkit.recipes.sft import SFTConfig, sft_task
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.prompts import RLPrompt


def config_error(cls, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        cls(**kw)
    return str(e.value)


# ============================================================================ config range checks
# (config class, base arguments, field overrides, the full message). Each check appears with
# the first refused value next to its edge; the accepted edges are in ACCEPTED below.
ONLINE = dict(model="tiny", tasks="demo")
PAIRS = dict(train_data="p.jsonl")

REFUSED = [
    # OnlineConfig (through GRPO / REINFORCE, which add nothing to these checks)
    (GRPOConfig, {}, {}, "give exactly one of prompts (a JSONL file) or tasks=demo"),
    (GRPOConfig, ONLINE, {"prompts": "p.jsonl"}, "give exactly one of prompts (a JSONL file) or tasks=demo"),
    (GRPOConfig, ONLINE, {"demo_per_family": 0}, "demo_per_family must be ≥ 1"),
    (GRPOConfig, ONLINE, {"prompts_per_step": 0}, "prompts_per_step must be ≥ 1"),
    (GRPOConfig, ONLINE, {"samples_per_prompt": 0}, "samples_per_prompt must be ≥ 1"),
    (GRPOConfig, ONLINE, {"max_new_tokens": 0}, "max_new_tokens must be ≥ 1"),
    (GRPOConfig, ONLINE, {"max_new_tokens": 512}, "max_new_tokens must be < max_length (room for the prompt)"),
    (GRPOConfig, ONLINE, {"temperature": 0.0}, "temperature must be > 0 for sampling"),
    (GRPOConfig, ONLINE, {"top_p": 0.0}, "top_p must be in (0, 1]"),
    (GRPOConfig, ONLINE, {"top_p": 1.01}, "top_p must be in (0, 1]"),
    (GRPOConfig, ONLINE, {"top_k": -1}, "top_k must be ≥ 0"),
    (GRPOConfig, ONLINE, {"gen_batch_size": 0}, "gen_batch_size must be ≥ 1"),
    (GRPOConfig, ONLINE, {"kl_coef": -0.01}, "kl_coef must be ≥ 0"),
    (GRPOConfig, ONLINE, {"clip_eps": 0.0}, "clip_eps must be in (0, 1)"),
    (GRPOConfig, ONLINE, {"clip_eps": 1.0}, "clip_eps must be in (0, 1)"),
    (GRPOConfig, ONLINE, {"inner_epochs": 0}, "inner_epochs must be ≥ 1"),
    (GRPOConfig, ONLINE, {"minibatches": 0}, "minibatches must be ≥ 1"),
    (GRPOConfig, ONLINE, {"minibatches": 3}, "prompts_per_step × samples_per_prompt must be a multiple of minibatches"),
    (GRPOConfig, ONLINE, {"grad_accum": 2}, "grad_accum is not used by online recipes (micro-batches come from "
                                            "batch_size); leave it at 1"),
    # PolicyGradientConfig
    (GRPOConfig, ONLINE, {"samples_per_prompt": 1}, "grpo needs samples_per_prompt ≥ 2"),
    (ReinforceConfig, ONLINE, {"baseline_decay": 1.0}, "baseline_decay must be in [0, 1)"),
    (ReinforceConfig, ONLINE, {"baseline_decay": -0.1}, "baseline_decay must be in [0, 1)"),
    # PPOConfig
    (PPOConfig, ONLINE, {"kl_clamp": -1.0}, "kl_clamp must be ≥ 0"),
    (PPOConfig, ONLINE, {"target_kl": -0.1}, "target_kl must be ≥ 0"),
    (PPOConfig, ONLINE, {"kl_horizon": 0}, "kl_horizon must be ≥ 1"),
    (PPOConfig, ONLINE, {"gamma": -0.1}, "gamma and lam must be in [0, 1]"),
    (PPOConfig, ONLINE, {"gamma": 1.1}, "gamma and lam must be in [0, 1]"),
    (PPOConfig, ONLINE, {"lam": -0.1}, "gamma and lam must be in [0, 1]"),
    (PPOConfig, ONLINE, {"lam": 1.1}, "gamma and lam must be in [0, 1]"),
    (PPOConfig, ONLINE, {"vf_coef": -0.1}, "vf_coef, ent_coef and ptx_coef must be ≥ 0"),
    (PPOConfig, ONLINE, {"ent_coef": -0.1}, "vf_coef, ent_coef and ptx_coef must be ≥ 0"),
    (PPOConfig, ONLINE, {"ptx_coef": -0.1}, "vf_coef, ent_coef and ptx_coef must be ≥ 0"),
    (PPOConfig, ONLINE, {"cliprange_value": 0.0}, "cliprange_value must be > 0"),
    (PPOConfig, ONLINE, {"ptx_coef": 0.1}, "ptx_coef > 0 needs ptx_data (SFT examples)"),
    (PPOConfig, ONLINE, {"target_kl": 1.0, "kl_coef": 0.0}, "an adaptive β (target_kl > 0) needs kl_coef > 0 to start"),
    # DPOConfig
    (DPOConfig, {}, {}, "train_data is required (a .jsonl/.parquet file, folder or hub id)"),
    (DPOConfig, PAIRS, {"loss": "simpo", "reference": "other"},
     "loss 'simpo' is reference-free: 'reference' is not used"),
    (DPOConfig, PAIRS, {"beta": 0.0}, "beta must be > 0, got 0.0"),
    (DPOConfig, PAIRS, {"loss": "orpo", "odds_ratio_weight": 0.0}, "odds_ratio_weight must be > 0, got 0.0"),
    (DPOConfig, PAIRS, {"loss": "kto", "desirable_weight": 0.0}, "desirable_weight must be > 0, got 0.0"),
    (DPOConfig, PAIRS, {"loss": "kto", "undesirable_weight": 0.0}, "undesirable_weight must be > 0, got 0.0"),
    (DPOConfig, PAIRS, {"label_smoothing": 0.51}, "label_smoothing must be in [0, 0.5] for loss 'dpo', got 0.51"),
    (DPOConfig, PAIRS, {"label_smoothing": -0.01}, "label_smoothing must be in [0, 0.5] for loss 'dpo', got -0.01"),
    (DPOConfig, PAIRS, {"loss": "robust", "flip_rate": 0.5},
     "flip_rate must be in [0, 0.5) for loss 'robust', got 0.5"),
    (DPOConfig, PAIRS, {"loss": "robust", "flip_rate": -0.01},
     "flip_rate must be in [0, 0.5) for loss 'robust', got -0.01"),
    (DPOConfig, PAIRS, {"loss": "simpo", "simpo_margin": -0.01}, "simpo_margin must be ≥ 0, got -0.01"),
    (DPOConfig, PAIRS, {"max_eval_examples": 0}, "max_eval_examples must be ≥ 1"),
    (DPOConfig, PAIRS, {"nll_weight": -0.1}, "nll_weight must be ≥ 0"),
    (DPOConfig, PAIRS, {"loss": "kto", "nll_weight": 0.1}, "nll_weight needs paired data; loss 'kto' is unpaired"),
    # RewardConfig
    (RewardConfig, {}, {}, "train_data is required (a .jsonl/.parquet file, folder or hub id)"),
    (RewardConfig, PAIRS, {"test_fraction": 1.0}, "test_fraction must be in [0, 1)"),
    (RewardConfig, PAIRS, {"test_fraction": -0.1}, "test_fraction must be in [0, 1)"),
    (RewardConfig, PAIRS, {"label_noise": 0.5}, "label_noise must be in [0, 0.5)"),
    (RewardConfig, PAIRS, {"label_noise": -0.1}, "label_noise must be in [0, 0.5)"),
    (RewardConfig, PAIRS, {"center_coef": -0.1}, "center_coef must be ≥ 0"),
    (RewardConfig, PAIRS, {"n_heads": 0}, "n_heads must be ≥ 1"),
    (RewardConfig, PAIRS, {"ensemble_mode": "mean_minus_std"}, "ensemble_mode mean_minus_std needs n_heads ≥ 2"),
    (RewardConfig, PAIRS, {"max_eval_pairs": 0}, "max_eval_pairs must be ≥ 1"),
    (RewardConfig, PAIRS, {"eval_batch_size": 0}, "eval_batch_size must be ≥ 1"),
    # SFTConfig
    (SFTConfig, {}, {}, "train_data is required (a .jsonl/.parquet file, folder or hub id)"),
    # BestOfNConfig
    (BestOfNConfig, {}, {}, "give exactly one of prompts (a JSONL file) or tasks=demo"),
    (BestOfNConfig, {"tasks": "demo"}, {"prompts": "p.jsonl"},
     "give exactly one of prompts (a JSONL file) or tasks=demo"),
    (BestOfNConfig, {"tasks": "demo"}, {"samples_per_prompt": 0}, "samples_per_prompt must be ≥ 1"),
    (BestOfNConfig, {"tasks": "demo"}, {"temperature": 0.0},
     "temperature must be > 0 (n greedy samples would all be the same)"),
    (BestOfNConfig, {"tasks": "demo"}, {"max_new_tokens": 0}, "max_new_tokens and batch_size must be ≥ 1"),
    (BestOfNConfig, {"tasks": "demo"}, {"batch_size": 0}, "max_new_tokens and batch_size must be ≥ 1"),
    # ExpertIterationConfig
    (ExpertIterationConfig, {}, {}, "give exactly one of prompts (a JSONL file) or tasks=demo"),
    (ExpertIterationConfig, {"tasks": "demo"}, {"prompts": "p.jsonl"},
     "give exactly one of prompts (a JSONL file) or tasks=demo"),
    (ExpertIterationConfig, {"tasks": "demo"}, {"rounds": 0}, "rounds and samples_per_prompt must be ≥ 1"),
    (ExpertIterationConfig, {"tasks": "demo"}, {"samples_per_prompt": 0},
     "rounds and samples_per_prompt must be ≥ 1"),
    (ExpertIterationConfig, {"tasks": "demo"}, {"temperature": 0.0}, "temperature must be > 0"),
]


@pytest.mark.parametrize("cls, base, overrides, message", REFUSED,
                         ids=[f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'base'}"
                              for c, _, o, _ in REFUSED])
def test_config_refuses_with_its_message(cls, base, overrides, message):
    assert config_error(cls, **base, **overrides) == message


ACCEPTED = [
    (ReinforceConfig, ONLINE, {"demo_per_family": 1, "prompts_per_step": 1, "samples_per_prompt": 1,
                               "max_new_tokens": 1, "top_p": 1.0, "top_k": 0, "gen_batch_size": 1, "kl_coef": 0.0,
                               "inner_epochs": 1, "minibatches": 1, "baseline_decay": 0.0}),
    (GRPOConfig, ONLINE, {"samples_per_prompt": 2, "max_new_tokens": 511, "temperature": 1e-3, "top_p": 1e-3,
                          "clip_eps": 0.999, "minibatches": 8}),
    (GRPOConfig, {"prompts": "p.jsonl"}, {"clip_eps": 1e-3}),
    (PPOConfig, ONLINE, {"kl_clamp": 0.0, "target_kl": 0.0, "kl_coef": 0.0, "kl_horizon": 1, "gamma": 0.0, "lam": 0.0,
                         "vf_coef": 0.0, "ent_coef": 0.0, "ptx_coef": 0.0, "cliprange_value": 1e-3}),
    (PPOConfig, ONLINE, {"gamma": 1.0, "lam": 1.0, "target_kl": 1.0, "kl_coef": 0.1, "ptx_coef": 0.5,
                         "ptx_data": "sft.jsonl"}),
    (DPOConfig, PAIRS, {"label_smoothing": 0.5, "max_eval_examples": 1, "nll_weight": 0.0}),
    (DPOConfig, PAIRS, {"label_smoothing": 0.0, "nll_weight": 0.5, "beta": 1e-3}),
    (DPOConfig, PAIRS, {"loss": "robust", "flip_rate": 0.0}),
    (DPOConfig, PAIRS, {"loss": "simpo", "simpo_margin": 0.0}),
    (DPOConfig, PAIRS, {"loss": "kto", "desirable_weight": 1e-3, "undesirable_weight": 1e-3}),
    (DPOConfig, PAIRS, {"loss": "orpo", "odds_ratio_weight": 1e-3}),
    (DPOConfig, PAIRS, {"reference": "tiny"}),
    (RewardConfig, PAIRS, {"test_fraction": 0.0, "label_noise": 0.0, "center_coef": 0.0, "n_heads": 1,
                           "max_eval_pairs": 1, "eval_batch_size": 1}),
    (RewardConfig, PAIRS, {"test_fraction": 0.99, "label_noise": 0.49, "n_heads": 2,
                           "ensemble_mode": "mean_minus_std"}),
    (BestOfNConfig, {"tasks": "demo"}, {"samples_per_prompt": 1, "max_new_tokens": 1, "batch_size": 1,
                                        "temperature": 1e-3}),
    (BestOfNConfig, {"prompts": "p.jsonl"}, {}),
    (ExpertIterationConfig, {"tasks": "demo"}, {"rounds": 1, "samples_per_prompt": 1, "temperature": 1e-3}),
    (ExpertIterationConfig, {"prompts": "p.jsonl"}, {}),
]


@pytest.mark.parametrize("cls, base, overrides", ACCEPTED, ids=[c.__name__ for c, _, _ in ACCEPTED])
def test_config_accepts_the_edges(cls, base, overrides):
    cfg = cls(**base, **overrides)
    for name, value in overrides.items():
        assert getattr(cfg, name) == value


def test_online_sampling_carries_every_sampling_field():
    cfg = GRPOConfig(**ONLINE, max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3, samples_per_prompt=2,
                     gen_batch_size=6)
    assert cfg.sampling(11) == SamplingConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=3, n=2,
                                              batch_size=6, seed=11)


# ============================================================================ KTO class balance
def _feedback(n_desirable: int, n_undesirable: int) -> list[EncodedFeedback]:
    enc = encode_pair(tiny_tokenizer(), as_conversation("Hi."), "ok")
    return [EncodedFeedback(enc, enc, True)] * n_desirable + [EncodedFeedback(enc, enc, False)] * n_undesirable


def _kto_warnings(caplog, n_desirable, n_undesirable, weight_d=1.0, weight_u=1.0) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.dpo"):
        dpo._warn_kto_balance(_feedback(n_desirable, n_undesirable),
                              {"desirable_weight": weight_d, "undesirable_weight": weight_u})
    return [r.getMessage() for r in caplog.records if r.name == "rlhfkit.recipes.dpo"]


def test_kto_balance_warns_on_one_class_only(caplog):
    assert _kto_warnings(caplog, 3, 0) == ["KTO data holds only desirable examples"]
    assert _kto_warnings(caplog, 0, 2) == ["KTO data holds only undesirable examples"]


def test_kto_balance_is_quiet_inside_the_recommended_range(caplog):
    # λ_D·n_D / (λ_U·n_U) in [1, 4/3]: both ends included.
    assert _kto_warnings(caplog, 2, 2) == []             # 1
    assert _kto_warnings(caplog, 4, 3) == []             # 4/3
    assert _kto_warnings(caplog, 1, 2, weight_d=2.5) == []   # 2.5 / 2 = 1.25


def test_kto_balance_warns_outside_it_with_the_weight_that_fixes_it(caplog):
    # 3 desirable, 1 undesirable, equal weights: ratio 3; λ_D = λ_U·n_U / n_D = 1/3 gives 1.
    assert _kto_warnings(caplog, 3, 1) == [
        "KTO: λ_D·n_D / (λ_U·n_U) = 3.00 (3 desirable, 1 undesirable); the KTO paper recommends "
        "1 to 4/3, e.g. --desirable-weight 0.333"]
    # 2 desirable, 3 undesirable, λ_D = 0.5, λ_U = 2: ratio 1 / 6 = 0.17; λ_D = 2·3/2 = 3.
    assert _kto_warnings(caplog, 2, 3, weight_d=0.5, weight_u=2.0) == [
        "KTO: λ_D·n_D / (λ_U·n_U) = 0.17 (2 desirable, 3 undesirable); the KTO paper recommends "
        "1 to 4/3, e.g. --desirable-weight 3"]


# ============================================================================ best-of-n summary and records
def _bon(rewards, gold=None, prompt="Q?", meta=None) -> BestOfN:
    return BestOfN(RLPrompt(as_conversation(prompt), meta or {}), tuple(f"r{j}" for j in range(len(rewards))),
                   tuple(rewards), gold)


def test_summarize_best_vs_random_reward_and_gold_accuracy():
    results = [_bon([0.0, 1.0, 0.5], gold=(0.0, 1.0, 1.0)), _bon([2.0, 2.0], gold=(1.0, 0.0)), _bon([4.0])]
    # best rewards 1, 2 (first of the tie), 4; means 0.5, 2, 4. Gold over the two demo prompts:
    # the best responses score 1 and 1; a random one 2/3 and 1/2.
    assert summarize(results) == pytest.approx({
        "reward/best": 7 / 3, "reward/random": 6.5 / 3, "prompts": 3.0,
        "gold_accuracy/best": 1.0, "gold_accuracy/random": (2 / 3 + 1 / 2) / 2})
    assert set(summarize(results[2:])) == {"reward/best", "reward/random", "prompts"}


def test_best_of_n_record_of_a_multi_turn_prompt_keeps_the_messages():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    row = _bon([0.0, 3.0], prompt=turns, meta={"task_id": "t1", "task": object(), "conversation": 1}).record()
    assert row == {"task_id": "t1", "prompt": turns, "completion": "r1", "reward": 3.0, "mean_reward": 1.5, "n": 2}
    assert _bon([1.0], prompt="Q?").record()["prompt"] == "Q?"


# ============================================================================ the online loop's helpers
def test_prompt_indices_with_a_single_prompt_and_with_none():
    assert online.prompt_indices(1, 3, seed=0, step=2) == [0, 0, 0]
    with pytest.raises(ValueError, match="^no prompts to sample from$"):
        online.prompt_indices(0, 3, seed=0, step=0)


def _rows(cfg, step, epoch, n=8):
    return [r.tolist() for r in online.minibatch_rows(n, cfg, step=step, epoch=epoch)]


def test_minibatch_rows_in_order_with_one_update_per_rollout():
    cfg = GRPOConfig(**ONLINE, prompts_per_step=2, samples_per_prompt=4)
    assert _rows(cfg, 0, 0) == [list(range(8))]


def test_minibatch_rows_are_a_shuffled_partition_per_seed_step_and_epoch():
    two_epochs = GRPOConfig(**ONLINE, prompts_per_step=2, samples_per_prompt=4, inner_epochs=2)  # 2 updates, 1 mb
    orders = {(s, e): _rows(two_epochs, s, e)[0] for s in range(3) for e in range(2)}
    assert all(sorted(o) == list(range(8)) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == 6      # each (step, epoch) its own order
    assert orders[(0, 0)] != list(range(8))
    other_seed = GRPOConfig(**ONLINE, prompts_per_step=2, samples_per_prompt=4, inner_epochs=2, seed=1)
    assert _rows(other_seed, 0, 0)[0] != orders[(0, 0)]
    assert _rows(two_epochs, 1, 0)[0] == orders[(1, 0)]        # a pure function of (seed, step, epoch)
    four = GRPOConfig(**ONLINE, prompts_per_step=2, samples_per_prompt=4, minibatches=4)
    parts = _rows(four, 0, 0)
    assert [len(p) for p in parts] == [2, 2, 2, 2] and sorted(sum(parts, [])) == list(range(8))


class _MeanOverTwoProcesses:
    """An accelerator stand-in for two processes: the other one holds `other`."""

    def __init__(self, other):
        self.other = other

    def reduce(self, t, reduction="sum"):
        other = torch.tensor(self.other, dtype=t.dtype)
        return {"sum": t + other, "mean": (t + other) / 2}[reduction]


def test_mean_across_averages_each_metric_over_processes():
    one = SimpleNamespace(world_size=1)
    assert online.mean_across(one, {"a": 1.5}) == {"a": 1.5}
    two = SimpleNamespace(world_size=2, device="cpu", accelerator=_MeanOverTwoProcesses([3.0, 10.0]))  # a, b
    assert online.mean_across(two, {"b": 2.0, "a": 1.0}) == {"a": 2.0, "b": 6.0}


# ============================================================================ PPO-ptx data
def _write_sft(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def test_ptx_examples_skip_over_long_ones_and_refuse_when_none_is_left(tmp_path, caplog):
    tok = tiny_tokenizer()
    assert ppo._ptx_examples(PPOConfig(**ONLINE), tok) == []            # ptx off: not read at all
    data = _write_sft(tmp_path / "ptx.jsonl", [("Hi.", "ok"), ("Hi.", "x" * 80)])
    cfg = PPOConfig(**ONLINE, ptx_coef=0.1, ptx_data=str(data), max_length=64, max_new_tokens=8)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.ppo"):
        examples = ppo._ptx_examples(cfg, tok)
    assert len(examples) == 1
    assert [r.getMessage() for r in caplog.records] == ["ptx data: skipped 1 longer than max_length"]
    long_only = _write_sft(tmp_path / "long.jsonl", [("Hi.", "x" * 80)])
    with pytest.raises(DataError) as e:
        ppo._ptx_examples(cfg.replace(ptx_data=str(long_only)), tok)
    assert str(e.value) == f"{long_only}: no usable ptx examples: skipped 1 longer than max_length"


# ============================================================================ eval on the tiny model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = tiny_causal_lm(seed=5).eval()
    return model, TokenLogprobs(model, 512)


@pytest.fixture
def direct_sum(token_logprobs_from_logits):
    """direct_sum(model, enc) → Σ log π over the response tokens (plain full-logits forward)."""
    def direct(model, enc) -> float:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits
        return float(token_logprobs_from_logits(logits, torch.tensor([enc.labels])).sum())
    return direct


def _enc(prompt: str, response: str):
    return encode_pair(tiny_tokenizer(), as_conversation(prompt), response)


def _counted(enc) -> int:
    return sum(label != -100 for label in enc.labels)


def test_sft_eval_loss_is_the_per_token_mean_nll_over_every_eval_batch(tiny, direct_sum):
    model, module = tiny
    eval_set = [_enc("Say a.", "a"), _enc("Greet me.", "hello world"), _enc("Count.", "one two three")]
    task = sft_task(tiny_tokenizer(), eval_set[:1], eval_set, packing=False, eval_batch_size=2)   # batches of 2 + 1
    nll = -sum(direct_sum(model, e) for e in eval_set)
    tokens = sum(_counted(e) for e in eval_set)
    with torch.no_grad():
        assert task.evaluate(module) == {"eval_loss": pytest.approx(nll / tokens, rel=1e-5)}
    assert task.group_by_length is True                         # padded batches: grouped by length
    packed = sft_task(tiny_tokenizer(), eval_set[:1], [], packing=True)
    assert packed.evaluate is None and packed.group_by_length is False


PAIR_RECORDS = [("Name a fruit.", "apple +", "apple", 1.0), ("Name a river.", "nile +", "nile", 0.0),
                ("Name a stone.", "onyx +", "onyx", 0.5)]


def _pairs():
    pairs = [PreferencePair(as_conversation(p), c, r, label=lab) for p, c, r, lab in PAIR_RECORDS]
    return encode_preference_pairs(tiny_tokenizer(), pairs)


def _evaluate(loss, module, items, ref, **hyperparameters):
    spec = get_preference_loss(loss)
    with torch.no_grad():
        return dpo.evaluate_items(module, items, spec=spec, hyperparameters=spec.with_defaults(hyperparameters),
                                  ref=ref, pad_id=0, packing=False, batch_size=4)


def _sides(model, items, direct_sum):
    return torch.tensor([[direct_sum(model, s) for s in item.sequences] for item in items], dtype=torch.float64)


def test_dpo_eval_on_pairs_with_soft_labels_by_hand(tiny, direct_sum):
    model, module = tiny
    items = _pairs()
    policy = _sides(model, items, direct_sum)
    ref = policy + torch.tensor([[-1.0, 2.0], [1.5, -0.5], [0.3, 0.2]], dtype=torch.float64)   # ref − π
    beta = 0.3
    chosen, rejected = beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1])   # 0.3, −0.45, −0.09
    h = chosen - rejected                                                                       # 0.9, −0.6, −0.15
    label = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    loss = -(label * F.logsigmoid(h) + (1 - label) * F.logsigmoid(-h))
    # accuracy over the two non-tie pairs: pair 1 prefers chosen (h > 0, right), pair 2 rejected (h < 0, right)
    expected = {"eval/loss": float(loss.mean()), "eval/rewards/chosen": float(chosen.mean()),
                "eval/rewards/rejected": float(rejected.mean()), "eval/rewards/margin": float(h.mean()),
                "eval/rewards/accuracy": 1.0}
    assert _evaluate("dpo", module, items, ref.float(), beta=beta) == pytest.approx(expected, abs=2e-5)
    # the same pairs with the reference moved so that pair 2 is wrong: accuracy 1/2
    worse = ref.clone()
    worse[1, 0] -= 10.0
    assert _evaluate("dpo", module, items, worse.float(), beta=beta)["eval/rewards/accuracy"] == 0.5


def test_kto_eval_on_pairs_scores_dpo_implicit_rewards(tiny, direct_sum):
    model, module = tiny
    items = _pairs()
    policy = _sides(model, items, direct_sum)
    ref = policy + torch.tensor([[-1.0, 2.0], [1.5, -0.5], [0.3, 0.2]], dtype=torch.float64)
    beta = 0.2
    chosen, rejected = beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1])
    expected = {"eval/rewards/chosen": float(chosen.mean()), "eval/rewards/rejected": float(rejected.mean()),
                "eval/rewards/margin": float((chosen - rejected).mean()), "eval/rewards/accuracy": 1.0}
    assert _evaluate("kto", module, items, ref.float(), beta=beta) == pytest.approx(expected, abs=2e-5)


def test_kto_eval_on_unpaired_feedback_by_hand(tiny, direct_sum):
    model, module = tiny
    encs = [_enc("Name a fruit.", "apple +"), _enc("Name a river.", "nile"), _enc("Name a stone.", "onyx +")]
    # each example's mismatched sequence: its prompt with the next example's completion
    mismatched = [_enc("Name a fruit.", "nile"), _enc("Name a river.", "onyx +"), _enc("Name a stone.", "apple +")]
    desirable = [True, False, True]
    items = [EncodedFeedback(c, m, d) for c, m, d in zip(encs, mismatched, desirable)]
    policy = _sides(model, items, direct_sum)
    ref = policy + torch.tensor([[-2.0, -1.0], [1.0, -2.0], [0.5, 0.0]], dtype=torch.float64)
    beta, w_d, w_u = 0.5, 1.0, 1.5
    z0 = max(0.0, float((policy[:, 1] - ref[:, 1]).mean()))               # (1 + 2 + 0) / 3 = 1
    r = policy[:, 0] - ref[:, 0]                                           # 2, −1, −0.5
    def sig(x: float) -> float:
        return 1 / (1 + math.exp(-x))

    loss = [w_d - w_d * sig(beta * (float(r[0]) - z0)), w_u - w_u * sig(beta * (z0 - float(r[1]))),
            w_d - w_d * sig(beta * (float(r[2]) - z0))]
    expected = {"eval/loss": float(sum(loss)) / 3, "eval/rewards/desirable": beta * float(r[0] + r[2]) / 2,
                "eval/rewards/undesirable": beta * float(r[1]),
                "eval/rewards/margin": beta * float(r[0] + r[2]) / 2 - beta * float(r[1]),
                "eval/kto/kl_reference": z0}
    got = _evaluate("kto", module, items, ref.float(), beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    assert got == pytest.approx(expected, abs=2e-5)


# ============================================================================ what the runs leave behind
from rlhfkit.recipes.best_of_n import run_best_of_n, run_expert_iteration  # noqa: E402
from rlhfkit.recipes.dpo import run_dpo  # noqa: E402
from rlhfkit.recipes.policy_gradient import run_policy_gradient, setup_run  # noqa: E402
from rlhfkit.recipes.reward import read_splits, run_reward  # noqa: E402
from rlhfkit.recipes.sft import run_sft  # noqa: E402
from rlhfkit.rollout.prompts import named_prompts  # noqa: E402
from rlhfkit.train.metrics import read_metrics  # noqa: E402

RUN = dict(model="tiny", precision="fp32", progress=False)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _json(path) -> dict:
    return json.loads(Path(path).read_text())


def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def _checkpoint_1(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "step-000001"


def test_run_sft_reports_skipped_examples_and_trains_a_lora_adapter(tmp_path, caplog):
    train = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi.", "completion": "ok"},
                                            {"prompt": "Hi.", "completion": "x" * 80},      # > 64 tokens
                                            {"prompt": "Yo.", "completion": "fine"}])
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "A.", "completion": "b"}, {"prompt": "A.", "completion": "y" * 80},
                                          {"prompt": "C.", "completion": "d"}, {"prompt": "E.", "completion": "f"}])
    cfg = SFTConfig(**RUN, train_data=str(train), eval_data=str(ev), max_eval_examples=3, max_length=64,
                    output_dir=str(tmp_path / "run"), max_steps=2, save_every=1, batch_size=2, lora_r=2)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.sft"):
        result = run_sft(cfg)
    assert _messages(caplog, "rlhfkit.recipes.sft") == [
        f"skipped 2 longer than max_length ({train}:2; {ev}:2)"]
    assert set(result) == {"final", "metrics", "skipped"} and result["final"] == str(tmp_path / "run" / "final")
    assert result["skipped"] == {"longer than max_length": 2}
    # 3 training examples read, 2 used; of the first 3 eval examples, 2 used (the 4th is past max_eval_examples)
    assert _json(tmp_path / "run" / "data_report.json") == {
        "train_examples": 3, "train_used": 2, "eval_used": 2, "skipped": {"longer than max_length": 2},
        "skipped_examples": {"longer than max_length": [f"{train}:2", f"{ev}:2"]}}
    assert math.isfinite(result["metrics"]["eval_loss"])
    ckpt = _checkpoint_1(tmp_path / "run")
    assert _json(ckpt / "trainer_state.json") == {"description": "sft", "step": 1}
    assert (ckpt / "model" / "adapter_config.json").exists()                   # LoRA: the adapter is what trains
    assert _json(ckpt / "model" / "adapter_config.json")["r"] == 2


def test_run_sft_refuses_when_every_example_is_skipped(tmp_path):
    train = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi.", "completion": "x" * 80}])
    with pytest.raises(DataError) as e:
        run_sft(SFTConfig(**RUN, train_data=str(train), max_length=64, output_dir=str(tmp_path / "run")))
    assert str(e.value) == f"{train}: every training example was skipped: skipped 1 longer than max_length"


DPO_PAIRS = [{"prompt": "Name a fruit.", "chosen": "apple +", "rejected": "apple"},
             {"prompt": "Name a river.", "chosen": "nile +", "rejected": "nile", "label": 0.5},    # a tie
             {"prompt": "Name a stone.", "chosen": "same", "rejected": "same"},                   # identical
             {"prompt": "Name a bird.", "chosen": "heron +", "rejected": "heron"},
             {"prompt": "Name a tree.", "chosen": "cedar +", "rejected": "cedar"}]
DPO_EVAL = [{"prompt": "Name a fish.", "chosen": "cod +", "rejected": "cod"},
            {"prompt": "Name a cat.", "chosen": "lynx +", "rejected": "lynx"}]


def _dpo_cfg(tmp_path, out, train, ev, **kw) -> DPOConfig:
    return DPOConfig(**{**RUN, "train_data": str(train), "eval_data": str(ev), "output_dir": str(tmp_path / out),
                        "max_steps": 2, "save_every": 1, "batch_size": 4, "seed": 3, **kw})


def test_run_dpo_reports_and_scores_the_reference_live_as_precomputed(tmp_path, caplog):
    train, ev = _jsonl(tmp_path / "pairs.jsonl", DPO_PAIRS), _jsonl(tmp_path / "eval.jsonl", DPO_EVAL)
    with caplog.at_level(logging.INFO, logger="rlhfkit.recipes.dpo"):
        pre = run_dpo(_dpo_cfg(tmp_path, "pre", train, ev, ties="drop"))
    # the tie is dropped before tokenizing; the identical pair is then the 2nd pair. The
    # reference scores the 2 sides of 3 training and 2 eval pairs.
    assert _messages(caplog, "rlhfkit.recipes.dpo") == [
        f"skipped 1 identical responses, 1 tie (ties=drop) ({train}; {train} pair 2)",
        "reference log-probs: one pass over 10 sequences"]
    meta = torch.load(tmp_path / "pre" / "reference_logps.pt", weights_only=False)["meta"]
    assert set(meta) == {"reference", "precision"} and meta["precision"] == "fp32"
    skipped = {"tie (ties=drop)": 1, "identical responses": 1}
    assert set(pre) == {"final", "metrics", "skipped", "reference"}
    assert pre["final"] == str(tmp_path / "pre" / "final") and pre["skipped"] == skipped
    assert pre["reference"] == {"path": str(tmp_path / "pre" / "reference_logps.pt"), "reused": False}
    assert _json(tmp_path / "pre" / "data_report.json") == {
        "loss": "dpo", "train_items": 3, "eval_items": 2, "skipped": skipped,
        "skipped_examples": {"tie (ties=drop)": [str(train)], "identical responses": [f"{train} pair 2"]}}
    assert _json(_checkpoint_1(tmp_path / "pre") / "trainer_state.json")["description"] == "dpo"
    # Scored live every micro-batch (a frozen copy of the start model), the reference gives the
    # same losses and eval metrics as the one pass before training.
    live = run_dpo(_dpo_cfg(tmp_path, "live", train, ev, ties="drop", precompute_reference=False))
    assert live["reference"] is None
    assert live["metrics"] == pytest.approx(pre["metrics"], rel=1e-4, abs=1e-6)
    assert [r.get("loss") for r in read_metrics(tmp_path / "live")] == pytest.approx(
        [r.get("loss") for r in read_metrics(tmp_path / "pre")], abs=1e-6)
    assert {"eval/loss", "eval/rewards/chosen", "eval/rewards/accuracy"} <= set(live["metrics"])


def test_run_dpo_refuses_when_every_pair_is_skipped(tmp_path):
    train = _jsonl(tmp_path / "pairs.jsonl", [DPO_PAIRS[2]])
    with pytest.raises(DataError) as e:
        run_dpo(_dpo_cfg(tmp_path, "run", train, "").replace(eval_data=""))
    assert str(e.value) == f"{train}: every training record was skipped: skipped 1 identical responses"


def test_run_kto_from_pairs_skips_ties_warns_on_balance_and_evaluates_pairs(tmp_path, caplog):
    # KTO on pairs: each non-tie pair gives one desirable and one undesirable example (ratio 1:
    # no balance warning); the eval file stays pairs and is scored pairwise.
    train, ev = _jsonl(tmp_path / "pairs.jsonl", [DPO_PAIRS[i] for i in (0, 1, 3, 4)]), _jsonl(tmp_path / "e.jsonl",
                                                                                            DPO_EVAL)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.dpo"):
        pre = run_dpo(_dpo_cfg(tmp_path, "pre", train, ev, loss="kto"))
    assert _messages(caplog, "rlhfkit.recipes.dpo") == [f"skipped 1 tie (neither response desirable) ({train})"]
    assert _json(tmp_path / "pre" / "data_report.json")["train_items"] == 6
    assert {"eval/rewards/chosen", "eval/rewards/margin", "eval/rewards/accuracy"} <= set(pre["metrics"])
    live = run_dpo(_dpo_cfg(tmp_path, "live", train, ev, loss="kto", precompute_reference=False))
    assert live["metrics"] == pytest.approx(pre["metrics"], rel=1e-4, abs=1e-6)
    # unpaired feedback, 3 desirable : 1 undesirable, is trained and warned about
    unpaired = _jsonl(tmp_path / "fb.jsonl", [{"prompt": f"Name {w}.", "completion": w, "label": i < 3}
                                              for i, w in enumerate(["oak", "elm", "ash", "fir"])])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.dpo"):
        run_dpo(_dpo_cfg(tmp_path, "fb", unpaired, "", loss="kto", max_steps=1))
    assert _messages(caplog, "rlhfkit.recipes.dpo") == [
        "KTO: λ_D·n_D / (λ_U·n_U) = 3.00 (3 desirable, 1 undesirable); the KTO paper recommends "
        "1 to 4/3, e.g. --desirable-weight 0.333"]


RM_PAIRS = [{"prompt": f"Name a {w}.", "chosen": f"{w} +", "rejected": w} for w in ("fruit", "river", "bird", "tree")]


def test_run_reward_reports_duplicates_shared_prompts_and_skips(tmp_path, caplog):
    train = _jsonl(tmp_path / "pairs.jsonl", [*RM_PAIRS, RM_PAIRS[0],                        # an exact repeat
                                              {"prompt": "Long.", "chosen": "x" * 80, "rejected": "y"}])
    ev = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "Name a bird.", "chosen": "crow +", "rejected": "crow"},
                                          {"prompt": "Long.", "chosen": "z" * 80, "rejected": "w"},
                                          {"prompt": "Name a fish.", "chosen": "cod +", "rejected": "cod"}])
    cfg = RewardConfig(**RUN, train_data=str(train), eval_data=str(ev), output_dir=str(tmp_path / "rm"), max_length=64,
                       max_steps=2, save_every=1, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.reward"):
        result = run_reward(cfg)
    assert _messages(caplog, "rlhfkit.recipes.reward") == [
        "2 prompts appear in both train_data and eval_data; held-out accuracy will be optimistic",  # bird, Long.
        f"skipped 2 longer than max_length ({train}: pair 5; {ev}: pair 2)"]
    data = {"train_pairs_read": 6, "duplicates_removed": 1, "prompts_in_both": 2, "train_pairs": 4, "eval_pairs": 2,
            "train_ties": 0, "eval_ties": 0, "skipped": {"longer than max_length": 2},
            "skipped_examples": {"longer than max_length": [f"{train}: pair 5", f"{ev}: pair 2"]}}
    assert _json(tmp_path / "rm" / "data_report.json") == data
    assert set(result) == {"final", "metrics", "eval", "skipped", "data"}
    assert result["data"] == data and result["skipped"] == {"longer than max_length": 2}
    # the full held-out report (NaN-valued entries compared as text)
    assert result["eval"]["num_pairs"] == 2
    assert json.dumps(_json(tmp_path / "rm" / "eval_report.json")) == json.dumps(result["eval"])
    assert _json(_checkpoint_1(tmp_path / "rm") / "trainer_state.json")["description"] == "rm"
    # the saved classifier knows the pad token (it finds each row's last real token with it)
    assert _json(Path(result["final"]) / "config.json")["pad_token_id"] == tiny_tokenizer().pad_token_id


def test_run_reward_without_held_out_pairs_writes_no_eval_report(tmp_path):
    train = _jsonl(tmp_path / "pairs.jsonl", RM_PAIRS)
    result = run_reward(RewardConfig(**RUN, train_data=str(train), test_fraction=0.0, output_dir=str(tmp_path / "rm"),
                                     max_steps=1, batch_size=4, lora_r=2, save_every=1))
    assert result["eval"] == {} and not (tmp_path / "rm" / "eval_report.json").exists()
    assert "eval_pairs" in result["data"] and result["data"]["eval_pairs"] == 0


def test_read_splits_warns_when_nothing_is_held_out_and_refuses_an_empty_train_split(tmp_path, caplog):
    one = _jsonl(tmp_path / "one.jsonl", RM_PAIRS[:1])
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.reward"):
        train, held_out, counts = read_splits(RewardConfig(train_data=str(one), test_fraction=1e-9))
    assert (len(train), held_out, counts) == (1, [], {"train_pairs_read": 1, "duplicates_removed": 0})
    assert _messages(caplog, "rlhfkit.recipes.reward") == [
        "no prompt fell in the held-out split (too few prompts); no evaluation"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.recipes.reward"):
        read_splits(RewardConfig(train_data=str(one), test_fraction=0.0))
    assert _messages(caplog, "rlhfkit.recipes.reward") == []
    with pytest.raises(DataError) as e:
        read_splits(RewardConfig(train_data=str(one), test_fraction=0.999999))
    assert str(e.value) == (f"{one}: no training pairs left after the held-out split; lower test_fraction or pass "
                            "eval_data")


# ============================================================================ best-of-n and expert iteration
def _prompts(path: Path, n: int) -> Path:
    return _jsonl(path, [{"prompt": f"Write a word {i}.", "task_id": f"p{i}"} for i in range(n)])


def test_run_best_of_n_reads_a_prompts_file_and_keeps_responses_short(tmp_path):
    out = tmp_path / "best.jsonl"
    summary = run_best_of_n(BestOfNConfig(model="tiny", prompts=str(_prompts(tmp_path / "p.jsonl", 3)),
                                          samples_per_prompt=3, reward="length", max_new_tokens=3, batch_size=4,
                                          out=str(out)))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["p0", "p1", "p2"] and summary["prompts"] == 3.0
    # byte-level tokens: 3 new tokens decode to at most 3 characters (the default, 64, gives dozens)
    assert all(len(r["completion"]) <= 3 for r in rows)


def test_run_best_of_n_samples_the_demo_tasks_of_its_seed(tmp_path):
    out = tmp_path / "best.jsonl"
    cfg = BestOfNConfig(model="tiny", tasks="demo", demo_per_family=1, samples_per_prompt=1, seed=7, reward="length",
                        max_new_tokens=2, out=str(out))
    run_best_of_n(cfg)
    expected = named_prompts("", "demo", split="test", per_family=1, seed=7, families=cfg.demo_families)
    # the task ids of a split do not depend on the seed; its prompts (numbers, words) do
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == [p.prompt[0].content for p in expected]


def test_expert_iteration_files_resume_from_the_last_round_and_refuse_an_unreachable_threshold(tmp_path, caplog):
    prompts = _prompts(tmp_path / "p.jsonl", 3)
    cfg = ExpertIterationConfig(**RUN, prompts=str(prompts), rounds=1, samples_per_prompt=2, reward="length",
                                threshold=0.0,
                                max_new_tokens=3, max_steps=1, batch_size=4, lr=1e-3, packing=True,
                                output_dir=str(tmp_path / "ei"))
    with caplog.at_level(logging.INFO, logger="rlhfkit.recipes.best_of_n"):
        first = run_expert_iteration(cfg)
    r1 = first["rounds"][0]
    assert _messages(caplog, "rlhfkit.recipes.best_of_n") == [
        f"expert iteration round 1: best {r1['reward/best']:.3f} vs random {r1['reward/random']:.3f}, kept 3/3"]
    assert (tmp_path / "ei" / "config.yaml").exists()
    sft_cfg = SFTConfig.load(tmp_path / "ei" / "round-1" / "sft" / "config.yaml")
    assert sft_cfg.packing is True and sft_cfg.output_dir == str(tmp_path / "ei" / "round-1" / "sft")
    sft_rows = [r for r in read_metrics(tmp_path / "ei" / "round-1" / "sft") if "loss" in r]
    assert r1["sft_loss"] == pytest.approx(sft_rows[-1]["loss"]) and r1["sampled_from"] == "tiny"
    kept = [json.loads(x) for x in (tmp_path / "ei" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert all(len(k["completion"]) <= 3 for k in kept)
    # two rounds, resumed: round 1 is read back and round 2 samples from its model
    second = run_expert_iteration(cfg.replace(rounds=2))
    assert second["rounds"][0] == r1 and second["rounds"][1]["sampled_from"] == r1["model"]
    assert [{k: v for k, v in row.items()} for row in read_metrics(tmp_path / "ei")] == [
        {"step": s["round"], **{k: v for k, v in s.items() if k != "round"}} for s in second["rounds"]]
    final = _json(Path(second["final"]) / "config.json")
    assert final == _json(Path(second["rounds"][1]["model"]) / "config.json")
    with pytest.raises(DataError) as e:
        run_expert_iteration(cfg.replace(threshold=1e9, output_dir=str(tmp_path / "none")))
    data = tmp_path / "none" / "round-1" / "kept.jsonl"
    assert str(e.value).startswith(f"{data}: round 1: no prompt's best response reached threshold 1000000000.0 "
                                   "(best mean reward ")
    assert str(e.value).endswith("); lower --threshold")


# ============================================================================ the online loop, end to end
def test_reinforce_run_with_one_response_per_step_logs_sane_diagnostics(tmp_path, caplog):
    prompts = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi."}, {"prompt": "x" * 60}])     # the 2nd is too long
    cfg = ReinforceConfig(**RUN, prompts=str(prompts), prompts_per_step=1, samples_per_prompt=1, max_new_tokens=4,
                          max_length=40, reward="length", max_steps=2, save_every=1, batch_size=2,
                          output_dir=str(tmp_path / "rf"))
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rollout.prompts"):
        result = run_policy_gradient(cfg)
    assert _messages(caplog, "rlhfkit.rollout.prompts") == [
        f"skipped 1 prompt longer than max_length - max_new_tokens ({prompts}:2)"]
    m = result["metrics"]
    assert m["advantage/std"] == 0.0                        # one response: no spread
    assert 0.0 <= m["time/rollout_s"] < 60 and 0.0 <= m["time/update_s"] < 60
    rows = read_metrics(tmp_path / "rf")
    assert all(r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert _json(_checkpoint_1(tmp_path / "rf") / "trainer_state.json")["description"] == "reinforce"
    assert (Path(result["final"]) / "tokenizer_config.json").exists()


def test_online_run_with_lora_trains_only_the_adapter_of_the_named_model(tmp_path):
    cfg = ReinforceConfig(**RUN, tasks="demo", demo_per_family=1, lora_r=2, lora_alpha=4,
                          output_dir=str(tmp_path / "rf"))
    run = setup_run(cfg)
    trainable = [n for n, p in run.policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert run.policy.model.peft_config["default"].r == 2 and run.policy.model.peft_config["default"].lora_alpha == 4
    assert run.policy.model.config.vocab_size == tiny_causal_lm().config.vocab_size


def test_ppo_run_with_ptx_logs_its_timings(tmp_path):
    ptx = _write_sft(tmp_path / "ptx.jsonl", [("Hi.", "ok"), ("Yo.", "fine")])
    cfg = PPOConfig(**RUN, tasks="demo", demo_per_family=1, prompts_per_step=2, max_new_tokens=4, max_steps=2,
                    save_every=1, batch_size=2, inner_epochs=1, minibatches=1, ptx_coef=0.1, ptx_data=str(ptx),
                    output_dir=str(tmp_path / "ppo"))
    from rlhfkit.recipes.ppo import run_ppo
    m = run_ppo(cfg)["metrics"]
    assert 0.0 <= m["time/rollout_s"] < 60 and 0.0 <= m["time/update_s"] < 60 and m["ptx_loss"] > 0
    assert _json(_checkpoint_1(tmp_path / "ppo") / "trainer_state.json")["description"] == "ppo"


def test_expert_iteration_on_the_demo_tasks_samples_the_train_split_of_its_seed(tmp_path):
    cfg = ExpertIterationConfig(**RUN, tasks="demo", demo_per_family=1, seed=2, rounds=1, samples_per_prompt=1,
                                reward="length",
                                threshold=-1.0, max_new_tokens=2, max_steps=1, batch_size=4,
                                output_dir=str(tmp_path / "ei"))
    run_expert_iteration(cfg)
    kept = [json.loads(x) for x in (tmp_path / "ei" / "round-1" / "kept.jsonl").read_text().splitlines()]
    expected = named_prompts("", "demo", split="train", per_family=1, seed=2, families=cfg.demo_families)
    assert [k["prompt"] for k in kept] == [p.prompt[0].content for p in expected]
