"""Wiring of the critic-free policy-gradient configs (GRPO, RLOO, ReMax, REINFORCE) to the math.

Most checks go through `run_policy_gradient` and metrics.jsonl: identities between logged
numbers that hold only when the config value reaches the math (step 1 is on-policy, ratio
≡ 1, policy = reference, so KL = 0; step 2 has a nonzero KL). Two checks need numbers the
logs do not carry and use the recipe's step functions (see the section headers):
`setup_run` + the shared `online.update` with the recipe's `loss`, called as `train_step`
calls it, on a hand-built rollout (clip range, loss aggregation) and `setup_run` + `collect`
(log-prob temperature).
"""

import dataclasses
import functools
import math

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.models.tiny import tiny_causal_lm
from rlhfkit.recipes import online
from rlhfkit.recipes.policy_gradient import (
    GRPOConfig,
    ReinforceConfig,
    ReMaxConfig,
    RLOOConfig,
    collect,
    loss,
    run_policy_gradient,
    setup_run,
)
from rlhfkit.rollout.rollout import Rollout
from rlhfkit.train.metrics import read_metrics

from .conftest import pg_config as config


def run_rows(cls, tmp_path, **kw) -> list[dict]:
    cfg = config(cls, tmp_path, **kw)
    run_policy_gradient(cfg)
    return read_metrics(cfg.output_dir)


# ============================================================================ through run_policy_gradient


@pytest.mark.parametrize("cls,extra", [(GRPOConfig, {}), (RLOOConfig, {"kl_placement": "loss"})],
                         ids=["grpo", "rloo-kl-in-loss"])
def test_kl_coef_weights_the_kl_term_of_the_loss(tmp_path, cls, extra):
    # KL in the loss: ℓ = surrogate + β·k3, token-aggregated, so the logged
    #   loss = policy_loss + β · kl_penalty        (kl_penalty = token mean of the k3 term)
    # Step 1: π = π_ref, so k3 = 0. Step 2: the policy moved, kl_penalty > 0.
    beta = 0.37
    rows = run_rows(cls, tmp_path, max_steps=2, kl_coef=beta, aggregation="token", **extra)
    assert rows[0]["kl_penalty"] == pytest.approx(0.0, abs=1e-7) and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["kl_penalty"] > 1e-4
    for row in rows:
        assert row["loss"] == pytest.approx(row["policy_loss"] + beta * row["kl_penalty"], abs=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "auto"])
def test_kl_estimator_of_the_loss_term(tmp_path, estimator):
    # On-policy GRPO takes log π_old from the update's own forward, so at step 2 the logged
    # rollout KL is kl = mean_i Σ_t (log π − log π_ref) over B responses of L tokens each
    # (all responses run to max_new_tokens here). With k1 the in-loss term is its token mean:
    #   kl_penalty = Σ_{i,t}(log π − log π_ref) / (B·L) = kl / L        (L = response_length)
    # "auto" is k3 = e^r − r − 1 ≥ 0 (r = log π_ref − log π): not that number.
    rows = run_rows(GRPOConfig, tmp_path, max_steps=2, kl_coef=0.1, kl_estimator=estimator)
    row = rows[1]
    assert row["response_truncated"] == 1.0 and row["response_length"] == 8.0
    assert abs(row["kl"]) > 1e-3
    k1_mean = row["kl"] / row["response_length"]
    if estimator == "k1":
        assert row["kl_penalty"] == pytest.approx(k1_mean, rel=1e-4, abs=1e-7)
    else:
        assert row["kl_penalty"] > 0 and abs(row["kl_penalty"] - k1_mean) > 1e-2 * abs(k1_mean)


def test_kl_in_the_reward_and_the_moving_baseline_decay(tmp_path):
    # REINFORCE, KL placed in the reward (its default): r'_i = r_i − β Σ_t k1_i,t, and the
    # logged kl is exactly mean_i Σ_t k1_i,t, so mean(r') = reward − β·kl. The baseline is
    # read before each batch and then updated:  b_1 = mean(r'_1),
    #   b_2 = d·b_1 + (1 − d)·mean(r'_2).
    # Aggregation "sequence" at ratio 1: policy_loss = −mean_i A_i = −(mean(r') − b_before).
    beta, decay = 0.3, 0.6
    rows = run_rows(ReinforceConfig, tmp_path, max_steps=2, samples_per_prompt=2, kl_coef=beta, baseline_decay=decay,
                    aggregation="sequence")
    first, second = rows
    assert "kl_penalty" not in first                          # nothing of the KL in the loss
    assert first["kl"] == pytest.approx(0.0, abs=1e-6) and abs(second["kl"]) > 1e-3
    shaped1 = first["reward"] - beta * first["kl"]
    shaped2 = second["reward"] - beta * second["kl"]
    assert first["baseline/moving_average"] == pytest.approx(shaped1, abs=1e-6)
    assert second["baseline/moving_average"] == pytest.approx(decay * shaped1 + (1 - decay) * shaped2, abs=1e-6)
    assert first["policy_loss"] == pytest.approx(-(shaped1 - 0.0), abs=1e-6)       # b = 0 before any batch
    assert second["policy_loss"] == pytest.approx(-(shaped2 - shaped1), abs=1e-5)


