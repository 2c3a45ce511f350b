"""Multi-turn tool-use RL on the tiny model: tool output never enters the loss (nor the KL,
entropy, values or normalizer); GRPO, RLOO, REINFORCE++ and PPO train on episodes unchanged;
the env options and their one-line errors."""

import dataclasses
import math

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.losses.policy import aggregate, grpo_loss, loss_units
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.models.value import PolicyValueModel
from rlhfkit.recipes import ppo as ppo_recipe
from rlhfkit.recipes.online_dpo import OnlineDPOConfig, run_online_dpo
from rlhfkit.recipes.policy_gradient import GRPOConfig, ReinforceConfig, ReMaxConfig, RLOOConfig, run_policy_gradient
from rlhfkit.recipes.ppo import PPOConfig, run_ppo
from rlhfkit.rollout import environments
from rlhfkit.rollout.environments import StepResult
from rlhfkit.rollout.episodes import EpisodeConfig, episode_rollout, run_episodes
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.prompts import demo_prompts
from rlhfkit.rollout.reward_spec import build_reward
from rlhfkit.rollout.rollout import pack_left, policy_outputs, rollout_metrics, unpack_left, with_logprobs
from rlhfkit.train.kl_control import FixedKLController
from rlhfkit.train.metrics import read_metrics

from .conftest import pg_config


class Chatty:
    """A tool that always answers, then a 0/1 reward from the last turn's first character: every
    episode has tool turns between its model turns."""

    def __init__(self, cfg):
        self.cfg, self.turn = cfg, 0

    def reset(self, prompt):
        return prompt.prompt

    def step(self, text):
        self.turn += 1
        if self.turn >= self.cfg.max_turns:
            return StepResult(None, float(text[:1] < "m"), True, {"tool_calls": 0})
        return StepResult(f"tool says {len(text)}", 0.0, False, {"tool_calls": 1})


@pytest.fixture
def chatty(monkeypatch):
    monkeypatch.setitem(environments.ENVIRONMENTS, "calculator", Chatty)


def multiturn_rollout():
    """4 episodes of 2 model turns around a tool turn, with old/ref log-probs, entropy, values."""
    tok, model = tiny_tokenizer(), tiny_causal_lm(seed=1)
    prompts = demo_prompts("train", 2, families=("arithmetic",))
    cfg = EpisodeConfig("calculator", environments.EnvConfig(max_turns=2))
    eps = run_episodes(model, tok, prompts, cfg, SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, seed=3),
                       make_env=lambda name, c: Chatty(c))
    policy = PolicyValueModel(model, critic="shared")
    with torch.no_grad():  # a zero-initialized head predicts 0 everywhere: make its values visible
        for p in policy.value_head.parameters():
            p.normal_(generator=torch.Generator().manual_seed(0))
    rollout = episode_rollout(eps, group_size=2, pad_id=0)
    rollout = with_logprobs(rollout, policy, ReferencePolicy(tiny_causal_lm(seed=2)), pad_id=0, temperature=1.0,
                            micro_batch_size=2, with_values=True)
    return policy, rollout


def test_tool_output_never_enters_the_loss():
    policy, r = multiturn_rollout()
    model_tok, present = r.response_mask.bool(), r.response_present.bool()
    tool = present & ~model_tok
    assert tool.sum() > 0 and model_tok.sum() > 0
    # the rollout's per-token numbers live on the model's tokens only
    for name in ("old_logprobs", "ref_logprobs", "entropy", "values"):
        values = getattr(r, name)
        assert (values[tool] == 0).all() and (values[model_tok] != 0).all(), name
    # the normalizer counts model tokens, not tool tokens
    assert loss_units(r.response_mask, "token") == model_tok.sum() < present.sum()

    r = dataclasses.replace(r, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]))
    # log-probs of *every* response token, tool tokens included (as if they were labels)
    everything = dataclasses.replace(r, response_mask=r.response_attention_mask)
    all_logp = policy_outputs(policy, everything, 0, temperature=1.0).logprobs
    assert (all_logp[tool] != 0).all()
    leaf = all_logp.detach().requires_grad_()

    def loss_of(logp):
        surrogate, penalty, _ = grpo_loss(logp, r.old_logprobs, r.ref_logprobs, r.advantages, r.response_mask,
                                          clip_eps=0.2, kl_coef=0.1, kl_estimator="k3")
        return aggregate(surrogate + penalty, r.response_mask, "token")

    loss = loss_of(leaf)
    loss.backward()
    assert (leaf.grad[tool] == 0).all() and (leaf.grad[model_tok] != 0).all()
    # perturbing the tool tokens' log-probs changes nothing
    garbage = torch.where(tool, torch.randn_like(leaf) * 3 - 5, leaf.detach())
    assert loss_of(garbage) == loss
    # the training forward (tool tokens are not labels) gives the same loss and parameter gradient
    policy.zero_grad()
    trained = loss_of(policy_outputs(policy, r, 0, temperature=1.0).logprobs)
    trained.backward()
    grads = [p.grad.clone() for p in policy.model.parameters()]
    policy.zero_grad()
    reference = loss_of(policy_outputs(policy, everything, 0, temperature=1.0).logprobs * r.response_mask)
    reference.backward()
    assert trained.item() == pytest.approx(reference.item(), abs=1e-6)
    for a, p in zip(grads, policy.model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)
    # the logged KL and entropy are over model tokens
    m = rollout_metrics(r)
    assert m["kl"] == pytest.approx(float(((r.old_logprobs - r.ref_logprobs) * r.response_mask).sum(-1).mean()))
    assert m["response_length"] == float(r.response_mask.sum(-1).mean())
    assert m["episode/turns"] == 2.0 and m["episode/tool_calls"] == 1.0


