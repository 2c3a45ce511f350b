"""End to end on the tiny model: GRPO, RLOO, ReMax, REINFORCE, PPO, best-of-n, expert iteration.

Every algorithm runs a few steps and logs every diagnostic; GRPO raises a rule reward;
ReMax's baseline is the greedy decode's score; an interrupted run resumes to the same
losses; the per-rollout lr schedule; the CLI commands.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.losses.policy import aggregate, grpo_loss, reinforce_loss
from rlhfkit.models.device import cpu_supports_bf16
from rlhfkit.recipes.best_of_n import (
    BestOfNConfig,
    ExpertIterationConfig,
    best_of_n,
    run_best_of_n,
    run_expert_iteration,
)
from rlhfkit.recipes.online import prompt_indices, prompts_for_step
from rlhfkit.recipes.policy_gradient import (
    GRPOConfig,
    PolicyGradientConfig,
    ReinforceConfig,
    ReMaxConfig,
    RLOOConfig,
    collect,
    run_policy_gradient,
    setup_run,
    train_step,
)
from rlhfkit.recipes.ppo import PPOConfig, run_ppo
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.rollout.prompts import RLPrompt
from rlhfkit.rollout.rewards import FunctionReward, WeightedRewards
from rlhfkit.train.engine import Engine, lr_lambda
from rlhfkit.train.metrics import read_metrics

# Names every online recipe logs each step (the brief's stable diagnostics).
DIAGNOSTICS = {"loss", "reward", "reward/mean", "reward/std", "kl", "approx_kl", "clipfrac", "entropy",
               "response_length", "grad_norm", "lr"}


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model is latency-bound: extra threads only contend on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(tmp_path: Path, out: str, **kw) -> dict:
    base = dict(model="tiny", tasks="demo", demo_per_family=3, output_dir=str(tmp_path / out), max_steps=2,
                prompts_per_step=2, max_new_tokens=8, batch_size=4, precision="fp32", progress=False, seed=5,
                lr=1e-3, reward="gold,format:[a-z]:0.5")
    base.update(kw)
    return base


@pytest.mark.parametrize("cls,extra", [
    (GRPOConfig, {}),
    (GRPOConfig, {"aggregation": "sequence", "inner_epochs": 2, "minibatches": 2}),
    (RLOOConfig, {}),
    (RLOOConfig, {"kl_placement": "loss"}),
    (ReMaxConfig, {}),
    (ReinforceConfig, {"samples_per_prompt": 2}),
])
def test_each_policy_gradient_algorithm_runs_and_logs_every_diagnostic(tmp_path, cls, extra):
    cfg = cls(**_base(tmp_path, "run", **extra))
    result = run_policy_gradient(cfg)
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert DIAGNOSTICS | {"gold_accuracy", "reward/gold", "reward/format"} <= set(row), set(row)
        assert row["response_length"] > 0 and row["entropy"] > 0
    assert rows[1]["kl"] != 0.0  # the policy moved away from the reference after step 1
    if cfg.updates_per_step == 1:
        assert rows[0]["approx_kl"] == 0.0 and rows[0]["clipfrac"] == 0.0  # on-policy: ratio ≡ 1
    if cfg.resolved_kl_placement == "loss":
        assert "kl_penalty" in rows[0]
    assert (Path(result["final"]) / "config.json").exists()


def test_an_online_recipe_launched_with_the_fsdp_config_on_one_process_trains(tmp_path, monkeypatch):
    """Online recipes run under FSDP now (2 processes: tests/train/test_fsdp_online.py): the
    FSDP config is no longer refused; on one process nothing is sharded, and `full_parameters`
    around the rollout is a no-op."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    cfg = GRPOConfig(**_base(tmp_path, "run", max_steps=1))
    result = run_policy_gradient(cfg)
    assert [row["step"] for row in read_metrics(cfg.output_dir) if "loss" in row] == [1]
    assert (Path(result["final"]) / "config.json").exists()


