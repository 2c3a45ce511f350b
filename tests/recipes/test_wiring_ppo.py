"""Wiring of PPOConfig to the math: γ, λ, clip ranges, value/entropy/ptx weights, KL β and
clamp, the KL estimator and advantage whitening.

Through `run_ppo` and metrics.jsonl where the logs carry the signal (step 1: the value head
is zero-initialized so V ≡ 0, the policy equals the reference so KL ≡ 0, every response runs
to max_new_tokens). γ and λ separately, β, the clamp and the estimator need a rollout with
known per-token numbers, and the clip ranges need ratios outside them: those use the recipe's
step functions `setup_run` + `advantages` / the shared `online.update` with PPO's `loss`
(called as `train_step` calls it) on a hand-built rollout.
"""

import dataclasses
import functools
import json
import math

import pytest
import torch

from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes import online
from rlhfkit.recipes.ppo import PPOConfig, advantages, loss, run_ppo, setup_run
from rlhfkit.rollout.rollout import Rollout
from rlhfkit.train.metrics import read_metrics

REWARD = "format:[a-z]:1.0,format:[0-9]:0.5,format:[A-Z]:0.25"


def config(tmp_path, **kw) -> PPOConfig:
    base = dict(model="tiny", tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "run"), max_steps=1,
                prompts_per_step=2, samples_per_prompt=2, max_new_tokens=3, batch_size=8, inner_epochs=1, minibatches=1,
                precision="fp32", progress=False, seed=5, lr=1e-2, reward=REWARD, max_grad_norm=1e9)
    base.update(kw)
    return PPOConfig(**base)


# ============================================================================ through run_ppo