def test_ppo_gae_runs_over_model_tokens_across_the_tool_turn():
    """GAE on a holed mask = GAE on the model tokens packed together, put back in place: the
    value bootstraps across the tool's output, and the score sits on the last model token."""
    _, r = multiturn_rollout()

    class Run:
        cfg = PPOConfig(model="tiny", tasks="demo", gamma=0.9, lam=0.8, whiten_advantages=False, kl_clamp=0.0)
        kl_controller = FixedKLController(0.1)
        reward = build_reward("gold")
        tokenizer = tiny_tokenizer()

    holed, _ = ppo_recipe.advantages(Run, r)
    mask = r.response_mask
    packed = dataclasses.replace(r, **{k: pack_left(getattr(r, k), mask) for k in
                                       ("old_logprobs", "ref_logprobs", "values", "response_mask")})
    packed = dataclasses.replace(packed, response_attention_mask=None)
    flat, _ = ppo_recipe.advantages(Run, packed)
    torch.testing.assert_close(holed.advantages, unpack_left(flat.advantages, mask))
    torch.testing.assert_close(holed.returns, unpack_left(flat.returns, mask))
    assert (holed.advantages[r.response_present.bool() & ~mask.bool()] == 0).all()


def test_grpo_runs_two_steps_on_the_calculator_env(tmp_path):
    cfg = pg_config(GRPOConfig, tmp_path, env="calculator", reward="gold", max_steps=2, max_turns=2,
                    demo_families=("arithmetic", "units"), max_new_tokens=8)
    run_policy_gradient(cfg)
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"])
        assert 1 <= row["episode/turns"] <= 2 and row["episode/errors"] == 0 and row["episode/timeouts"] == 0
        assert {"episode/tool_calls", "reward/env", "gold_accuracy"} <= set(row)


@pytest.mark.parametrize("cls, kw", [(GRPOConfig, {}), (RLOOConfig, {}), (GRPOConfig, {"inner_epochs": 2}),
                                     (ReinforceConfig, {"algorithm": "reinforce++", "kl_coef": 0.1})])
def test_policy_gradient_trains_on_tool_turns_unchanged(tmp_path, chatty, cls, kw):
    cfg = pg_config(cls, tmp_path, env="calculator", reward="gold", max_turns=2, max_new_tokens=6, **kw)
    run_policy_gradient(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["episode/turns"] == 2.0 and row["episode/tool_calls"] == 1.0
    assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
    if cfg.updates_per_step == 1:
        assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-5)         # on-policy: the rollout's log-probs agree
    assert row["response_length"] <= 2 * 6                               # model tokens only


def test_ppo_trains_on_tool_turns_unchanged(tmp_path, chatty):
    cfg = pg_config(PPOConfig, tmp_path, samples_per_prompt=1, inner_epochs=2, minibatches=2, env="calculator",
                    reward="gold", max_turns=2, max_new_tokens=6)
    run_ppo(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["episode/turns"] == 2.0
    assert all(math.isfinite(row[k]) for k in ("loss", "value_loss", "explained_variance", "kl_penalty"))


def test_online_dpo_pairs_episodes(tmp_path, chatty):
    cfg = pg_config(OnlineDPOConfig, tmp_path, env="calculator", reward="gold", max_turns=2, max_new_tokens=6)
    run_online_dpo(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["episode/turns"] == 2.0 and math.isfinite(row["loss"])


@pytest.mark.parametrize("cls, kw, message", [
    (GRPOConfig, {"env": "calculator", "reward": "format:x"}, "use tasks=demo and reward=gold with env"),
    (ReMaxConfig, {"env": "python", "reward": "gold"}, "remax's greedy baseline is a single-turn decode"),
    (GRPOConfig, {"env": "calculator", "reward": "gold", "max_turns": 0}, "max_turns must be ≥ 1"),
    (GRPOConfig, {"env": "shell", "reward": "gold"}, "env"),
    (GRPOConfig, {"env": "calculator", "reward": "gold", "generation_server": "http://localhost:8000"},
     "env episodes decode in process"),
])
def test_bad_env_options_are_one_line(tmp_path, cls, kw, message):
    with pytest.raises(ConfigError, match=message):
        pg_config(cls, tmp_path, **kw)