def test_ppo_runs_and_logs_every_diagnostic(tmp_path):
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"prompt": f"Add {i} and 1.", "completion": f"Answer: {i + 1}"}) + "\n"
                           for i in range(6)))
    cfg = PPOConfig(**_base(tmp_path, "ppo", max_steps=3, inner_epochs=2, minibatches=2, ent_coef=0.01,
                            target_kl=0.01, kl_horizon=100, ptx_coef=0.1, ptx_data=str(ptx), samples_per_prompt=2))
    result = run_ppo(cfg)
    rows = read_metrics(cfg.output_dir)
    for row in rows:
        assert DIAGNOSTICS | {"explained_variance", "value_loss", "vf_clipfrac", "kl_coef", "ptx_loss",
                              "gold_accuracy"} <= set(row), set(row)
    # a zero-initialized value head predicts 0, which explains none of the variance
    assert rows[0]["explained_variance"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["values/mean"] != 0.0  # the critic learned
    # adaptive β after step 2: e = clip(KL/0.01 − 1, ±0.2), β ← β(1 + e·n/horizon), n = 4 responses
    error = min(max(rows[1]["kl_penalty"] / 0.01 - 1, -0.2), 0.2)
    assert error != 0
    assert rows[2]["kl_coef"] == pytest.approx(rows[1]["kl_coef"] * (1 + error * 4 / 100), rel=1e-9)
    assert (Path(result["final"]) / "value_head.safetensors").exists()


def test_ppo_first_update_is_on_policy(tmp_path):
    cfg = PPOConfig(**_base(tmp_path, "ppo1", max_steps=1, inner_epochs=1, minibatches=1, critic="separate"))
    run_ppo(cfg)
    row = read_metrics(cfg.output_dir)[0]
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and row["clipfrac"] == 0.0
    assert row["kl"] == pytest.approx(0.0, abs=1e-6)  # the first rollout's policy is the reference


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
@pytest.mark.parametrize("cls", [GRPOConfig, PPOConfig])
def test_bf16_first_rollout_has_zero_kl(tmp_path, cls):
    # The frozen reference must run the policy's attention kernel and precision: in bf16 two
    # kernels differ by far more than rounding noise of one.
    cfg = cls(**_base(tmp_path, "bf16", max_steps=1, precision="bf16"))
    (run_ppo if cls is PPOConfig else run_policy_gradient)(cfg)
    assert read_metrics(cfg.output_dir)[0]["kl"] == 0.0


def test_on_policy_grpo_takes_old_logprobs_from_the_update_with_the_same_result(tmp_path, monkeypatch):
    # One update per rollout, KL in the loss: the rollout's own policy forward is skipped and the
    # training forward's detached log-probs serve as log π_old. Same losses, KL, entropy, weights.
    from rlhfkit.recipes import policy_gradient as pg

    assert pg.old_logprobs_from_update(GRPOConfig(model="tiny", tasks="demo"))
    assert not pg.old_logprobs_from_update(GRPOConfig(model="tiny", tasks="demo", inner_epochs=2))
    assert not pg.old_logprobs_from_update(RLOOConfig(model="tiny", tasks="demo", kl_coef=0.1))
    runs = {}
    for fused in (True, False):
        monkeypatch.setattr(pg, "old_logprobs_from_update", lambda cfg, fused=fused: fused)
        cfg = GRPOConfig(**_base(tmp_path, f"fused-{fused}", max_steps=2, kl_coef=0.1))
        run_policy_gradient(cfg)
        runs[fused] = read_metrics(cfg.output_dir)
    for a, b in zip(runs[True], runs[False], strict=True):
        for key in ("loss", "kl", "entropy", "reward", "grad_norm", "kl_penalty"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
        assert a["approx_kl"] == 0.0 and a["clipfrac"] == 0.0


def test_micro_batch_size_does_not_change_the_update(tmp_path):
    # Micro-batches are length-sorted row groups whose gradients add up to the whole batch's:
    # one forward over all 8 rows or three of ≤ 3 rows give the same step.
    runs = []
    for size in (8, 3):
        cfg = GRPOConfig(**_base(tmp_path, f"mb-{size}", batch_size=size, samples_per_prompt=4, kl_coef=0.1))
        run_policy_gradient(cfg)
        runs.append(read_metrics(cfg.output_dir))
    for a, b in zip(*runs, strict=True):
        for key in ("loss", "kl", "entropy", "reward", "grad_norm", "kl_penalty"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def _likes_a(prompts_file: Path, tmp_path: Path, **kw) -> GRPOConfig:
    return GRPOConfig(model="tiny", prompts=str(prompts_file), output_dir=str(tmp_path / "likes_a"),
                      max_steps=30, prompts_per_step=2, samples_per_prompt=8, max_new_tokens=8, batch_size=16,
                      precision="fp32", progress=False, lr=1e-2, seed=0, **kw)


def _prompts_file(tmp_path: Path, n: int = 8) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something, number {i}.", "answer": str(i)}) + "\n"
                            for i in range(n)))
    return path


def _share_of_a(sample) -> float:
    return sample.response.count("a") / max(len(sample.response), 1)


def test_grpo_raises_a_reward_that_prefers_one_token(tmp_path):
    run = setup_run(_likes_a(_prompts_file(tmp_path), tmp_path))
    run.reward = WeightedRewards([(FunctionReward("likes_a", _share_of_a), 1.0)])
    rewards = [train_step(run, step)[0]["reward/mean"] for step in range(30)]
    # A random byte-level model says "a" about 1 time in 288; GRPO makes it the favourite.
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.05 and last > 0.3, rewards


def test_remax_baseline_is_the_greedy_decodes_score(tmp_path):
    run = setup_run(ReMaxConfig(**_base(tmp_path, "remax", prompts_per_step=3, samples_per_prompt=2)))
    run.reward = WeightedRewards([(FunctionReward("chars", lambda s: float(len(s.response))), 1.0)])
    rollout, baseline = collect(run, step=0)
    prompts = prompts_for_step(run.prompts, 3, seed=run.cfg.seed, step=0)
    greedy = generate(run.policy.model, run.tokenizer, [p.prompt for p in prompts],
                      SamplingConfig(max_new_tokens=8, temperature=0.0))
    expected = [float(len(g.text)) for g in greedy]
    assert baseline.tolist() == [expected[i] for i in rollout.prompt_index.tolist()]
    assert rollout.scores.tolist() == [float(len(t)) for t in rollout.texts]


def _resume_case(tmp_path: Path, cls, **kw):
    full = tmp_path / "full"
    cfg = cls(**_base(tmp_path, "full", max_steps=4, save_every=2, **kw))
    runner = run_ppo if cls is PPOConfig else run_policy_gradient
    runner(cfg)
    # A run that died right after its step-2 checkpoint: only that checkpoint is left.
    died = tmp_path / "died"
    (died / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", died / "checkpoints" / "step-000002")
    (died / "checkpoints" / "latest").write_text("step-000002\n")
    runner(cfg.replace(output_dir=str(died)))
    a = {r["step"]: r for r in read_metrics(full)}
    b = {r["step"]: r for r in read_metrics(died)}
    assert sorted(b) == [3, 4]
    return a, b


@pytest.mark.parametrize("cls,kw", [
    (GRPOConfig, {"samples_per_prompt": 4}),
    (ReinforceConfig, {"samples_per_prompt": 2, "reward_normalize": True}),  # moving baseline + reward moments
    (PPOConfig, {"target_kl": 0.01, "kl_horizon": 50}),              # critic + adaptive β
])
def test_resume_gives_the_same_rollout_and_loss(tmp_path, cls, kw):
    a, b = _resume_case(tmp_path, cls, **kw)
    for step in (3, 4):
        for key in ("loss", "reward/mean", "kl", "entropy", "grad_norm"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6), (step, key)
    if cls is ReinforceConfig:
        assert b[3]["baseline/moving_average"] == pytest.approx(a[3]["baseline/moving_average"], abs=1e-9)
    if cls is PPOConfig:
        assert b[3]["kl_coef"] == pytest.approx(a[3]["kl_coef"], abs=1e-12)
        assert b[3]["values/mean"] == pytest.approx(a[3]["values/mean"], abs=1e-6)


def test_clipped_loss_at_ratio_one_has_the_reinforce_gradient():
    # The recipes use the clipped surrogate for every algorithm; on-policy it is REINFORCE.
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 5, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    adv = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    for aggregation in ("token", "sequence", "seq-mean-token-sum"):
        surrogate, penalty, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2, kl_coef=0.0,
                                          kl_estimator="k3")
        clipped = aggregate(surrogate + penalty, mask, aggregation)
        (g_clip,) = torch.autograd.grad(clipped, logp)
        plain = aggregate(reinforce_loss(logp, adv, mask)[0], mask, aggregation)
        (g_plain,) = torch.autograd.grad(plain, logp)
        torch.testing.assert_close(g_clip, g_plain)


def test_kl_in_the_reward_is_subtracted_per_response():
    from types import SimpleNamespace

    from rlhfkit.recipes.policy_gradient import shaped_scores
    from rlhfkit.rollout.rollout import Rollout

    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rollout = Rollout(prompt_ids=torch.ones(2, 1, dtype=torch.long), prompt_mask=torch.ones(2, 1),
                      response_ids=torch.ones(2, 3, dtype=torch.long), response_mask=mask,
                      scores=torch.tensor([1.0, 0.0]), source_scores={}, prompt_index=torch.tensor([0, 0]),
                      group_size=2, finished=torch.tensor([True, True]), texts=("", ""),
                      old_logprobs=torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 9.0, 9.0]]),
                      ref_logprobs=torch.tensor([[-1.5, -2.0, -2.0], [-0.5, 0.0, 0.0]]))
    # k1 = old − ref on real tokens: row 0 (0.5 + 0 − 1) = −0.5, row 1 −0.5 (padding ignored)
    # r − β Σ k1 with β = 0.1: [1 + 0.05, 0 + 0.05]
    cfg = RLOOConfig(model="tiny", tasks="demo", kl_coef=0.1)
    assert shaped_scores(SimpleNamespace(cfg=cfg), rollout).tolist() == pytest.approx([1.05, 0.05])
    in_loss = RLOOConfig(model="tiny", tasks="demo", kl_coef=0.1, kl_placement="loss")
    assert shaped_scores(SimpleNamespace(cfg=in_loss), rollout).tolist() == [1.0, 0.0]


