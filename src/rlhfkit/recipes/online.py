"""What every online recipe shares, written once: the config, the run (policy, frozen
reference, engine, sampler), collecting a rollout, the micro-batched update, and the step
loop with checkpoint, resume and logging.

    start_run ─▶ for each step:  collect ─▶ advantages ─▶ update(loss) ─▶ log, checkpoint
                                            └── the algorithm's ──┘

An algorithm's file (`policy_gradient.py`, `ppo.py`) keeps only what differs: how it turns
scores into advantages, its per-token loss, its critic, and the state it carries across steps.

A step is one rollout: `prompts_per_step × samples_per_prompt` sampled responses, then
`inner_epochs × minibatches` optimizer updates on them. Everything random in a step is a
pure function of (seed, step) — its prompts, its sampling seed, its minibatch order — so a
resumed run repeats exactly what the uninterrupted run did, with no RNG state to carry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from rlhfkit.config import check, param
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.judge.reward import JUDGE_REWARD_BUILDERS
from rlhfkit.losses.policy import AGGREGATIONS, aggregate, loss_units, truncated_importance_weights
from rlhfkit.models.loading import LoraSettings, load_model, load_tokenizer
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.models.value import PolicyValueModel
from rlhfkit.ops.kl import KL_ESTIMATORS
from rlhfkit.rollout.environments import ENVIRONMENTS, EnvConfig
from rlhfkit.rollout.episodes import EpisodeConfig, build_episode_rollout
from rlhfkit.rollout.generate import PolicySampler, SamplingConfig
from rlhfkit.rollout.prompts import DEMO_FAMILIES, RLPrompt, named_prompts, prompts_that_fit
from rlhfkit.rollout.remote import RemoteSampler, connect
from rlhfkit.rollout.reward_spec import build_reward, parse_reward_spec
from rlhfkit.rollout.rewards import WeightedRewards
from rlhfkit.rollout.rollout import (
    ResponseOutputs,
    Rollout,
    build_rollout,
    logprob_temperature,
    micro_batches,
    policy_outputs,
    put_rows,
)
from rlhfkit.train.distributed import full_parameters
from rlhfkit.train.engine import SCHEDULES, Engine, TrainConfig, set_training_attention


# ============================================================================ config
@dataclass(frozen=True)
class OnlineConfig(TrainConfig):
    """Fields every online recipe shares: prompts, reward, sampling, KL, update schedule.

    Steps count rollouts: each step samples `prompts_per_step × samples_per_prompt` responses,
    then runs `inner_epochs × minibatches` optimizer updates on them (the lr schedule and
    warmup count rollouts too). `batch_size` is the micro-batch of sequences per forward.
    """

    prompts: str = param("", "prompts: JSONL with 'prompt' and optional 'answer', 'task_id', 'tests'")
    tasks: str = param("", "'demo' to train on the demo tasks instead of a prompts file", choices=("", "demo"))
    demo_per_family: int = param(64, "demo tasks per family (with --tasks demo)")
    demo_families: tuple[str, ...] = param(DEMO_FAMILIES, "demo task families to use (with --tasks demo)")
    reward: str = param("gold", "reward spec, terms NAME[:ARG][:WEIGHT] joined by commas: gold | exact | code | "
                                "format:REGEX | length[:MIN-MAX] | rm:PATH[@mean|@min|@mean-Kstd] | "
                                "classifier:PATH[:LABEL] | judge[:JUDGE] | judge-ref[:JUDGE] (JUDGE: embedded, "
                                "tiny, local:PATH or URL#MODEL); e.g. 'gold:1.0,length:0.1' or "
                                "'exact,classifier:models/tox:toxic:-0.5' (see docs/RL-ALGORITHMS.md, Rewards)")
    reward_normalize: bool = param(False, "normalize each reward source by its running mean/std before weighting")
    prompts_per_step: int = param(8, "prompts per rollout step")
    samples_per_prompt: int = param(4, "responses sampled per prompt", old_names=("group_size",))
    max_new_tokens: int = param(64, "longest response in tokens")
    temperature: float = param(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = param(1.0, "nucleus sampling threshold")
    top_k: int = param(0, "sample from the k most likely tokens (0 = off)")
    gen_batch_size: int = param(64, "sequences decoded together (requests in flight with --generation-server)")
    generation_server: str = param("", "sample from this vLLM or `transformers serve` URL (e.g. "
                                       "http://localhost:8000) instead of in-process; docs/SCALING.md")
    sync_every: int = param(1, "with --generation-server: hand the weights to the server every N rollouts")
    sampler_is_cap: float = param(2.0, "with a sampler that reports its log-probs μ (a vLLM server): weight each "
                                       "token's policy surrogate (policy-gradient recipes, PPO) by min(π_old/μ, C), "
                                       "C = this (truncated importance sampling; 0 = off; online DPO's pair loss "
                                       "is not weighted)")
    kl_coef: float = param(0.05, "β: weight of the KL to the reference")
    kl_estimator: str = param("auto", "per-token KL estimator (auto: k3 in the loss, k1 in the reward)",
                              choices=("auto", *KL_ESTIMATORS))
    clip_eps: float = param(0.2, "PPO-style ratio clip ε")
    inner_epochs: int = param(1, "passes over each rollout batch (1 = on-policy, ratio ≡ 1)")
    minibatches: int = param(1, "optimizer steps per pass over the rollout batch")
    aggregation: str = param("token", "how per-token losses become one number", choices=tuple(AGGREGATIONS))
    schedule: str = param("constant", "learning-rate schedule after warmup", choices=SCHEDULES)
    lr: float = param(1e-6, "peak learning rate (AdamW)")
    env: str = param("", "multi-turn environment with tools: python (code run in the sandbox) or calculator "
                         "(<calc>/<lookup> tools); empty = single-turn. The reward is the demo task's checker, "
                         "the loss counts model tokens only (docs/RL-ALGORITHMS.md, Environments)",
                     choices=("", *ENVIRONMENTS))
    max_turns: int = param(3, "with env: model turns per episode (each ≤ max_new_tokens tokens)")
    tool_timeout: float = param(5.0, "with env: seconds one tool call may run (the Python tool's sandbox limit)")
    step_timeout: float = param(30.0, "with env: seconds one environment step may take before its episode "
                                      "ends with reward 0 (counted in episode/timeouts)")

    def validate(self) -> None:
        super().validate()
        check(bool(self.prompts) != bool(self.tasks), "give exactly one of prompts (a JSONL file) or tasks=demo")
        check(self.demo_per_family >= 1, "demo_per_family must be ≥ 1")
        check(self.prompts_per_step >= 1, "prompts_per_step must be ≥ 1")
        check(self.samples_per_prompt >= 1, "samples_per_prompt must be ≥ 1")
        check(self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1")
        check(self.max_new_tokens < self.max_length, "max_new_tokens must be < max_length (room for the prompt)")
        check(self.temperature > 0, "temperature must be > 0 for sampling")
        check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        check(self.top_k >= 0, "top_k must be ≥ 0")
        check(self.gen_batch_size >= 1, "gen_batch_size must be ≥ 1")
        check(self.generation_server == "" or self.generation_server.startswith(("http://", "https://")),
              "generation_server must be an http:// or https:// URL")
        check(self.sync_every >= 1, "sync_every must be ≥ 1")
        check(self.sampler_is_cap == 0 or self.sampler_is_cap >= 1,
              "sampler_is_cap must be 0 (off) or ≥ 1 (a cap below 1 would shrink every on-policy token)")
        check(self.kl_coef >= 0, "kl_coef must be ≥ 0")
        check(0 < self.clip_eps < 1, "clip_eps must be in (0, 1)")
        check(self.inner_epochs >= 1, "inner_epochs must be ≥ 1")
        check(self.minibatches >= 1, "minibatches must be ≥ 1")
        check((self.prompts_per_step * self.samples_per_prompt) % self.minibatches == 0,
              "prompts_per_step × samples_per_prompt must be a multiple of minibatches")
        check(self.grad_accum == 1, "grad_accum is not used by online recipes (micro-batches come from "
                                    "batch_size); leave it at 1")
        parse_reward_spec(self.reward)  # a bad spec fails now, not after the model has loaded
        check(not self.env or (self.tasks == "demo" and self.reward == "gold"),
              "env episodes are scored by the demo task's checker: use tasks=demo and reward=gold with env")
        check(not (self.env and self.generation_server), "env episodes decode in process: drop generation_server")
        check(self.max_turns >= 1, "max_turns must be ≥ 1")
        check(self.tool_timeout > 0 and self.step_timeout > 0, "tool_timeout and step_timeout must be > 0")

    @property
    def updates_per_step(self) -> int:
        return self.inner_epochs * self.minibatches

    def episodes(self) -> EpisodeConfig | None:
        """How multi-turn episodes run (None: single-turn)."""
        if not self.env:
            return None
        return EpisodeConfig(self.env, EnvConfig(max_turns=self.max_turns, tool_timeout_s=self.tool_timeout),
                             step_timeout_s=self.step_timeout, max_length=self.max_length)

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, n=self.samples_per_prompt, batch_size=self.gen_batch_size,
                              seed=seed)


# ============================================================================ what a step samples
def step_seed(seed: int, step: int, purpose: str = "sample") -> int:
    """A sampling seed that is a pure function of (run seed, step): a resumed run samples
    exactly what the uninterrupted run sampled, with no RNG state to carry."""
    digest = hashlib.sha256(f"{seed}/{step}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def prompt_indices(num_prompts: int, per_step: int, *, seed: int, step: int) -> list[int]:
    """Indices of the prompts of `step`: consecutive slices of a stream of per-epoch shuffles,
    a pure function of (seed, step)."""
    if num_prompts < 1:
        raise ValueError("no prompts to sample from")
    out = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(position, num_prompts)
        order = list(range(num_prompts))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.append(order[i])
    return out


def prompts_for_step(prompts: Sequence[RLPrompt], per_step: int, *, seed: int, step: int, rank: int = 0,
                     world_size: int = 1) -> list[RLPrompt]:
    """This process's prompts of `step`: each of `world_size` processes gets `per_step`."""
    idx = prompt_indices(len(prompts), per_step * world_size, seed=seed, step=step)
    return [prompts[i] for i in idx[rank::world_size]]


