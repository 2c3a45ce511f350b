"""PPO with a value head, as InstructGPT trains it, top to bottom.

1. take the step's prompts (a pure function of seed and step);
2. rollout: sample, score, old log-probs and values V(s_t) from the policy/critic, reference
   log-probs from π_ref (`rlhfkit.rollout.rollout`);
3. rewards: a KL penalty on every response token, clamped, and the score at the last real
   token (`kl_penalized_rewards`), with β from a fixed or adaptive controller;
4. advantages and value targets by GAE(γ, λ) over the response tokens, advantages whitened;
5. update: `inner_epochs` passes of `minibatches` optimizer steps on
       L = L_clip(π) + c_v · L_V^clip + (−c_H · H) + c_ptx · L_SFT(ptx batch)
   (`ppo_policy_loss`, `value_loss`, `entropy_bonus`, `sft_loss`);
6. adapt β toward the target KL; log; checkpoint the critic, β and the reward normalization
   with the model.

The rollout, the micro-batched update and the step loop are the shared online loop
(`rlhfkit.recipes.online`); this file holds what PPO adds: the KL-shaped rewards, GAE, the
critic, the loss and β.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from dataclasses import dataclass

from torch import Tensor

from rlhfkit.config import check, param
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.packing import collate_padded
from rlhfkit.data.readers import read_sft
from rlhfkit.data.tokenize import Encoded
from rlhfkit.losses.policy import aggregate, entropy_bonus, explained_variance, ppo_policy_loss, value_loss
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.value import CRITICS, save_value_model
from rlhfkit.ops.advantages import kl_penalized_rewards
from rlhfkit.ops.gae import gae
from rlhfkit.ops.stats import masked_mean, masked_whiten
from rlhfkit.recipes import online
from rlhfkit.recipes.online import OnlineConfig, OnlineRun, load_inputs, mean_across, sampler_weighted, start_run
from rlhfkit.recipes.sft import encode_examples
from rlhfkit.rollout.process_rewards import process_token_rewards
from rlhfkit.rollout.reward_spec import parse_reward_spec
from rlhfkit.rollout.rollout import ResponseOutputs, Rollout, pack_left, rollout_metrics, unpack_left
from rlhfkit.train.distributed import full_state_dict
from rlhfkit.train.kl_control import AdaptiveKLController, FixedKLController
from rlhfkit.train.loop import MicroBatchStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    kind = "ppo"
    samples_per_prompt: int = param(1, "responses sampled per prompt", old_names=("group_size",))
    inner_epochs: int = param(4, "PPO epochs over each rollout batch")
    minibatches: int = param(2, "optimizer steps per epoch over the rollout batch")
    kl_coef: float = param(0.05, "β: initial weight of the per-token KL penalty in the reward")
    kl_clamp: float = param(10.0, "clamp of each token's KL estimate in the reward (0 = no clamp)")
    target_kl: float = param(0.0, "adaptive β: KL per response to aim for, in nats (0 = fixed β)")
    kl_horizon: int = param(10000, "adaptive β: responses over which one full correction is spread")
    gamma: float = param(1.0, "discount γ over response tokens")
    lam: float = param(0.95, "GAE λ")
    whiten_advantages: bool = param(True, "whiten the advantages of each rollout batch")
    vf_coef: float = param(0.1, "c_v: weight of the value loss")
    cliprange_value: float = param(0.2, "value clip: V may move at most this far from its rollout estimate")
    ent_coef: float = param(0.0, "c_H: weight of the entropy bonus")
    critic: str = param("shared", "value head on the policy backbone (shared) or a separate critic",
                        choices=CRITICS[1:])
    ptx_coef: float = param(0.0, "c_ptx: weight of the SFT loss on ptx_data (PPO-ptx; 0 = off)")
    ptx_data: str = param("", "SFT examples mixed into every update (.jsonl/.parquet/folder)")
    output_dir: str = param("runs/ppo", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")

    def validate(self) -> None:
        super().validate()
        check(self.kl_clamp >= 0, "kl_clamp must be ≥ 0")
        check(self.target_kl >= 0, "target_kl must be ≥ 0")
        check(self.kl_horizon >= 1, "kl_horizon must be ≥ 1")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma and lam must be in [0, 1]")
        check(self.vf_coef >= 0 and self.ent_coef >= 0 and self.ptx_coef >= 0,
              "vf_coef, ent_coef and ptx_coef must be ≥ 0")
        check(self.cliprange_value > 0, "cliprange_value must be > 0")
        check(self.ptx_coef == 0 or bool(self.ptx_data), "ptx_coef > 0 needs ptx_data (SFT examples)")
        check(self.target_kl == 0 or self.kl_coef > 0, "an adaptive β (target_kl > 0) needs kl_coef > 0 to start")
        check(not (self.reward_normalize and any(t.source == "prm" for t in parse_reward_spec(self.reward))),
              "a prm: reward term gives PPO dense per-step rewards, which reward_normalize cannot rescale")

    @property
    def resolved_kl_estimator(self) -> str:
        return "k1" if self.kl_estimator == "auto" else self.kl_estimator


# ============================================================================ the run
@dataclass
class PPORun(OnlineRun):
    """The shared run, plus the KL controller (checkpointed with the critic) and the ptx data."""

    kl_controller: FixedKLController | AdaptiveKLController
    ptx: list[Encoded]

    def state(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict(), **super().state(),
                "critic": self.policy.value_state_dict()}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        if "critic" in state:
            self.policy.load_value_state_dict(state["critic"])


def _ptx_examples(cfg: PPOConfig, tokenizer) -> list[Encoded]:
    if cfg.ptx_coef == 0:
        return []
    skipped = SkipReport()
    # KTO records labelled undesirable are left out (and counted), as in SFT.
    examples = encode_examples(tokenizer, read_sft(cfg.ptx_data, skipped=skipped), cfg.max_length, skipped,
                               cfg.ptx_data)
    if skipped.total:
        log.warning("ptx data: %s", skipped.summary())
    if not examples:
        raise DataError(f"no usable ptx examples: {skipped.summary()}", path=cfg.ptx_data)
    return examples


def setup_run(cfg: PPOConfig) -> PPORun:
    tokenizer, prompts, reward = load_inputs(cfg)
    controller = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl > 0
                  else FixedKLController(cfg.kl_coef))
    return start_run(cfg, PPORun, tokenizer=tokenizer, prompts=prompts, reward=reward, critic=cfg.critic,
                     description="ppo", kl_controller=controller, ptx=_ptx_examples(cfg, tokenizer))


# ============================================================================ one step
def advantages(run: PPORun, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
    """Steps 3–4: per-token rewards with the KL penalty, GAE, whitening. They run over the
    model's tokens packed to the left (`pack_left`; the identity for a single-turn rollout), so
    in a multi-turn episode V bootstraps across a tool's output to the next model token."""
    cfg = run.cfg
    mask = rollout.response_mask
    packed = functools.partial(pack_left, mask=mask)
    # A prm: term's share of the score moves to the tokens that end each step (docs/RL-ALGORITHMS.md).
    scores, dense = process_token_rewards(run.reward, run.tokenizer, rollout.texts, rollout.response_ids, mask,
                                          rollout.scores)
    rewards, kl = kl_penalized_rewards(scores, packed(rollout.old_logprobs), packed(rollout.ref_logprobs),
                                       packed(mask), kl_coef=run.kl_controller.value, kl_clamp=cfg.kl_clamp or None,
                                       estimator=cfg.resolved_kl_estimator)
    if dense is not None:
        rewards = rewards + packed(dense.to(rewards.dtype))
    adv, returns = gae(rewards, packed(rollout.values), packed(mask), gamma=cfg.gamma, lam=cfg.lam)
    adv, returns, kl = (unpack_left(x, mask) for x in (adv, returns, kl))
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    metrics = {
        "kl_penalty": float((kl * mask).sum(-1).mean()),      # what the reward was charged, per response
        "returns/mean": float(masked_mean(returns, mask)),
        "values/mean": float(masked_mean(rollout.values, mask)),
        "explained_variance": float(explained_variance(rollout.values, returns, mask)),
    }
    return dataclasses.replace(rollout, advantages=adv, returns=returns), metrics