@pytest.mark.parametrize("gamma,lam,whiten,vf_coef,ent_coef", [
    (1.0, 0.95, True, 0.1, 0.0),         # the defaults
    (0.5, 0.8, False, 0.7, 0.05),
    (0.9, 1.0, True, 1.3, 0.2),
])
def test_step1_returns_value_loss_whitening_and_loss_weights(tmp_path, gamma, lam, whiten, vf_coef, ent_coef):
    # Step 1: V ≡ 0 and KL ≡ 0, so the per-token rewards are the score s_i on the last of the
    # L = 3 tokens and GAE gives, with x = γλ:  A_t = R_t = x^{L−1−t}·s_i, i.e. (x², x, 1)·s_i.
    #   returns/mean = mean_i s_i·(1 + x + x²)/3 = reward·(1 + x + x²)/3
    #   value_loss   = ½·mean_t R_t² = ½·mean_i s_i²·(1 + x² + x⁴)/3
    #     (mean s² from the logged mean and sample std over B = 4:  ((B−1)·std² + B·mean²)/B)
    #   policy_loss  = −mean_t A_t·ρ (ρ = 1) = −returns/mean, or 0 once A is whitened (mean 0)
    #   loss         = policy_loss + c_v·value_loss − c_H·entropy
    cfg = config(tmp_path, gamma=gamma, lam=lam, whiten_advantages=whiten, vf_coef=vf_coef, ent_coef=ent_coef,
                 kl_coef=0.07)
    run_ppo(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["response_length"] == 3.0 and row["response_truncated"] == 1.0
    assert row["kl"] == 0.0 and row["values/mean"] == 0.0 and row["reward/std"] > 0.1
    assert row["kl_coef"] == 0.07
    x, b = gamma * lam, 4
    mean_sq = ((b - 1) * row["reward/std"] ** 2 + b * row["reward"] ** 2) / b
    assert row["returns/mean"] == pytest.approx(row["reward"] * (1 + x + x * x) / 3, rel=1e-5)
    assert row["value_loss"] == pytest.approx(0.5 * mean_sq * (1 + x ** 2 + x ** 4) / 3, rel=1e-5)
    assert row["policy_loss"] == pytest.approx(0.0 if whiten else -row["returns/mean"], abs=1e-6)
    entropy = row.get("entropy_update", 0.0)
    if ent_coef:
        assert entropy == pytest.approx(row["entropy"], rel=1e-4)  # the rollout's entropy, same weights
    else:
        assert "entropy_update" not in row
    assert row["loss"] == pytest.approx(row["policy_loss"] + vf_coef * row["value_loss"] - ent_coef * entropy,
                                        abs=1e-6)


def test_logprob_temperature_is_the_same_in_rollout_and_update(tmp_path):
    # The rollout scores log π_old at the sampling temperature τ; the first (on-policy) update
    # must use the same τ, or its ratios are not 1 (at τ = 2 they would be off by whole nats).
    cfg = config(tmp_path, temperature=2.0)
    run_ppo(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert row["approx_kl"] == pytest.approx(0.0, abs=1e-9) and row["clipfrac"] == 0.0


PTX = [("Add 1 and 1.", "Answer: 2"), ("Add 2 and 5.", "Answer: 7")]


@pytest.mark.parametrize("ptx_coef", [0.5, 2.0])
def test_ptx_coef_weights_the_sft_gradient(tmp_path, ptx_coef, token_logprobs_from_logits):
    # The gold reward of the demo tasks is 0 for a random model: scores, KL and V are all 0 at
    # step 1, so A = R = 0 and neither the policy nor the value loss has a gradient. The step's
    # only gradient is c_ptx·∇ L_SFT, L_SFT the per-token mean NLL of the ptx batch (both
    # examples): ‖∇‖ = c_ptx·‖∇ L_SFT‖, all by hand from the start model.
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in PTX))
    cfg = config(tmp_path, reward="gold", ptx_coef=ptx_coef, ptx_data=str(ptx))
    run_ppo(cfg)
    (row,) = read_metrics(cfg.output_dir)
    assert row["reward"] == 0.0 and row["reward/std"] == 0.0 and row["value_loss"] == 0.0

    model = tiny_causal_lm(seed=cfg.seed)
    tok = tiny_tokenizer()
    nll, count = 0.0, 0
    for prompt, completion in PTX:
        enc = encode_pair(tok, as_conversation(prompt), completion)
        labels = torch.tensor([enc.labels])
        nll = nll - token_logprobs_from_logits(model(input_ids=torch.tensor([enc.input_ids])).logits, labels).sum()
        count += int((labels != -100).sum())
    sft = nll / count
    sft.backward()
    grad = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    assert row["ptx_loss"] == pytest.approx(float(sft.detach()), abs=2e-5)
    assert row["grad_norm"] == pytest.approx(ptx_coef * grad, rel=1e-4)


# ============================================================================ setup_run + advantages (hand GAE)


def hand_rollout(**tensors) -> Rollout:
    """Two rows: 3 response tokens, and 2 tokens + 1 pad, behind a 3-token prompt."""
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    b = mask.shape[0]
    fields = dict(prompt_ids=torch.tensor([[40, 41, 42]] * b), prompt_mask=torch.ones(b, 3, dtype=torch.long),
                  response_ids=(torch.tensor([[70, 71, 72]] * b) * mask.long()), response_mask=mask,
                  scores=torch.zeros(b), source_scores={}, prompt_index=torch.arange(b), group_size=1,
                  finished=torch.ones(b, dtype=torch.bool), texts=("",) * b)
    fields.update(tensors)
    return Rollout(**fields)


# k1 = old − ref = [[0.5, −1.0, 2.0], [−0.5, 0.0, ·]]
GAE_ROLLOUT = dict(scores=torch.tensor([1.0, -0.5]),
                   old_logprobs=torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -1.0, 0.0]]),
                   ref_logprobs=torch.tensor([[-1.5, -1.0, -2.5], [-1.0, -1.0, 0.0]]),
                   values=torch.tensor([[0.3, -0.2, 0.1], [0.4, 0.2, 0.0]]))

