"""The GRPO family as options of the policy-gradient recipe (docs/RL-ALGORITHMS.md): each new
option runs one step through `rlhf grpo`'s code path (`run_policy_gradient` with a
GRPOConfig), and each one's value reaches the math (hand-built rollouts, or identities
between logged numbers, as in test_wiring_policy_gradient.py)."""

import functools
import math

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.config import ConfigError
from rlhfkit.recipes import online
from rlhfkit.recipes.policy_gradient import (
    GRPOConfig,
    ReinforceConfig,
    advantages,
    informative_groups,
    loss,
    run_policy_gradient,
    setup_run,
)
from rlhfkit.rollout.rollout import Rollout
from rlhfkit.train.metrics import read_metrics

from .conftest import pg_config as config


def one_step(cls, tmp_path, **kw) -> dict:
    cfg = config(cls, tmp_path, **kw)
    run_policy_gradient(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["step"] == 1 and math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
    return row


OPTIONS = [
    {"ratio_level": "sequence", "aggregation": "sequence"},
    {"clip_low": 0.2, "clip_high": 0.28},
    {"scale_rewards": "batch"},
    {"scale_rewards": "none"},
    {"constant_length": 8, "aggregation": "seq-mean-token-sum"},
    {"dynamic_sampling": True},
    {"overlong_length": 10, "overlong_cache": 4},
]


@pytest.mark.parametrize("options", OPTIONS, ids=["-".join(map(str, o.values())) for o in OPTIONS])
def test_grpo_runs_one_step_with_each_option(tmp_path, options):
    row = one_step(GRPOConfig, tmp_path, kl_coef=0.05, **options)
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6)    # on-policy first update
    if options.get("dynamic_sampling"):
        assert {"dynamic_sampling/dropped_groups", "dynamic_sampling/kept_frac"} <= set(row)


def test_overlong_penalty_reaches_the_reward(tmp_path):
    # Every response runs to 8 tokens; L_max = 10, L_cache = 4: penalty (6 − 8)/4 = −0.5.
    row = one_step(GRPOConfig, tmp_path, overlong_length=10, overlong_cache=4)
    assert row["response_length"] == 8.0
    assert row["reward/shaped"] == pytest.approx(row["reward"] - 0.5, abs=1e-6)


def test_constant_length_divides_the_loss(tmp_path):
    # REINFORCE at step 1, no KL: A_i = r_i, every response L = 4 tokens, seq-mean-token-sum:
    #   policy_loss = 1/B Σ_i Σ_t −A_i / 16 = −4·reward/16 = −reward/4        (constant_length 16)
    row = one_step(ReinforceConfig, tmp_path, kl_coef=0.0, aggregation="seq-mean-token-sum", samples_per_prompt=2,
                   max_new_tokens=4, constant_length=16)
    assert row["response_length"] == 4.0 and row["reward"] > 0
    assert row["policy_loss"] == pytest.approx(-row["reward"] / 4, abs=1e-6)


def test_reinforce_pp_advantages_are_whitened_over_the_batch(tmp_path):
    # A_{i,t} = (G_{i,t} − μ)/σ over every real token of the batch: their std is 1
    row = one_step(ReinforceConfig, tmp_path, algorithm="reinforce++", samples_per_prompt=2, kl_coef=0.05)
    assert row["advantage/std"] == pytest.approx(1.0, rel=1e-4)
    assert "baseline/moving_average" not in row


# ---------------------------------------------------------------------------- hand-built rollouts


def hand_rollout(lengths, advantages, old_logprobs_per_row, scores=None) -> Rollout:
    b, t = len(lengths), max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths])
    response_ids = (torch.arange(t).repeat(b, 1) + 70) * mask.long()
    return Rollout(prompt_ids=torch.tensor([[40, 41, 42]] * b), prompt_mask=torch.ones(b, 3, dtype=torch.long),
                   response_ids=response_ids, response_mask=mask,
                   scores=torch.zeros(b) if scores is None else torch.tensor(scores), source_scores={},
                   prompt_index=torch.arange(b), group_size=1, finished=torch.ones(b, dtype=torch.bool),
                   texts=("",) * b, old_logprobs=torch.tensor(old_logprobs_per_row)[:, None] * mask,
                   ref_logprobs=torch.zeros(b, t), advantages=torch.tensor(advantages))


# Rows of 1, 2, 3 tokens, A = [2, −1, ½]; log π_old = −30 where A > 0 (ratio far above the
# band), 0 where A < 0 (ratio below it): every row clipped, whatever the model says.
#   clip_low 0.3, clip_high 0.1, token:  ℓ = [−2.2], [0.7, 0.7], [−0.55 ×3] → (−2.2 + 1.4 − 1.65)/6 = −0.408333
#   GSPO defaults (3e-4, 4e-4), sequence: ℓ = −1.0004·2, −0.9997·−1, −1.0004·0.5
#     → (−2.0008 + 0.9997 − 0.5002)/3 = −0.500433
HAND_CASES = [({"clip_low": 0.3, "clip_high": 0.1}, -2.45 / 6),
              ({"ratio_level": "sequence", "aggregation": "sequence"}, -1.5013 / 3)]


