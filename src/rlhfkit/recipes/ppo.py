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
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import check, param
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.packing import collate_padded
from rlhfkit.data.tokenize import Encoded
from rlhfkit.losses.policy import entropy_bonus, explained_variance, ppo_policy_loss, value_loss
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.loading import LoraSettings, load_model, load_tokenizer
from rlhfkit.models.value import CRITICS, PolicyValueModel, save_value_model
from rlhfkit.ops.advantages import kl_penalized_rewards
from rlhfkit.ops.gae import gae
from rlhfkit.ops.stats import masked_mean, masked_whiten
from rlhfkit.rollout.generate import PolicySampler
from rlhfkit.rollout.rewards import WeightedRewards
from rlhfkit.rollout.rollout import (
    OnlineConfig,
    ReferencePolicy,
    RLPrompt,
    Rollout,
    build_reward,
    build_rollout,
    load_prompts,
    logprob_temperature,
    loss_units,
    mean_across,
    micro_batches,
    minibatch_rows,
    pad_token_id,
    policy_outputs,
    prompts_for_step,
    rollout_metrics,
    schedule_per_rollout,
    step_seed,
)
from rlhfkit.train.engine import Engine, set_training_attention
from rlhfkit.train.kl_control import AdaptiveKLController, FixedKLController
from rlhfkit.train.loop import MicroBatchStream

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PPOConfig(OnlineConfig):
    kind = "ppo"
    group_size: int = param(1, "responses sampled per prompt")
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

    @property
    def resolved_kl_estimator(self) -> str:
        return "k1" if self.kl_estimator == "auto" else self.kl_estimator


# ============================================================================ the run's pieces
@dataclass
class PPORun:
    cfg: PPOConfig
    engine: Engine
    module: torch.nn.Module            # as prepared by the engine
    policy: PolicyValueModel           # unwrapped
    reference: ReferencePolicy
    tokenizer: object
    prompts: list[RLPrompt]
    reward: WeightedRewards
    kl_controller: FixedKLController | AdaptiveKLController
    ptx: list[Encoded]
    sampler: PolicySampler

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def state(self) -> dict:
        return {"kl_controller": self.kl_controller.state_dict(), "reward": self.reward.state_dict(),
                "critic": self.policy.value_state_dict()}

    def load_state(self, state: dict) -> None:
        if "kl_controller" in state:
            self.kl_controller.load_state_dict(state["kl_controller"])
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])
        if "critic" in state:
            self.policy.load_value_state_dict(state["critic"])


def _ptx_examples(cfg: PPOConfig, tokenizer) -> list[Encoded]:
    if cfg.ptx_coef == 0:
        return []
    from rlhfkit.data.readers import read_sft
    from rlhfkit.recipes.sft import encode_examples

    skipped = SkipReport()
    examples = encode_examples(tokenizer, read_sft(cfg.ptx_data), cfg.max_length, skipped, cfg.ptx_data)
    if skipped.total:
        log.warning("ptx data: %s", skipped.summary())
    if not examples:
        raise DataError(f"no usable ptx examples: {skipped.summary()}", path=cfg.ptx_data)
    return examples


def setup_run(cfg: PPOConfig) -> PPORun:
    tokenizer = load_tokenizer(cfg.model)
    prompts = load_prompts(cfg, tokenizer)
    reward = build_reward(cfg.reward, normalize=cfg.reward_normalize)
    ptx = _ptx_examples(cfg, tokenizer)
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None
    model = load_model(cfg.model, lora=lora, seed=cfg.seed)
    engine = Engine(cfg, Path(cfg.output_dir), description="ppo")
    set_training_attention(model, cfg, engine.device)  # the reference copy gets the policy's kernel
    reference = ReferencePolicy(model, engine.device)  # before engine.setup can load trained weights into `model`
    module = engine.setup(PolicyValueModel(model, critic=cfg.critic, chunk_size=cfg.logprob_chunk), tokenizer)
    schedule_per_rollout(engine, cfg.updates_per_step)
    controller = (AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.target_kl > 0
                  else FixedKLController(cfg.kl_coef))
    policy = engine.unwrapped()
    run = PPORun(cfg, engine, module, policy, reference, tokenizer, prompts, reward, controller, ptx,
                 PolicySampler(policy.model, engine.compute_dtype))
    run.load_state(engine.extra_state)
    return run


# ============================================================================ one step
def collect(run: PPORun, step: int) -> Rollout:
    """Steps 1–2: the rollout, with the critic's values."""
    cfg = run.cfg
    prompts = prompts_for_step(run.prompts, cfg.prompts_per_step, seed=cfg.seed, step=step,
                               rank=run.engine.rank, world_size=run.engine.world_size)
    with run.engine.autocast():
        return build_rollout(run.policy, run.reference, run.tokenizer, prompts, run.reward,
                             cfg.sampling(step_seed(cfg.seed, step)), micro_batch_size=cfg.batch_size,
                             with_values=True, chunk_size=cfg.logprob_chunk, sampler=run.sampler)