def minibatch_rows(num_rows: int, cfg: OnlineConfig, *, step: int, epoch: int) -> list[Tensor]:
    """Row indices of each minibatch of one pass: shuffled per (seed, step, epoch) when there
    is more than one update per rollout, in order otherwise."""
    if cfg.updates_per_step > 1:
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, f"epoch-{epoch}"))
        order = torch.randperm(num_rows, generator=gen)
    else:
        order = torch.arange(num_rows)
    size = num_rows // cfg.minibatches
    return [order[k * size:(k + 1) * size] for k in range(cfg.minibatches)]


# ============================================================================ the run
@dataclass
class OnlineRun:
    """What the steps of an online run share. An algorithm's run adds the state it carries
    across steps and extends `state` / `load_state` to checkpoint it with the model."""

    cfg: OnlineConfig
    engine: Engine
    module: nn.Module                # as prepared by the engine (DDP-wrapped when distributed)
    policy: PolicyValueModel         # the same module, unwrapped
    reference: ReferencePolicy
    tokenizer: Any
    prompts: list[RLPrompt]
    reward: WeightedRewards          # carries running moments across steps when normalized
    sampler: PolicySampler | RemoteSampler

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def state(self) -> dict[str, Any]:
        return {"reward": self.reward.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        if "reward" in state:
            self.reward.load_state_dict(state["reward"])


Run = TypeVar("Run", bound=OnlineRun)


def load_inputs(cfg: OnlineConfig) -> tuple[Any, list[RLPrompt], WeightedRewards]:
    """(tokenizer, prompts, reward) of a run; prompts too long to leave room for a response
    are skipped and counted."""
    tokenizer = load_tokenizer(cfg.model)
    prompts = named_prompts(cfg.prompts, cfg.tasks, split="train", per_family=cfg.demo_per_family, seed=cfg.seed,
                            families=cfg.demo_families)
    prompts = prompts_that_fit(prompts, tokenizer, room=cfg.max_length - cfg.max_new_tokens, source=cfg.prompts)
    return tokenizer, prompts, build_reward(cfg.reward, normalize=cfg.reward_normalize, builders=JUDGE_REWARD_BUILDERS)


def start_run(cfg: OnlineConfig, run_type: type[Run], *, tokenizer, prompts: list[RLPrompt],
              reward: WeightedRewards, critic: str, description: str, **algorithm_state: Any) -> Run:
    """The policy (with a `critic`: "none", "shared" or "separate"), its frozen reference, the
    engine (resumed from the run folder's latest checkpoint) and the sampler, as a `run_type`
    with the algorithm's own fields `algorithm_state`, restored from that checkpoint too."""
    lora = LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None
    model = load_model(cfg.model, lora=lora, seed=cfg.seed)
    engine = Engine(cfg, Path(cfg.output_dir), updates_per_step=cfg.updates_per_step, description=description)
    set_training_attention(model, cfg, engine.device)  # the reference copy gets the policy's kernel
    reference = ReferencePolicy(model, engine.device)  # before engine.setup can load trained weights into `model`
    sampler: PolicySampler | RemoteSampler | None = None
    if not cfg.generation_server:
        # Its own copy (bf16 runs) before setup: FSDP refuses to copy a sharded model. Synced before each rollout.
        sampler = PolicySampler(model, engine.compute_dtype)
        if sampler.model is not model:
            sampler.model.to(engine.device)
    module = engine.setup(PolicyValueModel(model, critic=critic, chunk_size=cfg.logprob_chunk), tokenizer)
    policy = engine.unwrapped()
    if cfg.generation_server:  # the server samples: no local copy of the policy is held
        check(engine.world_size == 1, "--generation-server runs on one process for now")
        sampler = connect(policy.model, tokenizer, cfg.generation_server,
                          Path(cfg.output_dir) / "generation-server", sync_every=cfg.sync_every)
    run = run_type(cfg=cfg, engine=engine, module=module, policy=policy, reference=reference, tokenizer=tokenizer,
                   prompts=prompts, reward=reward, sampler=sampler, **algorithm_state)
    run.load_state(engine.extra_state)
    return run


def sampler_weighted(surrogate: Tensor, part: Rollout, cap: float, metrics: dict[str, Tensor]) -> Tensor:
    """The per-token policy surrogate (B, T), weighted by truncated importance sampling when the
    tokens came from another engine μ that reported its log-probs (a vLLM server):

        ℓ_t ← min(π_old(y_t)/μ(y_t), C) · ℓ_t          (C = `cap`; 0 = off)

    so the update follows π_old's distribution although μ drew the tokens. Adds
    `sampler/is_weight_mean` and `sampler/is_capped_frac` to `metrics`. Without sampler
    log-probs (in-process sampling: μ = π_old) the surrogate is returned as is.
    """
    if part.sampler_logprobs is None or cap == 0:
        return surrogate
    weights, is_metrics = truncated_importance_weights(part.old_logprobs, part.sampler_logprobs,
                                                       part.response_mask, cap=cap)
    metrics.update({f"sampler/{k}": v for k, v in is_metrics.items()})
    return surrogate * weights


def mean_across(engine: Engine, metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over processes (identity on one process)."""
    if engine.world_size == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=engine.device)
    t = engine.accelerator.reduce(t, reduction="mean").cpu()
    return {k: float(t[i]) for i, k in enumerate(keys)}


# ============================================================================ a step's pieces
def collect(run: OnlineRun, step: int, *, with_values: bool = False, policy_pass: bool = True,
            baseline: SamplingConfig | None = None) -> Rollout:
    """This process's prompts of `step`, sampled and scored, with old and reference
    log-probs (and values with a critic); see `build_rollout` for `policy_pass`, `baseline`.
    Under FSDP the policy's full weights are gathered once for the whole rollout
    (`full_parameters`): sampling calls the transformers model directly."""
    with full_parameters(run.module):
        return _collect(run, step, with_values=with_values, policy_pass=policy_pass, baseline=baseline)


def _collect(run: OnlineRun, step: int, *, with_values: bool, policy_pass: bool,
             baseline: SamplingConfig | None) -> Rollout:
    cfg = run.cfg
    prompts = prompts_for_step(run.prompts, cfg.prompts_per_step, seed=cfg.seed, step=step,
                               rank=run.engine.rank, world_size=run.engine.world_size)
    if cfg.env:  # multi-turn: the same Rollout, its loss mask on the model's tokens only
        check(baseline is None, "a baseline decode is single-turn: not available with env")
        return build_episode_rollout(run.policy, run.reference, run.tokenizer, prompts, cfg.episodes(),
                                     cfg.sampling(step_seed(cfg.seed, step)), micro_batch_size=cfg.batch_size,
                                     with_values=with_values, chunk_size=cfg.logprob_chunk, sampler=run.sampler,
                                     policy_pass=policy_pass, share_prompts=cfg.shares_prompts,
                                     autocast=run.engine.autocast)
    return build_rollout(run.policy, run.reference, run.tokenizer, prompts, run.reward,
                         cfg.sampling(step_seed(cfg.seed, step)), micro_batch_size=cfg.batch_size,
                         with_values=with_values, chunk_size=cfg.logprob_chunk, sampler=run.sampler,
                         policy_pass=policy_pass, baseline=baseline, share_prompts=cfg.shares_prompts,
                         autocast=run.engine.autocast)


# A micro-batch's loss: (its rows, the policy's outputs on them) → (ℓ (B, T), metrics).
LossFn = Callable[[Rollout, ResponseOutputs], tuple[Tensor, dict[str, Tensor]]]


def update(run: OnlineRun, rollout: Rollout, step: int, loss_fn: LossFn, *, with_entropy: bool = False,
           with_values: bool = False, entropy_grad: bool = True,
           after_minibatch: Callable[[int], dict[str, float]] | None = None) -> tuple[dict[str, float], Rollout]:
    """inner_epochs × minibatches optimizer steps on the rollout; returns the metrics averaged
    over them, and the rollout with its old log-probs and entropy filled in when it came
    without them (`policy_pass=False`: taken, detached, from this update's own forward, which
    on-policy gives exactly log π_old).

    Each minibatch is split into length-sorted micro-batches (sorted by prompt when prompts
    are shared, `TrainConfig.shares_prompts`); each micro-batch's ℓ is summed
    and divided by the units (tokens or responses, see `loss_units`) of the whole minibatch
    on all processes, so the accumulated gradient is exactly that of the minibatch.
    `after_minibatch(update_index)` adds its own backward to the minibatch's gradient before
    the optimizer step (PPO-ptx) and returns its metrics."""
    cfg, engine = run.cfg, run.engine
    temperature = logprob_temperature(cfg.sampling(0))
    fill = rollout.old_logprobs is None
    if fill:
        old_full = torch.zeros_like(rollout.response_mask)
        entropy_full = torch.zeros_like(rollout.response_mask)
    sums: dict[str, float] = {}
    grad_norms = []
    run.module.train()
    for epoch in range(cfg.inner_epochs):
        for k, rows in enumerate(minibatch_rows(rollout.num_rows, cfg, step=step, epoch=epoch)):
            groups = micro_batches(rollout, rows, cfg.batch_size, by_prompt=cfg.shares_prompts)
            parts = [rollout.select(g) for g in groups]
            local_units = sum(float(loss_units(p.response_mask, cfg.aggregation)) for p in parts)
            # DDP averages the processes' gradients: dividing by (all units / processes) makes
            # that average the gradient of Σ ℓ / all units.
            normalizer = engine.sum_across(local_units) / engine.world_size
            for i, (part, part_rows) in enumerate(zip(parts, groups)):
                last = i == len(parts) - 1 and after_minibatch is None
                with engine.accumulate(last=last), engine.autocast():
                    out = policy_outputs(run.module, part, run.pad_id, temperature=temperature,
                                         with_entropy=with_entropy or fill, with_values=with_values,
                                         entropy_grad=entropy_grad, share_prompts=cfg.shares_prompts)
                    if fill:
                        part = dataclasses.replace(part, old_logprobs=out.logprobs.detach())
                        put_rows(old_full, part_rows, part.old_logprobs)
                        put_rows(entropy_full, part_rows, out.entropy)
                    per_token, metrics = loss_fn(part, out)
                    loss = aggregate(per_token, part.response_mask, cfg.aggregation, normalizer=normalizer)
                engine.backward(loss)
                metrics = {"loss": aggregate(per_token.detach(), part.response_mask, cfg.aggregation), **metrics}
                weight = float(loss_units(part.response_mask, cfg.aggregation)) / local_units
                for key, v in metrics.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * weight
            if after_minibatch is not None:
                update_index = step * cfg.updates_per_step + epoch * cfg.minibatches + k
                for key, v in after_minibatch(update_index).items():
                    sums[key] = sums.get(key, 0.0) + v
            grad_norms.append(engine.optimizer_step())
    out = {k: v / cfg.updates_per_step for k, v in sums.items()}
    out["grad_norm"] = sum(grad_norms) / len(grad_norms)
    if fill:
        rollout = dataclasses.replace(rollout, old_logprobs=old_full, entropy=entropy_full)
    return out, rollout


# ============================================================================ the loop
def train(run: OnlineRun, train_step: Callable[[int], tuple[dict[str, float], int]]) -> tuple[Path, dict[str, float]]:
    """Run `train_step(step)` → (metrics, tokens) from the engine's start step (after the
    resumed checkpoint, if any) to max_steps; the engine logs each step and checkpoints the
    model with `run.state()`. Returns (the final model's folder, the last step's metrics)."""
    engine = run.engine
    metrics: dict[str, float] = {}
    with engine.interruptible():
        for step in range(engine.start_step, run.cfg.max_steps):
            metrics, tokens = train_step(step)
            engine.end_step(step + 1, metrics, tokens=tokens, extra_state=run.state())
    return engine.finish(), metrics