def test_lr_schedule_counts_rollout_steps(tmp_path):
    cfg = PolicyGradientConfig(**_base(tmp_path, "sched", max_steps=4, warmup_steps=2, schedule="linear",
                                       min_lr_ratio=0.5, minibatches=2, samples_per_prompt=2))
    engine = Engine(cfg, tmp_path / "sched", updates_per_step=2)
    engine.setup(torch.nn.Linear(2, 2))
    used = []
    for _ in range(8):
        used.append(engine.optimizer.param_groups[0]["lr"])
        engine.optimizer_step()
    mult = [lr_lambda(s, warmup=2, total=4, schedule="linear", min_ratio=0.5) for s in range(4)]
    # two optimizer updates per rollout step share that step's lr: 0.5, 0.5, 1, 1, 1, 1, 0.75, 0.75
    assert used == pytest.approx([1e-3 * m for m in mult for _ in range(2)])
    engine.metrics.close()
    engine.progress.close()


def test_prompt_order_is_a_pure_function_of_seed_and_step_and_covers_each_epoch():
    first_epoch = prompt_indices(10, 5, seed=3, step=0) + prompt_indices(10, 5, seed=3, step=1)
    assert sorted(first_epoch) == list(range(10))
    assert prompt_indices(10, 5, seed=3, step=7) == prompt_indices(10, 5, seed=3, step=7)
    assert prompt_indices(10, 5, seed=3, step=0) != prompt_indices(10, 5, seed=4, step=0)
    assert sorted(prompt_indices(3, 6, seed=0, step=0)) == [0, 0, 1, 1, 2, 2]  # fewer prompts than a step