def advantages(run: PPORun, rollout: Rollout) -> tuple[Rollout, dict[str, float]]:
    """Steps 3–4: per-token rewards with the KL penalty, GAE, whitening."""
    cfg = run.cfg
    mask = rollout.response_mask
    rewards, kl = kl_penalized_rewards(rollout.scores, rollout.old_logprobs, rollout.ref_logprobs, mask,
                                       kl_coef=run.kl_controller.value, kl_clamp=cfg.kl_clamp or None,
                                       estimator=cfg.resolved_kl_estimator)
    adv, returns = gae(rewards, rollout.values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    metrics = {
        "kl_penalty": float((kl * mask).sum(-1).mean()),      # what the reward was charged, per response
        "returns/mean": float(masked_mean(returns, mask)),
        "values/mean": float(masked_mean(rollout.values, mask)),
        "explained_variance": float(explained_variance(rollout.values, returns, mask)),
    }
    return dataclasses.replace(rollout, advantages=adv, returns=returns), metrics


def update(run: PPORun, rollout: Rollout, step: int) -> dict[str, float]:
    """Step 5: inner_epochs × minibatches optimizer steps; metrics averaged over them."""
    cfg, engine = run.cfg, run.engine
    temperature = logprob_temperature(cfg.sampling(0))
    ptx_stream = (MicroBatchStream([len(e) for e in run.ptx], cfg.batch_size, cfg.seed, group_by_length=False)
                  if run.ptx else None)
    sums: dict[str, float] = {}
    grad_norms = []
    run.module.train()
    for epoch in range(cfg.inner_epochs):
        for k, rows in enumerate(minibatch_rows(rollout.num_rows, cfg, step=step, epoch=epoch)):
            parts = [rollout.select(g) for g in micro_batches(rollout, rows, cfg.batch_size)]
            local_units = sum(loss_units(p, cfg.aggregation) for p in parts)
            global_units = engine.sum_across(local_units)
            for i, part in enumerate(parts):
                share = loss_units(part, cfg.aggregation) * engine.world_size / global_units
                last = i == len(parts) - 1 and ptx_stream is None
                with engine.accumulate(last=last), engine.autocast():
                    out = policy_outputs(run.module, part, run.pad_id, temperature=temperature,
                                         with_entropy=cfg.ent_coef > 0, with_values=True)
                    mask = part.response_mask
                    policy_loss, pm = ppo_policy_loss(out.logprobs, part.old_logprobs, part.advantages, mask,
                                                      clip_eps=cfg.clip_eps, aggregation=cfg.aggregation)
                    v_loss, vm = value_loss(out.values, part.values, part.returns, mask,
                                            clip_eps=cfg.cliprange_value, aggregation=cfg.aggregation)
                    loss = policy_loss + cfg.vf_coef * v_loss
                    metrics = {**pm, "value_loss": vm["value_loss"], "vf_clipfrac": vm["vf_clipfrac"]}
                    if cfg.ent_coef > 0:
                        ent_loss, em = entropy_bonus(out.entropy, mask, cfg.ent_coef, aggregation=cfg.aggregation)
                        loss = loss + ent_loss
                        metrics["entropy_update"] = em["entropy"]
                engine.backward(loss * share)
                weight = loss_units(part, cfg.aggregation) / local_units
                for key, v in {"loss": loss, **metrics}.items():
                    sums[key] = sums.get(key, 0.0) + float(v.detach()) * weight
            if ptx_stream is not None:
                # PPO-ptx: the SFT loss on fresh examples, so the policy keeps what SFT taught it.
                update_index = step * cfg.updates_per_step + epoch * cfg.minibatches + k
                batch = collate_padded([run.ptx[j] for j in ptx_stream[update_index * engine.world_size
                                                                         + engine.rank]],
                                       run.pad_id).to(engine.device)
                with engine.accumulate(last=True), engine.autocast():
                    ptx_out = run.module(batch, temperature=1.0)
                    ptx_loss, _ = sft_loss(ptx_out.logprobs, batch.loss_mask)
                # × 0 keeps the critic in this last backward: DDP syncs only parameters it reaches.
                engine.backward(cfg.ptx_coef * ptx_loss + 0.0 * ptx_out.values.sum())
                sums["ptx_loss"] = sums.get("ptx_loss", 0.0) + float(ptx_loss.detach())
            grad_norms.append(engine.optimizer_step())
    out = {k: v / cfg.updates_per_step for k, v in sums.items()}
    out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    return out


def train_step(run: PPORun, step: int) -> tuple[dict[str, float], int]:
    """One rollout step (steps 1–6 of the module docstring); returns (metrics, tokens)."""
    t0 = time.perf_counter()
    rollout = collect(run, step)
    rollout, adv_metrics = advantages(run, rollout)
    t1 = time.perf_counter()
    metrics = {**rollout_metrics(rollout), **adv_metrics, "kl_coef": run.kl_controller.value}
    metrics.update(update(run, rollout, step))
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
    engine = run.engine
    metrics: dict[str, float] = {}
    with engine.interruptible():
        for step in range(engine.start_step, cfg.max_steps):
            metrics, tokens = train_step(run, step)
            engine.end_step(step + 1, metrics, tokens=tokens, extra_state=run.state())
    final = engine.finish()
    if engine.is_main:
        save_value_model(run.policy, final)
    return {"final": str(final), "metrics": metrics}
