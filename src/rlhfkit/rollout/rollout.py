"""Rollouts: the batch of sampled responses every online recipe learns from.

    prompts ──generate──▶ responses ──RewardSource──▶ scores
                              │
                              └──policy (no grad)──▶ old log-probs, values, entropy
                              └──reference────────▶ reference log-probs

`Rollout` is the typed container; `build_rollout` fills it. Shapes: B = prompts × k rows,
grouped by prompt (rows [g·k, (g+1)·k) share prompt g), T = longest response. Responses are
right-padded; `response_mask` is 1 on every sampled token up to and including the stop
token (the model must learn to stop) and 0 after it.

Log-probs are never taken from the sampler: one forward over prompt + response rows
(concatenated without padding between them, right-padded, labels only on the response
tokens) through the chunked path gives the log-probs the loss will compare against, so
at ratio 1 the two agree exactly. The reference runs once per rollout batch: a frozen
copy of the initial policy, or — with LoRA — the policy itself with its adapter disabled.

This module also holds what the online recipes share around the rollout: their common
config fields, reading prompts (JSONL or the demo tasks), building the reward from a
`--reward` spec, the prompt order of each step, and the per-rollout learning-rate schedule.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.config import ConfigError, check, did_you_mean, param
from rlhfkit.data.batches import IGNORE_INDEX, LMBatch, pad_right
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.readers import iter_records
from rlhfkit.data.schemas import ROLES, Conversation, as_conversation, prompt_text
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.losses.policy import AGGREGATIONS
from rlhfkit.ops.kl import KL_ESTIMATORS
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.rollout.generate import Generation, PolicySampler, SamplingConfig, generate
from rlhfkit.rollout.rewards import (
    FunctionReward,
    RewardSource,
    Sample,
    WeightedRewards,
)
from rlhfkit.train.engine import Engine, TrainConfig, lr_lambda

log = logging.getLogger(__name__)


# ============================================================================ shared config
@dataclass(frozen=True)
class OnlineConfig(TrainConfig):
    """Fields every online recipe shares: prompts, reward, sampling, KL, update schedule.

    Steps count rollouts: each step samples `prompts_per_step × group_size` responses,
    then runs `inner_epochs × minibatches` optimizer updates on them (the lr schedule and
    warmup count rollouts too). `batch_size` is the micro-batch of sequences per forward.
    """

    prompts: str = param("", "prompts: JSONL with 'prompt' and optional 'answer', 'task_id', 'tests'")
    tasks: str = param("", "'demo' to train on the demo tasks instead of a prompts file", choices=("", "demo"))
    demo_per_family: int = param(64, "demo tasks per family (with --tasks demo)")
    demo_families: tuple[str, ...] = param(("arithmetic", "units", "strings", "format"),
                                           "demo task families to use (with --tasks demo)")
    reward: str = param("gold", "reward spec: gold | rm:PATH | format:REGEX | length[:MIN-MAX] | exact | code, "
                                "weighted: 'gold:1.0,length:0.1'")
    reward_normalize: bool = param(False, "normalize each reward source by its running mean/std before weighting")
    prompts_per_step: int = param(8, "prompts per rollout step")
    group_size: int = param(4, "responses sampled per prompt")
    max_new_tokens: int = param(64, "longest response in tokens")
    temperature: float = param(1.0, "sampling temperature (log-probs use the same temperature)")
    top_p: float = param(1.0, "nucleus sampling threshold")
    top_k: int = param(0, "sample from the k most likely tokens (0 = off)")
    gen_batch_size: int = param(64, "sequences decoded together")
    kl_coef: float = param(0.05, "β: weight of the KL to the reference")
    kl_estimator: str = param("auto", "per-token KL estimator (auto: k3 in the loss, k1 in the reward)",
                              choices=("auto", *KL_ESTIMATORS))
    clip_eps: float = param(0.2, "PPO-style ratio clip ε")
    inner_epochs: int = param(1, "passes over each rollout batch (1 = on-policy, ratio ≡ 1)")
    minibatches: int = param(1, "optimizer steps per pass over the rollout batch")
    aggregation: str = param("token", "how per-token losses become one number", choices=tuple(AGGREGATIONS))
    schedule: str = param("constant", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    lr: float = param(1e-6, "peak learning rate (AdamW)")

    def validate(self) -> None:
        super().validate()
        check(bool(self.prompts) != bool(self.tasks), "give exactly one of prompts (a JSONL file) or tasks=demo")
        check(self.demo_per_family >= 1, "demo_per_family must be ≥ 1")
        check(self.prompts_per_step >= 1, "prompts_per_step must be ≥ 1")
        check(self.group_size >= 1, "group_size must be ≥ 1")
        check(self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1")
        check(self.max_new_tokens < self.max_length, "max_new_tokens must be < max_length (room for the prompt)")
        check(self.temperature > 0, "temperature must be > 0 for sampling")
        check(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        check(self.top_k >= 0, "top_k must be ≥ 0")
        check(self.gen_batch_size >= 1, "gen_batch_size must be ≥ 1")
        check(self.kl_coef >= 0, "kl_coef must be ≥ 0")
        check(0 < self.clip_eps < 1, "clip_eps must be in (0, 1)")
        check(self.inner_epochs >= 1, "inner_epochs must be ≥ 1")
        check(self.minibatches >= 1, "minibatches must be ≥ 1")
        check((self.prompts_per_step * self.group_size) % self.minibatches == 0,
              "prompts_per_step × group_size must be a multiple of minibatches")
        check(self.grad_accum == 1, "grad_accum is not used by online recipes (micro-batches come from "
                                    "batch_size); leave it at 1")
        parse_reward_spec(self.reward)  # a bad spec fails now, not after the model has loaded

    @property
    def updates_per_step(self) -> int:
        return self.inner_epochs * self.minibatches

    def sampling(self, seed: int) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, n=self.group_size, batch_size=self.gen_batch_size, seed=seed)


def step_seed(seed: int, step: int, purpose: str = "sample") -> int:
    """A sampling seed that is a pure function of (run seed, step): a resumed run samples
    exactly what the uninterrupted run sampled, with no RNG state to carry."""
    digest = hashlib.sha256(f"{seed}/{step}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def prompts_for_step(prompts: Sequence["RLPrompt"], per_step: int, *, seed: int, step: int, rank: int = 0,
                     world_size: int = 1) -> list["RLPrompt"]:
    """This process's prompts of `step`: each of `world_size` processes gets `per_step`."""
    idx = prompt_indices(len(prompts), per_step * world_size, seed=seed, step=step)
    return [prompts[i] for i in idx[rank::world_size]]