# ---------------------------------------------------------------------------- best-of-n, expert iteration

def test_best_of_n_keeps_the_highest_reward(tmp_path):
    from rlhfkit.data.schemas import as_conversation
    from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer

    prompts = [RLPrompt(as_conversation(f"Write something {i}."), {"task_id": f"t{i}"}) for i in range(3)]
    reward = WeightedRewards([(FunctionReward("chars", lambda s: float(len(s.response))), 1.0)])
    results = best_of_n(tiny_causal_lm(), tiny_tokenizer(), prompts, reward,
                        SamplingConfig(max_new_tokens=6, temperature=1.0, n=4, seed=0))
    for r in results:
        assert len(r.responses) == 4
        assert r.best_reward == max(len(t) for t in r.responses) and len(r.best) == r.best_reward
        assert r.mean_reward == pytest.approx(sum(len(t) for t in r.responses) / 4)
        row = r.record()
        assert row["completion"] == r.best and row["task_id"] == r.prompt.id and row["n"] == 4


def test_best_of_n_command_writes_jsonl_and_summary(tmp_path):
    out = tmp_path / "best.jsonl"
    summary = run_best_of_n(BestOfNConfig(model="tiny", tasks="demo", demo_per_family=2, samples_per_prompt=4,
                                          reward="format:[a-z]", max_new_tokens=6, out=str(out)))
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 8 and all({"prompt", "completion", "reward", "task_id"} <= set(r) for r in rows)
    assert summary["reward/best"] >= summary["reward/random"]
    assert summary["reward/best"] == pytest.approx(sum(r["reward"] for r in rows) / 8)
    assert "gold_accuracy/best" in summary
    assert json.loads((tmp_path / "best.jsonl.summary.json").read_text())["n"] == 4