GRPO_STD_2x3 = math.sqrt(2 * (3 - 1) / (2 * 3 - 1))  # G groups of k, each of sample std 1: √(G(k−1)/(Gk−1))


@pytest.mark.parametrize("cls,kw,expected", [
    # A_i = (r_i − mean_g)/std_g: each group has sample std 1, the G·k advantages mean 0, so
    # their sample std is √(G(k − 1)/(Gk − 1)) = √(4/5) for G = 2, k = 3.
    (GRPOConfig, {"prompts_per_step": 2, "samples_per_prompt": 3}, lambda r: GRPO_STD_2x3),
    # one group of 6: std 1 scaled; r − mean unscaled (Dr. GRPO): the scores' own std
    (GRPOConfig, {"prompts_per_step": 1, "samples_per_prompt": 6}, lambda r: 1.0),
    (GRPOConfig, {"prompts_per_step": 1, "samples_per_prompt": 6, "scale_advantages": False},
     lambda r: r["reward/std"]),
    # RLOO: r_i − (Σ_j r_j − r_i)/(k − 1) = k/(k − 1)·(r_i − mean): std × 6/5
    (RLOOConfig, {"prompts_per_step": 1, "samples_per_prompt": 6}, lambda r: 6 / 5 * r["reward/std"]),
], ids=["grpo-2x3", "grpo-1x6", "grpo-1x6-unscaled", "rloo-1x6"])
def test_group_baselines_scale_and_group_size(tmp_path, cls, kw, expected):
    row = run_rows(cls, tmp_path, kl_coef=0.0, aggregation="sequence", **kw)[0]
    assert row["advantage/zero_frac"] == 0.0 and row["reward/std"] > 0   # every group has a spread
    assert abs(row["reward/std"] - 1.0) > 0.05                           # scaled ≠ unscaled here
    assert row["advantage/std"] == pytest.approx(expected(row), rel=1e-4)
    # group-centred advantages sum to 0: at ratio 1 the sequence-mean surrogate is 0
    assert row["policy_loss"] == pytest.approx(0.0, abs=1e-6)


def test_remax_and_reinforce_baselines_at_step_1(tmp_path):
    # ReMax: A_i = r_i − r(greedy decode of its prompt): policy_loss = −(reward − greedy reward)
    remax = run_rows(ReMaxConfig, tmp_path / "remax", kl_coef=0.0, aggregation="sequence", samples_per_prompt=2)[0]
    assert remax["policy_loss"] == pytest.approx(-(remax["reward"] - remax["baseline/greedy_reward"]), abs=1e-6)
    # REINFORCE: the baseline is 0 before the first batch: policy_loss = −reward
    reinforce = run_rows(ReinforceConfig, tmp_path / "reinforce", kl_coef=0.0, aggregation="sequence",
                         samples_per_prompt=2)[0]
    assert reinforce["reward"] > 0
    assert reinforce["policy_loss"] == pytest.approx(-reinforce["reward"], abs=1e-6)


@pytest.mark.parametrize("aggregation,per_token_factor", [("sequence", 1), ("token", 1),
                                                          ("seq-mean-token-sum", 4)])
def test_aggregation_through_the_recipe(tmp_path, aggregation, per_token_factor):
    # REINFORCE at step 1, no KL: A_i = r_i (baseline 0), ratio 1, every response L = 4 tokens:
    #   sequence  1/B Σ_i (Σ_t −A_i / L)  = −reward
    #   token     Σ_{i,t} −A_i / (B·L)    = −reward
    #   seq-mean-token-sum 1/B Σ_i Σ_t −A_i = −L·reward = −4·reward
    # (token and sequence differ only with unequal lengths: see the hand-built rollout below)
    row = run_rows(ReinforceConfig, tmp_path, kl_coef=0.0, aggregation=aggregation, samples_per_prompt=2,
                   max_new_tokens=4)[0]
    assert row["response_length"] == 4.0 and row["response_truncated"] == 1.0 and row["reward"] > 0
    assert row["policy_loss"] == pytest.approx(-per_token_factor * row["reward"], abs=1e-6)