@pytest.mark.parametrize("options,expected", HAND_CASES, ids=["clip-low-high", "gspo-defaults"])
def test_clip_range_reaches_the_loss(tmp_path, options, expected):
    run = setup_run(config(GRPOConfig, tmp_path, kl_coef=0.0, **options))
    metrics, _ = online.update(run, hand_rollout([1, 2, 3], [2.0, -1.0, 0.5], [-30.0, 0.0, -30.0]), 0,
                               functools.partial(loss, run.cfg), entropy_grad=False)
    assert metrics["policy_loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["clipfrac"] == 1.0


def test_scale_rewards_reaches_the_advantages(tmp_path):
    # groups of 2: (1, 3), (0, 4); batch std √(10/3): A = [−1, 1, −2, 2]/1.825742 (tests/ops by hand)
    run = setup_run(config(GRPOConfig, tmp_path, samples_per_prompt=2, scale_rewards="batch"))
    scores = torch.tensor([1.0, 3.0, 0.0, 4.0])
    adv = advantages(run, hand_rollout([1] * 4, [0.0] * 4, [0.0] * 4), scores, None)
    s = math.sqrt(10 / 3)
    torch.testing.assert_close(adv, torch.tensor([-1 / s, 1 / s, -2 / s, 2 / s]), atol=1e-5, rtol=0)


def test_dynamic_sampling_drops_equal_groups_and_skips_an_empty_batch(tmp_path):
    run = setup_run(config(GRPOConfig, tmp_path, samples_per_prompt=2, dynamic_sampling=True))
    # groups (1, 1), (0, 1), (2, 2): only the middle one is kept
    rollout = hand_rollout([1, 2, 3, 1, 2, 3], [0.0] * 6, [0.0] * 6, scores=[1.0, 1.0, 0.0, 1.0, 2.0, 2.0])
    kept, metrics = informative_groups(run, rollout)
    assert kept.num_rows == 2 and kept.response_mask.sum(-1).tolist() == [3.0, 1.0]
    assert metrics["dynamic_sampling/dropped_groups"] == 2.0
    assert metrics["dynamic_sampling/kept_frac"] == pytest.approx(1 / 3)
    flat = hand_rollout([1, 1], [0.0, 0.0], [0.0, 0.0], scores=[1.0, 1.0])
    none, metrics = informative_groups(run, flat)
    assert none is None and metrics["dynamic_sampling/skipped_update"] == 1.0


# ---------------------------------------------------------------------------- config and CLI


@pytest.mark.parametrize("kw,message", [
    ({"scale_rewards": "batch", "scale_advantages": False}, "give only scale_rewards"),
    ({"dynamic_sampling": True, "minibatches": 2}, "dynamic_sampling needs minibatches = 1"),
    ({"constant_length": 8}, "constant_length needs aggregation=seq-mean-token-sum"),
    ({"overlong_length": 4, "overlong_cache": 6}, "overlong_cache must be in [0, overlong_length]"),
    ({"overlong_length": 20, "overlong_cache": 4}, "never apply"),
    ({"clip_low": 1.5}, "clip_low must be in (0, 1)"),
])
def test_bad_option_is_one_line(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")) as e:
        GRPOConfig(model="tiny", tasks="demo", max_new_tokens=8, **kw)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="ratio_level=sequence needs one advantage per response"):
        ReinforceConfig(model="tiny", tasks="demo", algorithm="reinforce++", ratio_level="sequence")


def test_cli_flags(tmp_path, restore_root_logger):
    from rlhfkit.cli import app

    runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})
    common = ["--model", "tiny", "--tasks", "demo", "--demo-per-family", "2", "--max-steps", "1",
              "--prompts-per-step", "2", "--max-new-tokens", "4", "--precision", "fp32", "--no-progress"]
    result = runner.invoke(app, ["grpo", *common, "--samples-per-prompt", "2", "--ratio-level", "sequence",
                                 "--clip-high", "0.001", "--scale-rewards", "batch", "--dynamic-sampling",
                                 "--overlong-length", "4", "--overlong-cache", "2", "--output-dir",
                                 str(tmp_path / "grpo")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["reinforce", *common, "--algorithm", "reinforce++", "--output-dir",
                                 str(tmp_path / "rpp")])
    assert result.exit_code == 0, result.output
    wrong = runner.invoke(app, ["grpo", "--algorithm", "reinforce++", "--model", "tiny", "--tasks", "demo"])
    assert wrong.exit_code == 2 and "use 'rlhf reinforce --algorithm reinforce++'" in " ".join(wrong.output.split())