def test_expert_iteration_rounds_and_resume(tmp_path):
    cfg = ExpertIterationConfig(model="tiny", prompts=str(_prompts_file(tmp_path, 6)), rounds=2, samples_per_prompt=3,
                                reward="format:[a-z]", threshold=1.0, max_new_tokens=6, max_steps=2,
                                batch_size=4, lr=1e-3, precision="fp32", progress=False,
                                output_dir=str(tmp_path / "ei"))
    result = run_expert_iteration(cfg)
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    kept = [json.loads(x) for x in (tmp_path / "ei" / "round-1" / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == result["rounds"][0]["kept"] > 0 and all(r["reward"] >= 1.0 for r in kept)
    assert result["rounds"][1]["sampled_from"] == result["rounds"][0]["model"]  # round 2 samples from round 1's SFT
    assert (Path(result["final"]) / "config.json").exists()
    again = run_expert_iteration(cfg)  # finished rounds are not redone
    assert again["rounds"] == result["rounds"]


# ---------------------------------------------------------------------------- CLI

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


def test_cli_commands(tmp_path, restore_root_logger):
    from rlhfkit.cli import app

    for name in ("grpo", "rloo", "remax", "reinforce", "ppo", "best-of-n", "expert-iter"):
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0 and "Examples" in result.output, name
    out = tmp_path / "cli"
    result = runner.invoke(app, ["grpo", "--model", "tiny", "--tasks", "demo", "--demo-per-family", "2",
                                 "--max-steps", "1", "--prompts-per-step", "2", "--samples-per-prompt", "2",
                                 "--max-new-tokens", "4", "--precision", "fp32", "--no-progress",
                                 "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert "grpo done" in result.output and [r["step"] for r in read_metrics(out)] == [1]
    wrong = runner.invoke(app, ["grpo", "--algorithm", "rloo", "--model", "tiny", "--tasks", "demo"])
    assert wrong.exit_code == 2 and "use 'rlhf rloo'" in " ".join(wrong.output.split())
    bad = runner.invoke(app, ["rloo", "--model", "tiny", "--tasks", "demo", "--reward", "gold,lenght:0.1"])
    assert bad.exit_code == 2 and "did you mean 'length'" in " ".join(bad.output.split())