def loss(cfg: PPOConfig, part: Rollout, out: ResponseOutputs) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 5's loss on one micro-batch, per token: ℓ = w · ℓ_clip(π) + c_v · ℓ_V^clip − c_H · H, where
    w = min(π_old/μ, C) when the tokens came from a server's sampler μ (`sampler_weighted`), else 1."""
    mask = part.response_mask
    policy, metrics = ppo_policy_loss(out.logprobs, part.old_logprobs, part.advantages, mask, clip_eps=cfg.clip_eps)
    policy = sampler_weighted(policy, part, cfg.sampler_is_cap, metrics)  # the value loss stays unweighted
    value, value_metrics = value_loss(out.values, part.values, part.returns, mask, clip_eps=cfg.cliprange_value)
    per_token = policy + cfg.vf_coef * value
    metrics.update(policy_loss=aggregate(policy.detach(), mask, cfg.aggregation),
                   value_loss=aggregate(value.detach(), mask, cfg.aggregation),
                   vf_clipfrac=value_metrics["vf_clipfrac"])
    if cfg.ent_coef > 0:
        bonus, entropy_metrics = entropy_bonus(out.entropy, mask, coef=cfg.ent_coef)
        per_token = per_token + bonus
        metrics["entropy_update"] = entropy_metrics["entropy"]
    return per_token, metrics