def test_logprob_temperature_is_the_same_in_rollout_and_update(tmp_path):
    # RLOO with the KL in the reward scores the rollout's log π_old in its own pass, at the
    # sampling temperature τ; the update must use the same τ or the first (on-policy) update
    # sees ratios ≠ 1. At τ = 2 a mismatch moves log-probs by whole nats.
    row = run_rows(RLOOConfig, tmp_path, kl_coef=0.05, temperature=2.0)[0]
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert row["approx_kl"] == pytest.approx(0.0, abs=1e-9) and row["clipfrac"] == 0.0


@pytest.mark.parametrize("cls,extra", [(GRPOConfig, {}), (RLOOConfig, {"kl_placement": "reward"})],
                         ids=["grpo", "rloo-old-logprob-pass"])
def test_share_prompts_reaches_the_passes_and_changes_no_number(tmp_path, cls, extra, monkeypatch):
    # share_prompts lays out every log-prob pass (rollout's policy and reference passes, the
    # update's forwards) with each prompt stored once: the logged numbers of two steps (the
    # second after an update, 2 epochs × 2 minibatches shuffled across groups) are those of
    # the unshared run; and the batches really were shared (fewer positions than rows × width).
    from rlhfkit.rollout import rollout as rollout_module

    shared_batches = []
    real = rollout_module.collate_shared_prompts
    monkeypatch.setattr(rollout_module, "collate_shared_prompts",
                        lambda *a, **k: shared_batches.append(real(*a, **k)) or shared_batches[-1])
    kw = dict(max_steps=2, inner_epochs=2, minibatches=2, batch_size=3, kl_coef=0.1, **extra)
    plain = run_rows(cls, tmp_path / "plain", share_prompts=False, **kw)
    assert not shared_batches
    shared = run_rows(cls, tmp_path / "shared", **kw)
    assert shared_batches and all(b.position_ids is not None for b in shared_batches)
    assert any((b.position_ids[:, 1:] <= b.position_ids[:, :-1]).logical_and(b.position_ids[:, 1:] > 0).any()
               for b in shared_batches)  # some row has a branch
    for a, b in zip(plain, shared, strict=True):
        for key in ("loss", "policy_loss", "kl", "kl_penalty", "entropy", "grad_norm", "ratio_mean", "approx_kl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


def test_share_prompts_is_off_with_a_kernel_that_does_not_read_branches():
    assert GRPOConfig(model="tiny", tasks="demo").shares_prompts
    assert not GRPOConfig(model="tiny", tasks="demo", attention="sdpa").shares_prompts
    assert not GRPOConfig(model="tiny", tasks="demo", share_prompts=False).shares_prompts


# ============================================================================ setup_run + collect


def test_rollout_logprobs_are_taken_at_the_sampling_temperature(tmp_path):
    # log π(y_t) = log_softmax(logits_t / τ)[y_t], from a plain forward of the start model.
    tau = 2.0
    run = setup_run(config(RLOOConfig, tmp_path, kl_coef=0.05, temperature=tau))
    rollout, _ = collect(run, 0)
    model = tiny_causal_lm(seed=run.cfg.seed)
    with torch.no_grad():
        for i in range(rollout.num_rows):
            prompt = rollout.prompt_ids[i][rollout.prompt_mask[i].bool()]
            response = rollout.response_ids[i][rollout.response_mask[i].bool()]
            logits = model(input_ids=torch.cat([prompt, response])[None]).logits[0]
            p = len(prompt)
            expected = torch.log_softmax(logits[p - 1:p - 1 + len(response)] / tau, dim=-1)
            expected = expected.gather(-1, response[:, None])[:, 0]
            torch.testing.assert_close(rollout.old_logprobs[i, :len(response)], expected, atol=2e-5, rtol=0)
            torch.testing.assert_close(rollout.ref_logprobs[i, :len(response)], expected, atol=2e-5, rtol=0)


# ============================================================================ setup_run + update, hand-built rollout


def update(run, rollout: Rollout, step: int):
    """The update of `policy_gradient.train_step`: the shared loop with this recipe's loss."""
    return online.update(run, rollout, step, functools.partial(loss, run.cfg), entropy_grad=False)


def hand_rollout(lengths, advantages, old_logprobs_per_row) -> Rollout:
    """Rows with a 3-token prompt and `lengths` response tokens; old log-probs constant per row."""
    b, t = len(lengths), max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths])
    response_ids = (torch.arange(t).repeat(b, 1) + 70) * mask.long()      # byte tokens, 0 (pad) after
    return Rollout(prompt_ids=torch.tensor([[40, 41, 42]] * b), prompt_mask=torch.ones(b, 3, dtype=torch.long),
                   response_ids=response_ids, response_mask=mask, scores=torch.zeros(b), source_scores={},
                   prompt_index=torch.arange(b), group_size=1, finished=torch.ones(b, dtype=torch.bool),
                   texts=("",) * b, old_logprobs=torch.tensor(old_logprobs_per_row)[:, None] * mask,
                   ref_logprobs=torch.zeros(b, t), advantages=torch.tensor(advantages))