def mean_across(engine: Engine, metrics: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over processes (identity on one process)."""
    if engine.world_size == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=engine.device)
    t = engine.accelerator.reduce(t, reduction="mean").cpu()
    return {k: float(t[i]) for i, k in enumerate(keys)}


def loss_units(rollout: "Rollout", aggregation: str) -> float:
    """What a loss over these rows averages over: tokens ("token") or responses (otherwise)."""
    return float(rollout.response_mask.sum()) if aggregation == "token" else float(rollout.num_rows)


def minibatch_rows(num_rows: int, cfg: "OnlineConfig", *, step: int, epoch: int) -> list[Tensor]:
    """Row indices of each minibatch of one pass: shuffled per (seed, step, epoch) when there
    is more than one update per rollout, in order otherwise."""
    if cfg.updates_per_step > 1:
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, f"epoch-{epoch}"))
        order = torch.randperm(num_rows, generator=gen)
    else:
        order = torch.arange(num_rows)
    size = num_rows // cfg.minibatches
    return [order[k * size:(k + 1) * size] for k in range(cfg.minibatches)]


def micro_batches(rollout: "Rollout", rows: Tensor | Sequence[int], size: int) -> list[Tensor]:
    """`rows` in micro-batches of ≤ `size` rows of similar length (prompt + response tokens).

    Each forward pads its rows to the longest of them; sorting by length first (stable, so
    the split is a pure function of the lengths) keeps that padding small: on a 32-row GRPO
    rollout of the demo tasks, one micro-batch is 25% padding, four sorted ones 7.5%.
    """
    rows = torch.as_tensor(rows, dtype=torch.long).cpu()
    lengths = (rollout.prompt_mask.sum(-1) + rollout.response_mask.sum(-1)).cpu()[rows]
    ordered = rows[torch.sort(lengths, stable=True).indices]
    return [ordered[s:s + size] for s in range(0, len(ordered), size)]


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


def schedule_per_rollout(engine: Engine, updates_per_step: int) -> None:
    """Make the engine's lr schedule count rollout steps, not optimizer steps.

    The engine steps its scheduler once per optimizer step; a rollout step makes
    `updates_per_step` of them. Replacing the multiplier λ(s) by λ(s // updates_per_step)
    keeps warmup and decay in rollout steps. The scheduler state (resumed or fresh) is kept.
    """
    if updates_per_step == 1:
        return
    cfg = engine.cfg

    def multiplier(s: int) -> float:
        return lr_lambda(s // updates_per_step, warmup=cfg.warmup_steps, total=engine.total_steps,
                         schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)

    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside accelerate's wrapper
    state = engine.scheduler.state_dict()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    scheduler.load_state_dict(state)
    lrs = [g["initial_lr"] * multiplier(scheduler.last_epoch) for g in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports before the next step
    engine.scheduler = scheduler


# ============================================================================ prompts
@dataclass(frozen=True)
class RLPrompt:
    """A prompt to sample from, with what a verifier needs (`answer`, `tests`, demo `task`)."""

    prompt: Conversation
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str | None:
        return self.meta.get("task_id")


def read_prompts(path: str | Path) -> list[RLPrompt]:
    """Prompts from a JSONL/JSON/Parquet file: `prompt` (text or messages), optional `answer`
    (text or number), `task_id`, `tests` (code strings); other fields are kept in meta.
    A bad record raises DataError naming the file, line and field."""
    out = []
    for rec, where in iter_records(path):
        if "prompt" not in rec:
            raise where.error("prompt", "missing (each line needs a 'prompt')")
        raw = rec["prompt"]
        if isinstance(raw, str):
            if not raw.strip():
                raise where.error("prompt", "empty text")
        elif isinstance(raw, list) and raw:
            for i, m in enumerate(raw):
                if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                    raise where.error(f"prompt[{i}]", "expected a message {role, content} with role in "
                                                      f"{', '.join(ROLES)}")
        else:
            raise where.error("prompt", "expected text or a non-empty list of {role, content} messages")
        meta = {k: v for k, v in rec.items() if k != "prompt"}
        answer = rec.get("answer")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
                raise where.error("answer", f"expected text or a number, got {type(answer).__name__}")
            meta["answer"] = str(answer)
        if "task_id" in rec and not isinstance(rec["task_id"], (str, int)):
            raise where.error("task_id", "expected text")
        tests = rec.get("tests")
        if tests is not None and not (isinstance(tests, str) or (
                isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests))):
            raise where.error("tests", "expected a code string or a non-empty list of code strings")
        out.append(RLPrompt(as_conversation(raw), meta))
    if not out:
        raise DataError("no prompts in the file", path=str(path))
    return out


def demo_prompts(split: str, n_per_family: int, *, seed: int = 0,
                 families: Sequence[str] = ("arithmetic", "units", "strings", "format")) -> list[RLPrompt]:
    """The demo tasks as prompts; meta carries the Task so the gold checker can score it."""
    from rlhfkit.demo.tasks import make_tasks

    tasks = make_tasks(split, n_per_family, seed=seed, families=families)
    return [RLPrompt(as_conversation(t.prompt), {"task": t, "task_id": t.id, "family": t.family,
                                                  "answer": t.answer}) for t in tasks]


def load_prompts(cfg: OnlineConfig, tokenizer) -> list[RLPrompt]:
    """The run's prompts; those too long to leave room for a response are skipped and counted."""
    prompts = (demo_prompts("train", cfg.demo_per_family, seed=cfg.seed, families=cfg.demo_families)
               if cfg.tasks == "demo" else read_prompts(cfg.prompts))
    room = cfg.max_length - cfg.max_new_tokens
    skipped = SkipReport()
    kept = []
    for i, p in enumerate(prompts):
        if len(encode_prompt(tokenizer, p.prompt)) > room:
            skipped.add("prompt longer than max_length - max_new_tokens", f"{cfg.prompts or 'demo'}:{i + 1}")
        else:
            kept.append(p)
    if skipped.total:
        log.warning("%s (%s)", skipped.summary(), "; ".join(sum(skipped.examples.values(), [])))
    if not kept:
        raise DataError(f"every prompt was skipped: {skipped.summary()}", path=cfg.prompts or "demo tasks")
    return kept


# ============================================================================ rewards
class GoldReward:
    """The exact check each prompt carries: a demo task's checker, `tests` run in the
    sandbox, or an exact `answer`. A prompt with none of them is a DataError."""

    name = "gold"

    def __init__(self) -> None:
        from rlhfkit.rollout.verifiers import CodeExecutionReward, ExactAnswerReward

        self._by_kind: dict[str, RewardSource] = {
            "task": FunctionReward("task", _demo_gold),
            "tests": CodeExecutionReward(),
            "answer": ExactAnswerReward(),
        }

    def score(self, samples: Sequence[Sample]) -> list[float]:
        kinds: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            kind = next((k for k in self._by_kind if s.meta.get(k) is not None), None)
            if kind is None:
                task = s.meta.get("task_id")
                raise DataError(f"sample {i}{f' (task {task})' if task is not None else ''} has nothing to "
                                "check against: give 'answer' or 'tests', or use another --reward", field="answer")
            kinds.setdefault(kind, []).append(i)
        out = [0.0] * len(samples)
        for kind, rows in kinds.items():
            for i, v in zip(rows, self._by_kind[kind].score([samples[i] for i in rows])):
                out[i] = float(v)
        return out


def _demo_gold(sample: Sample) -> float:
    from rlhfkit.demo.tasks import gold_reward

    return gold_reward(sample.meta["task"], sample.response)


class RewardModelSource:
    """A trained reward model (or an ensemble of heads) as a RewardSource: one scalar per
    (prompt, response), the heads combined by `ensemble_mode` (mean, min, mean_minus_std).

    The model and its tokenizer come from `rlhfkit.eval.reward.load_trained_reward_model`
    (imported when used); the text is rendered with the reward model's own chat template,
    so its tokenizer need not match the policy's.
    """

    def __init__(self, path: str, *, ensemble_mode: str = "mean", batch_size: int = 16, name: str = "rm") -> None:
        from rlhfkit.eval.reward import load_trained_reward_model
        from rlhfkit.train.engine import inference_device

        self.model, self.tokenizer = load_trained_reward_model(path)
        self.model.to(inference_device())
        self.ensemble_mode, self.batch_size, self.name = ensemble_mode, batch_size, name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        from rlhfkit.eval.reward import score_responses
        from rlhfkit.losses.reward import ensemble_reduce

        prompts = [s.meta.get("conversation") or as_conversation(s.prompt) for s in samples]
        members = score_responses(self.model, self.tokenizer, prompts, [s.response for s in samples],
                                  batch_size=self.batch_size)                     # (E, N)
        return ensemble_reduce(members, self.ensemble_mode).tolist()


@dataclass(frozen=True)
class RewardTerm:
    """One term of a --reward spec: source name, its argument (or None), weight."""

    source: str
    arg: str | None
    weight: float


def _length_reward(arg: str | None) -> RewardSource:
    from rlhfkit.rollout.verifiers import LengthReward

    if arg is None:
        return LengthReward(max_words=50)
    if "-" not in arg:
        return LengthReward(target_words=int(arg))
    lo, hi = arg.split("-")
    return LengthReward(min_words=int(lo) if lo else None, max_words=int(hi) if hi else None)


def _verifier(name: str):
    def build(arg: str | None) -> RewardSource:
        from rlhfkit.rollout import verifiers

        cls = getattr(verifiers, name)
        return cls(arg) if arg is not None else cls()
    return build


@dataclass(frozen=True)
class RewardKind:
    """A --reward source: how to build it from its argument, and whether it takes one."""

    build: Callable[[str | None], RewardSource]
    argument: str         # "none", "optional" or "required"
    arg_name: str = ""    # shown in errors


REWARD_KINDS: dict[str, RewardKind] = {
    "gold": RewardKind(lambda arg: GoldReward(), "none"),
    "exact": RewardKind(_verifier("ExactAnswerReward"), "none"),
    "code": RewardKind(_verifier("CodeExecutionReward"), "none"),
    "format": RewardKind(_verifier("FormatReward"), "required", "REGEX"),
    "length": RewardKind(_length_reward, "optional", "MIN-MAX"),
    "rm": RewardKind(lambda arg: RewardModelSource(arg), "required", "PATH"),
}
REWARD_SOURCES = tuple(sorted(REWARD_KINDS))
# A comma starts a new term only when a name follows (then ':' or the end), so a regex
# such as \d{1,3} keeps its comma, and a misspelled name is reported rather than swallowed.
_TERM_SPLIT = re.compile(r",(?=\s*[A-Za-z_]+\s*(?::|,|$))")
_WEIGHT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """'gold' | 'rm:PATH' | 'format:REGEX' | 'length[:MIN-MAX]' | 'exact' | 'code', each with an
    optional ':WEIGHT' (default 1), joined by commas: 'gold:1.0,length:0.1'. A regex or path
    that itself ends in ':<number>' needs an explicit weight after it."""
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError("reward: empty spec; e.g. 'gold' or 'gold:1.0,length:0.1'")
    terms = []
    for raw in _TERM_SPLIT.split(spec):
        raw = raw.strip()
        name, _, rest = raw.partition(":")
        name = name.strip()
        if name not in REWARD_SOURCES:
            hint = did_you_mean(name, REWARD_SOURCES)
            raise ConfigError(f"reward: unknown source '{name}' in '{raw}' (choose from "
                              f"{', '.join(REWARD_SOURCES)}){hint}")
        kind = REWARD_KINDS[name]
        arg, weight = None, 1.0
        head, sep, tail = rest.rpartition(":")
        if kind.argument == "none" or (kind.argument == "optional" and _WEIGHT.fullmatch(rest.strip())):
            if rest and not _WEIGHT.fullmatch(rest.strip()):
                raise ConfigError(f"reward: '{raw}': expected '{name}' or '{name}:WEIGHT'")
            weight = float(rest) if rest else 1.0
        elif sep and _WEIGHT.fullmatch(tail.strip()):
            arg, weight = head, float(tail)
        else:
            arg = rest or None
        if kind.argument == "required" and not arg:
            raise ConfigError(f"reward: '{raw}' needs an argument: {name}:{kind.arg_name}")
        if name == "length" and arg is not None and not re.fullmatch(r"\d*-\d*|\d+", arg):
            raise ConfigError(f"reward: '{raw}': length takes MIN-MAX words (e.g. length:5-40) or a target (length:20)")
        if name == "format" and arg is not None:
            try:
                re.compile(arg)
            except re.error as e:
                raise ConfigError(f"reward: '{raw}': invalid regex: {e}") from None
        if not math.isfinite(weight):
            raise ConfigError(f"reward: '{raw}': weight must be finite")
        terms.append(RewardTerm(name, arg, weight))
    return terms


class _Named:
    """A source under another name (two terms of one kind need distinct names to be logged)."""

    def __init__(self, source: RewardSource, name: str):
        self.source, self.name = source, name

    def score(self, samples):
        return self.source.score(samples)


def build_reward(spec: str, *, normalize: bool = False) -> WeightedRewards:
    """The weighted combination a --reward spec names (see `parse_reward_spec`)."""
    sources: list[tuple[RewardSource, float]] = []
    seen: dict[str, int] = {}
    for term in parse_reward_spec(spec):
        source = REWARD_KINDS[term.source].build(term.arg)
        seen[term.source] = seen.get(term.source, 0) + 1
        name = term.source if seen[term.source] == 1 else f"{term.source}_{seen[term.source]}"
        sources.append((source if name == source.name else _Named(source, name), term.weight))
    return WeightedRewards(sources, normalize=normalize, name="reward")


# ============================================================================ the rollout
@dataclass(frozen=True)
class Rollout:
    """Sampled responses and everything the update needs. B rows grouped by prompt.

    prompt_ids, prompt_mask: (B, P) right-padded prompt tokens, 1 on real ones.
    response_ids, response_mask: (B, T) right-padded response tokens; the mask is 1 up to
        and including the stop token.
    scores: (B,) the combined reward; source_scores: {source: (B,) raw score}.
    prompt_index: (B,) which prompt of the step a row answers; group_size: rows per prompt.
    finished: (B,) True where the response ended with a stop token (not the length limit).
    gold: (B,) 1.0 where the demo task's checker accepts the response (demo prompts only).
    old_logprobs, ref_logprobs, entropy, values: (B, T), 0 on padding; filled by
        `with_logprobs` (values only with a critic).
    advantages: (B,) per response or (B, T) per token; returns: (B, T) value targets —
        set by the recipe once it has computed them.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    scores: Tensor
    source_scores: dict[str, Tensor]
    prompt_index: Tensor
    group_size: int
    finished: Tensor
    texts: tuple[str, ...] = field(compare=False)
    gold: Tensor | None = None
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_lengths(self) -> Tensor:
        return self.response_mask.sum(-1).long()

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_mask.sum() + self.response_mask.sum())

    def select(self, rows: Tensor | Sequence[int]) -> "Rollout":
        """The rows `rows`, in that order (a minibatch); tensors are trimmed to the longest kept row."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        t = int(self.response_mask[rows].sum(-1).max()) if len(rows) else 0
        p = int(self.prompt_mask[rows].sum(-1).max()) if len(rows) else 0
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v[rows]
                if v.dim() == 2:
                    v = v[:, :p] if f.name.startswith("prompt_") else v[:, :t]
            elif f.name == "source_scores":
                v = {k: s[rows] for k, s in v.items()}
            elif f.name == "texts":
                v = tuple(v[i] for i in rows.tolist())
            changes[f.name] = v
        return Rollout(**changes)

    def to(self, device) -> "Rollout":
        changes = {f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                   if isinstance(getattr(self, f.name), Tensor)}
        changes["source_scores"] = {k: v.to(device) for k, v in self.source_scores.items()}
        return dataclasses.replace(self, **changes)

    def lm_batch(self, pad_id: int) -> LMBatch:
        """Rows prompt + response (no padding in between), right-padded; labels on the response.

        Row i holds P_i prompt and R_i response tokens; the label at position P_i − 1 + j is
        response token j, so the label layout's counted positions, read row by row, are the
        response tokens in order (see `response_layout`).
        """
        seqs, labels = [], []
        for ids, pm, rids, rm in zip(self.prompt_ids.tolist(), self.prompt_mask.tolist(),
                                     self.response_ids.tolist(), self.response_mask.tolist()):
            prompt = [t for t, m in zip(ids, pm) if m]
            response = [t for t, m in zip(rids, rm) if m]
            seqs.append(prompt + response)
            labels.append([IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX])
        device = self.response_ids.device
        return LMBatch(pad_right(seqs, pad_id).to(device), pad_right([[1] * len(s) for s in seqs], 0).to(device),
                       pad_right(labels, IGNORE_INDEX).to(device))

    def response_layout(self, per_position: Tensor, batch: LMBatch) -> Tensor:
        """(B, L) label-layout values → (B, T) response layout (keeps the gradient)."""
        counted = per_position[batch.labels != IGNORE_INDEX]
        out = torch.zeros(self.response_mask.shape, dtype=per_position.dtype, device=per_position.device)
        return out.masked_scatter(self.response_mask.bool(), counted)


def assemble_rollout(generations: Sequence[Generation], scores: Tensor, source_scores: dict[str, Tensor], *,
                     group_size: int, pad_id: int, prompts: Sequence[RLPrompt] | None = None) -> Rollout:
    """A Rollout (no log-probs yet) from generated responses and their scores, in generation order."""
    if any(len(g.response_ids) == 0 for g in generations):
        raise ValueError("a generation has no response tokens; max_new_tokens must be ≥ 1")
    prompt_ids = pad_right([g.prompt_ids for g in generations], pad_id)
    prompt_mask = pad_right([[1] * len(g.prompt_ids) for g in generations], 0)
    response_ids = pad_right([g.response_ids for g in generations], pad_id)
    response_mask = pad_right([[1] * len(g.response_ids) for g in generations], 0).float()
    gold = None
    if prompts is not None and all("task" in prompts[g.prompt_index].meta for g in generations):
        from rlhfkit.demo.tasks import check

        gold = torch.tensor([float(check(prompts[g.prompt_index].meta["task"], g.text)) for g in generations])
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, scores=scores.float(),
                   source_scores={k: v.float() for k, v in source_scores.items()},
                   prompt_index=torch.tensor([g.prompt_index for g in generations], dtype=torch.long),
                   group_size=group_size, finished=torch.tensor([g.finished for g in generations]),
                   texts=tuple(g.text for g in generations), gold=gold)


def score_generations(reward: WeightedRewards, prompts: Sequence[RLPrompt],
                      generations: Sequence[Generation]) -> tuple[Tensor, dict[str, Tensor]]:
    """(combined (N,), {source: raw (N,)}) for the generated responses."""
    samples = [Sample(prompt_text(prompts[g.prompt_index].prompt), g.text,
                      {**prompts[g.prompt_index].meta, "conversation": prompts[g.prompt_index].prompt})
               for g in generations]
    combined, raw = reward.score_detailed(samples)
    return torch.tensor(combined, dtype=torch.float32), {k: torch.tensor(v, dtype=torch.float32)
                                                         for k, v in raw.items()}


class ReferencePolicy:
    """π_ref, frozen: a copy of the initial policy, or (LoRA) the policy with its adapter off.

    Build it from the model *before* any update (and before a resume loads trained weights);
    `device` is where the copy runs (the training device: the model is usually still on the
    CPU at that point, before the engine moves it).
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None):
        self.uses_adapter = hasattr(model, "disable_adapter")
        if self.uses_adapter:
            self.model = model
        else:
            self.model = copy.deepcopy(model).eval()
            if device is not None:
                self.model.to(device)
            for p in self.model.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def logprobs(self, batch: LMBatch, *, temperature: float = 1.0, chunk_size: int = 512) -> Tensor:
        """(B, L) log π_ref(labels), 0 where labels = IGNORE_INDEX."""
        def run():
            return gather_logprobs(self.model, batch.input_ids, batch.labels, attention_mask=batch.attention_mask,
                                   chunk_size=chunk_size, temperature=temperature)
        if self.uses_adapter:
            with self.model.disable_adapter():
                return run()
        return run()


@dataclass(frozen=True)
class ResponseOutputs:
    """The policy's outputs on a rollout's response tokens, (B, T) each."""

    logprobs: Tensor
    entropy: Tensor | None
    values: Tensor | None


def policy_outputs(module: nn.Module, rollout: Rollout, pad_id: int, *, temperature: float,
                   with_entropy: bool = False, with_values: bool = False, entropy_grad: bool = True,
                   batch: LMBatch | None = None) -> ResponseOutputs:
    """One forward of a PolicyValueModel (possibly DDP-wrapped) over the rollout's rows."""
    batch = rollout.lm_batch(pad_id) if batch is None else batch
    out = module(batch, temperature=temperature, with_entropy=with_entropy, with_values=with_values,
                 entropy_grad=entropy_grad)
    return ResponseOutputs(rollout.response_layout(out.logprobs, batch),
                           None if out.entropy is None else rollout.response_layout(out.entropy, batch),
                           None if out.values is None else rollout.response_layout(out.values, batch))


@torch.no_grad()
def with_logprobs(rollout: Rollout, module: nn.Module, reference: ReferencePolicy, *, pad_id: int,
                  temperature: float, micro_batch_size: int, with_values: bool = False,
                  chunk_size: int = 512, policy_pass: bool = True) -> Rollout:
    """Fill old log-probs (and entropy, values) from the policy and ref log-probs from π_ref.

    policy_pass=False skips the policy forward (old log-probs and entropy stay None): for an
    on-policy update, whose training forward gives exactly these log-probs (see
    `recipes.policy_gradient.update`)."""
    was_training = module.training
    module.eval()
    shape, device = rollout.response_mask.shape, rollout.response_mask.device
    filled: dict[str, Tensor] = {}

    def put(name: str, rows: Tensor, values: Tensor) -> None:
        if name not in filled:
            filled[name] = torch.zeros(shape, dtype=values.dtype, device=device)
        put_rows(filled[name], rows, values)

    for rows in micro_batches(rollout, range(rollout.num_rows), micro_batch_size):
        part = rollout.select(rows)
        batch = part.lm_batch(pad_id)
        if policy_pass:
            out = policy_outputs(module, part, pad_id, temperature=temperature, with_entropy=True,
                                 with_values=with_values, batch=batch)
            put("old_logprobs", rows, out.logprobs)
            put("entropy", rows, out.entropy)
            if out.values is not None:
                put("values", rows, out.values)
        put("ref_logprobs", rows, part.response_layout(
            reference.logprobs(batch, temperature=temperature, chunk_size=chunk_size), batch))
    module.train(was_training)
    return dataclasses.replace(rollout, **filled)


def put_rows(full: Tensor, rows: Tensor, part: Tensor) -> None:
    """full[rows] = part, where `part` may be narrower than `full` (trimmed by `Rollout.select`)."""
    full[rows.to(full.device), :part.shape[1]] = part


def logprob_temperature(sampling: SamplingConfig) -> float:
    """π is the distribution sampled from: softmax(logits / τ); greedy decoding scores at τ = 1."""
    return sampling.temperature if sampling.temperature > 0 else 1.0


def build_rollout(policy: nn.Module, reference: ReferencePolicy, tokenizer, prompts: Sequence[RLPrompt],
                  reward: WeightedRewards, sampling: SamplingConfig, *, micro_batch_size: int,
                  with_values: bool = False, chunk_size: int = 512, sampler: PolicySampler | None = None) -> Rollout:
    """Generate `sampling.n` responses per prompt, score them, and fill the log-probs.

    policy: the (unwrapped) PolicyValueModel. Generation uses `sampler` (synced with the
    policy first), else the policy's causal LM at `.model` directly.
    """
    prompt_convs = [p.prompt for p in prompts]
    if sampler is not None:
        sampler.sync()
        generations = sampler.generate(tokenizer, prompt_convs, sampling)
    else:
        generations = generate(policy.model, tokenizer, prompt_convs, sampling)
    scores, source_scores = score_generations(reward, prompts, generations)
    pad_id = pad_token_id(tokenizer)
    rollout = assemble_rollout(generations, scores, source_scores, group_size=sampling.n, pad_id=pad_id,
                               prompts=prompts).to(next(policy.parameters()).device)
    return with_logprobs(rollout, policy, reference, pad_id=pad_id, temperature=logprob_temperature(sampling),
                         micro_batch_size=micro_batch_size, with_values=with_values, chunk_size=chunk_size)


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


# ============================================================================ diagnostics
def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """The per-step diagnostics every online recipe logs, with stable names."""
    from rlhfkit.ops.stats import masked_mean

    mask = rollout.response_mask
    m: dict[str, float] = {
        "reward": float(rollout.scores.mean()),
        "reward/mean": float(rollout.scores.mean()),
        "reward/std": float(rollout.scores.std()) if rollout.num_rows > 1 else 0.0,
        "response_length": float(mask.sum(-1).mean()),
        "response_truncated": float((~rollout.finished).float().mean()),
    }
    for name, s in rollout.source_scores.items():
        m[f"reward/{name}"] = float(s.mean())
    if rollout.old_logprobs is not None and rollout.ref_logprobs is not None:
        # KL(π ‖ π_ref) per response: Σ_t (log π − log π_ref), averaged over responses (nats).
        m["kl"] = float(((rollout.old_logprobs - rollout.ref_logprobs) * mask).sum(-1).mean())
    if rollout.entropy is not None:
        m["entropy"] = float(masked_mean(rollout.entropy, mask))
    if rollout.gold is not None:
        m["gold_accuracy"] = float(rollout.gold.mean())
    return m