# β = 0.2, clamp 1.5 (the 2.0 becomes 1.5), γ = 0.9, λ = 0.5 (γλ = 0.45):
#   kl   = [[0.5, −1.0, 1.5], [−0.5, 0.0]]      kl_penalty = mean_i Σ_t kl = (1.0 + (−0.5))/2 = 0.25
#   r    = −β·kl + score on the last token = [[−0.1, 0.2, −0.3 + 1.0 = 0.7], [0.1, 0.0 − 0.5 = −0.5]]
#   row 0: δ2 = 0.7 − 0.1 = 0.6                           A2 = 0.6
#          δ1 = 0.2 + 0.9·0.1 − (−0.2) = 0.49             A1 = 0.49 + 0.45·0.6 = 0.76
#          δ0 = −0.1 + 0.9·(−0.2) − 0.3 = −0.58           A0 = −0.58 + 0.45·0.76 = −0.238
#          R = A + V = [0.062, 0.56, 0.7]
#   row 1: δ1 = −0.5 − 0.2 = −0.7                         A1 = −0.7
#          δ0 = 0.1 + 0.9·0.2 − 0.4 = −0.12               A0 = −0.12 + 0.45·(−0.7) = −0.435
#          R = [−0.035, −0.5]
# Without the clamp (kl_clamp = 0): r02 = −0.4 + 1.0 = 0.6 → A = [−0.25825, 0.715, 0.5], R = [0.04175,
# 0.515, 0.6]; kl_penalty = (1.5 − 0.5)/2 = 0.5. Swapping γ and λ (γ = 0.5, λ = 0.9) keeps γλ but
# changes every δ: row 0 δ = [−0.1 − 0.1 − 0.3, 0.2 + 0.05 + 0.2, 0.6] = [−0.5, 0.45, 0.6],
# A2 = 0.6, A1 = 0.45 + 0.27 = 0.72, A0 = −0.5 + 0.324 = −0.176; row 1 δ = [0.1 + 0.1 − 0.4, −0.7]
# → A = [−0.2 − 0.315 = −0.515, −0.7].
GAE_CASES = {
    "clamped": (dict(gamma=0.9, lam=0.5, kl_coef=0.2, kl_clamp=1.5), 0.25,
                [[-0.238, 0.76, 0.6], [-0.435, -0.7, 0.0]], [[0.062, 0.56, 0.7], [-0.035, -0.5, 0.0]]),
    "no-clamp": (dict(gamma=0.9, lam=0.5, kl_coef=0.2, kl_clamp=0.0), 0.5,
                 [[-0.25825, 0.715, 0.5], [-0.435, -0.7, 0.0]], [[0.04175, 0.515, 0.6], [-0.035, -0.5, 0.0]]),
    "gamma-lam-swapped": (dict(gamma=0.5, lam=0.9, kl_coef=0.2, kl_clamp=1.5), 0.25,
                          [[-0.176, 0.72, 0.6], [-0.515, -0.7, 0.0]], [[0.124, 0.52, 0.7], [-0.115, -0.5, 0.0]]),
}


@pytest.mark.parametrize("case", sorted(GAE_CASES))
def test_kl_shaped_rewards_and_gae_by_hand(tmp_path, case):
    cfg_kw, kl_penalty, adv, ret = GAE_CASES[case]
    run = setup_run(config(tmp_path, whiten_advantages=False, **cfg_kw))
    out, metrics = advantages(run, hand_rollout(**GAE_ROLLOUT))
    torch.testing.assert_close(out.advantages, torch.tensor(adv), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.returns, torch.tensor(ret), atol=1e-6, rtol=0)
    assert metrics["kl_penalty"] == pytest.approx(kl_penalty, abs=1e-6)