# Rows of 1, 2 and 3 tokens with A = [2, −1, ½]. log π_old = −30 where A > 0, so ρ = π/π_old is
# astronomically above 1 + ε; log π_old = 0 where A < 0, so ρ = π < 1 − ε (a random model gives
# no token probability near 1). Both sides are clipped on every token: ℓ = −(1 + ε)A for A > 0,
# −(1 − ε)A for A < 0, whatever the model's log-probs, and no gradient flows (grad_norm 0).
#   ε = 0.3: per-token ℓ = [−2.6], [0.7, 0.7], [−0.65 ×3]
#     token              (−2.6 + 1.4 − 1.95)/6 = −0.525
#     sequence           (−2.6 + 0.7 − 0.65)/3 = −0.85
#     seq-mean-token-sum (−2.6 + 1.4 − 1.95)/3 = −1.05
#   ε = 0.1: per-token ℓ = [−2.2], [0.9, 0.9], [−0.55 ×3]
#     token (−2.2 + 1.8 − 1.65)/6 = −0.341667;  sequence (−2.2 + 0.9 − 0.55)/3 = −0.616667
#   ε = 0.2 (the default): token (−2.4 + 1.6 − 1.8)/6 = −0.433333
CLIP_CASES = [(0.3, "token", -0.525), (0.3, "sequence", -0.85), (0.3, "seq-mean-token-sum", -1.05),
              (0.1, "token", -2.05 / 6), (0.1, "sequence", -1.85 / 3), (None, "token", -2.6 / 6)]


@pytest.mark.parametrize("clip_eps,aggregation,expected", CLIP_CASES,
                         ids=[f"eps={e or 'default'}-{a}" for e, a, _ in CLIP_CASES])
def test_clip_range_and_aggregation_on_a_hand_built_rollout(tmp_path, clip_eps, aggregation, expected):
    extra = {} if clip_eps is None else {"clip_eps": clip_eps}
    run = setup_run(config(GRPOConfig, tmp_path, kl_coef=0.0, aggregation=aggregation, **extra))
    rollout = hand_rollout([1, 2, 3], [2.0, -1.0, 0.5], [-30.0, 0.0, -30.0])
    metrics, _ = update(run, rollout, 0)
    assert metrics["policy_loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["loss"] == pytest.approx(expected, abs=1e-5)
    assert metrics["clipfrac"] == 1.0
    assert metrics["grad_norm"] == 0.0


@pytest.mark.parametrize("cap,expected_loss", [(2.0, -7.1 / 6), (0.0, -0.525)], ids=["tis-cap-2", "tis-off"])
def test_sampler_logprobs_weight_the_surrogate_truncated_at_the_cap(tmp_path, cap, expected_loss):
    # The ε = 0.3 case above (per-token ℓ = [−2.6], [0.7, 0.7], [−0.65 ×3]) with the tokens drawn by
    # another engine μ: w = min(π_old/μ, C) = exp(old − μ) per row: 1.5, 0.5, e^5 → C = 2.
    #   weighted ℓ = [−3.9], [0.35, 0.35], [−1.3 ×3]; token mean (−3.9 + 0.7 − 3.9)/6 = −7.1/6
    #   is_weight_mean (1.5 + 2·0.5 + 3·2)/6 = 8.5/6; is_capped_frac 3/6. cap 0: off, −0.525.
    run = setup_run(config(GRPOConfig, tmp_path, kl_coef=0.0, aggregation="token", clip_eps=0.3,
                           sampler_is_cap=cap))
    rollout = hand_rollout([1, 2, 3], [2.0, -1.0, 0.5], [-30.0, 0.0, -30.0])
    sampler = torch.tensor([-30.0 - math.log(1.5), math.log(2.0), -35.0])[:, None] * torch.ones(3, 3)
    rollout = dataclasses.replace(rollout, sampler_logprobs=sampler * rollout.response_mask)
    metrics, _ = update(run, rollout, 0)
    assert metrics["policy_loss"] == pytest.approx(expected_loss, abs=1e-5)
    if cap:
        assert metrics["sampler/is_weight_mean"] == pytest.approx(8.5 / 6, abs=1e-5)
        assert metrics["sampler/is_capped_frac"] == pytest.approx(0.5)
    else:
        assert "sampler/is_weight_mean" not in metrics


def test_a_sampler_weight_cap_below_1_is_refused():
    with pytest.raises(ConfigError, match="sampler_is_cap"):
        GRPOConfig(model="tiny", tasks="demo", max_new_tokens=8, sampler_is_cap=0.5)