def ptx_update(run: PPORun, stream: MicroBatchStream, update_index: int) -> dict[str, float]:
    """PPO-ptx: c_ptx · the SFT loss on fresh examples, added to the update's gradient, so the
    policy keeps what SFT taught it."""
    engine = run.engine
    batch = collate_padded([run.ptx[j] for j in stream[update_index * engine.world_size + engine.rank]],
                           run.pad_id).to(engine.device)
    with engine.accumulate(last=True), engine.autocast():
        out = run.module(batch, temperature=1.0)
        ptx_loss, _ = sft_loss(out.logprobs, batch.weighted_loss_mask)  # per-example `weight`s: a weighted mean
    # × 0 keeps the critic in this last backward: DDP syncs only parameters it reaches.
    engine.backward(run.cfg.ptx_coef * ptx_loss + 0.0 * out.values.sum())
    return {"ptx_loss": float(ptx_loss.detach())}


def train_step(run: PPORun, step: int) -> tuple[dict[str, float], int]:
    """One rollout step (steps 1–6 of the module docstring); returns (metrics, tokens)."""
    cfg = run.cfg
    t0 = time.perf_counter()
    rollout = online.collect(run, step, with_values=True)
    rollout, adv_metrics = advantages(run, rollout)
    t1 = time.perf_counter()
    metrics = {**rollout_metrics(rollout), **adv_metrics, "kl_coef": run.kl_controller.value}
    ptx = None
    if run.ptx:
        stream = MicroBatchStream([len(e) for e in run.ptx], cfg.batch_size, cfg.seed, group_by_length=False)
        ptx = functools.partial(ptx_update, run, stream)
    update_metrics, _ = online.update(run, rollout, step, functools.partial(loss, cfg), with_entropy=cfg.ent_coef > 0,
                                      with_values=True, after_minibatch=ptx)
    metrics.update(update_metrics)
    # Step 6: β follows the KL the reward was charged per response (the mean over all processes,
    # so every process keeps the same β), over this step's responses.
    kl_per_response = mean_across(run.engine, {"kl": metrics["kl_penalty"]})["kl"]
    run.kl_controller.update(kl_per_response, rollout.num_rows * run.engine.world_size)
    metrics.update({"time/rollout_s": t1 - t0, "time/update_s": time.perf_counter() - t1})
    return mean_across(run.engine, metrics), rollout.num_tokens


# ============================================================================ the recipe
def run_ppo(cfg: PPOConfig) -> dict:
    """Train; returns {"final": path, "metrics": last step's metrics}. The critic is saved
    next to the final policy as value_head.safetensors."""
    run = setup_run(cfg)
    final, metrics = online.train(run, lambda step: train_step(run, step))
    critic = None
    if run.engine.sharded:  # collective: every process gathers, the main one keeps the full weights
        names = set(run.policy.value_state_dict())
        critic = {k: v for k, v in full_state_dict(run.module).items() if k in names}
    if run.engine.is_main:
        save_value_model(run.policy, final, critic)
    return {"final": str(final), "metrics": metrics}