def test_kl_estimator_and_whitening_by_hand(tmp_path):
    # k2 = ½(old − ref)² = [[0.125, 0.5, 2.0], [0.125, 0.0]], clamp 1.5 → 2.0 ↦ 1.5; β = 0.2,
    # γ = λ = 1 (R = reward-to-go, A = R − V):
    #   r = [[−0.025, −0.1, −0.3 + 1 = 0.7], [−0.025, 0 − 0.5 = −0.5]]
    #   R = [[0.575, 0.6, 0.7], [−0.525, −0.5]]   A = R − V = [[0.275, 0.8, 0.6], [−0.925, −0.7]]
    # whitened over the 5 counted tokens: mean μ = 0.05/5 = 0.01, deviations
    # [0.265, 0.79, 0.59, −0.935, −0.71], Σ dev² = 0.070225 + 0.6241 + 0.3481 + 0.874225 + 0.5041
    # = 2.42075, sample var = 2.42075/4 = 0.6051875, A_w = dev / √(0.6051875 + 1e-8).
    run = setup_run(config(tmp_path, gamma=1.0, lam=1.0, kl_coef=0.2, kl_clamp=1.5, kl_estimator="k2",
                           whiten_advantages=True))
    out, metrics = advantages(run, hand_rollout(**GAE_ROLLOUT))
    assert metrics["kl_penalty"] == pytest.approx((0.125 + 0.5 + 1.5 + 0.125) / 2, abs=1e-6)
    torch.testing.assert_close(out.returns, torch.tensor([[0.575, 0.6, 0.7], [-0.525, -0.5, 0.0]]),
                               atol=1e-6, rtol=0)
    dev = torch.tensor([[0.265, 0.79, 0.59], [-0.935, -0.71, 0.0]])
    torch.testing.assert_close(out.advantages, dev / math.sqrt(0.6051875 + 1e-8), atol=1e-5, rtol=0)


# ============================================================================ setup_run + update (clip ranges)


def update(run, rollout: Rollout, step: int) -> dict[str, float]:
    """The update of `ppo.train_step` (no ptx data here): the shared loop with PPO's loss."""
    assert not run.ptx
    metrics, _ = online.update(run, rollout, step, functools.partial(loss, run.cfg),
                               with_entropy=run.cfg.ent_coef > 0, with_values=True)
    return metrics


def clip_rollout() -> Rollout:
    """The rollout of the clip-range test below (rows of 1, 2, 3 tokens, every token clipped at ε = 0.3)."""
    mask = torch.tensor([[1.0, 0, 0], [1, 1, 0], [1, 1, 1]])
    b = 3
    return Rollout(prompt_ids=torch.tensor([[40, 41, 42]] * b), prompt_mask=torch.ones(b, 3, dtype=torch.long),
                   response_ids=torch.tensor([[70, 71, 72]] * b) * mask.long(), response_mask=mask,
                   scores=torch.zeros(b), source_scores={}, prompt_index=torch.arange(b), group_size=1,
                   finished=torch.ones(b, dtype=torch.bool), texts=("",) * b,
                   old_logprobs=torch.tensor([-30.0, 0.0, -30.0])[:, None] * mask,
                   ref_logprobs=torch.zeros(b, 3),
                   advantages=torch.tensor([2.0, -1.0, 0.5])[:, None] * mask,
                   values=torch.tensor([1.0, -0.1, 0.5])[:, None] * mask,
                   returns=torch.tensor([0.0, 0.4, -1.0])[:, None] * mask)


@pytest.mark.parametrize("eps_v,aggregation,expected_policy,expected_value", [
    (0.2, "token", -0.525, 0.5025),
    (0.4, "token", -0.525, 2.155 / 6),
    (0.2, "sequence", -0.85, 1.245 / 3),
])
def test_clip_ranges_value_weight_and_aggregation_on_a_hand_built_rollout(tmp_path, eps_v, aggregation,
                                                                         expected_policy, expected_value):
    # Rows of 1, 2, 3 tokens. Policy: per-row A = [2, −1, ½]; log π_old = −30 where A > 0 (ρ far
    # above 1 + ε) and 0 where A < 0 (ρ = π < 1 − ε): every token clipped, ε = 0.3:
    #   ℓ = [−2.6], [0.7, 0.7], [−0.65 ×3]
    #   token mean (−2.6 + 1.4 − 1.95)/6 = −0.525;  sequence mean (−2.6 + 0.7 − 0.65)/3 = −0.85
    # Critic: the fresh value head outputs V = 0 exactly. With old V = v0 and return R:
    #   row 0: v0 = 1,    R = 0:   V^clip = 1 − ε_v;  ½ max(0², (1 − ε_v)²)          clipped
    #   row 1: v0 = −0.1, R = 0.4: V^clip = 0 (|0 − v0| ≤ ε_v): ½·0.4² = 0.08       not clipped
    #   row 2: v0 = 0.5,  R = −1:  V^clip = 0.5 − ε_v;  ½ max(1², (1.5 − ε_v)²)       clipped
    #   ε_v = 0.2, token: (½·0.64 + 2·0.08 + 3·½·1.69)/6 = (0.32 + 0.16 + 2.535)/6 = 0.5025
    #   ε_v = 0.4, token: (½·0.36 + 0.16 + 3·½·1.21)/6 = (0.18 + 0.16 + 1.815)/6 = 2.155/6
    #   ε_v = 0.2, sequence: (0.32 + 0.08 + 0.845)/3 = 1.245/3
    #   vf_clipfrac = (1 + 0 + 3)/6 = 2/3 (a token share whatever the aggregation)
    # loss = policy_loss + c_v·value_loss, c_v = 0.7.
    rollout = clip_rollout()
    run = setup_run(config(tmp_path, clip_eps=0.3, cliprange_value=eps_v, vf_coef=0.7, aggregation=aggregation))
    metrics = update(run, rollout, 0)
    assert metrics["policy_loss"] == pytest.approx(expected_policy, abs=1e-5)
    assert metrics["clipfrac"] == 1.0
    assert metrics["value_loss"] == pytest.approx(expected_value, abs=1e-6)
    assert metrics["vf_clipfrac"] == pytest.approx(4 / 6, abs=1e-6)
    assert metrics["loss"] == pytest.approx(expected_policy + 0.7 * expected_value, abs=1e-5)


@pytest.mark.parametrize("cap,expected_policy", [(2.0, -7.1 / 6), (0.0, -0.525)], ids=["tis-cap-2", "tis-off"])
def test_sampler_logprobs_weight_the_policy_surrogate_not_the_value_loss(tmp_path, cap, expected_policy):
    # The clip-range case above (ε = 0.3, ε_v = 0.2, token mean: ℓ = [−2.6], [0.7, 0.7], [−0.65 ×3],
    # value loss 0.5025) with the tokens drawn by another engine μ: w = min(π_old/μ, C) = exp(old − μ)
    # per row: 1.5, 0.5, e^5 → C = 2. Weighted ℓ = [−3.9], [0.35, 0.35], [−1.3 ×3]:
    #   policy (−3.9 + 0.7 − 3.9)/6 = −7.1/6; the value loss stays 0.5025; cap 0: off, −0.525.
    rollout = clip_rollout()
    sampler = torch.tensor([-30.0 - math.log(1.5), math.log(2.0), -35.0])[:, None] * rollout.response_mask
    rollout = dataclasses.replace(rollout, sampler_logprobs=sampler)
    run = setup_run(config(tmp_path, clip_eps=0.3, cliprange_value=0.2, vf_coef=0.7, sampler_is_cap=cap))
    metrics = update(run, rollout, 0)
    assert metrics["policy_loss"] == pytest.approx(expected_policy, abs=1e-5)
    assert metrics["value_loss"] == pytest.approx(0.5025, abs=1e-6)
    assert metrics["loss"] == pytest.approx(expected_policy + 0.7 * 0.5025, abs=1e-5)
    if cap:
        assert metrics["sampler/is_weight_mean"] == pytest.approx(8.5 / 6, abs=1e-5)
        assert metrics["sampler/is_capped_frac"] == pytest.approx(0.5)
    else:
        assert "sampler/is_weight_mean" not in metrics
