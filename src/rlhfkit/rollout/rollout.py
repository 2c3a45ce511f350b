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
tokens; or with each prompt stored once for its rows, `Rollout.lm_batch(share_prompts=True)`)
through the chunked path gives the log-probs the loss will compare against, so
at ratio 1 the two agree exactly. The reference runs once per rollout batch: a frozen
copy of the initial policy, or — with LoRA — the policy itself with its adapter disabled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.data.batches import IGNORE_INDEX, LMBatch, pad_right, to_device
from rlhfkit.data.packing import collate_shared_prompts
from rlhfkit.data.schemas import prompt_text
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.ops.logprobs import DEFAULT_CHUNK
from rlhfkit.ops.stats import masked_mean
from rlhfkit.rollout.generate import Generation, PolicySampler, SamplingConfig, generate
from rlhfkit.rollout.prompts import RLPrompt
from rlhfkit.rollout.rewards import Sample, WeightedRewards
from rlhfkit.tasks.check import check


@dataclass(frozen=True)
class Rollout:
    """Sampled responses and everything the update needs. B rows grouped by prompt.

    prompt_ids, prompt_mask: (B, P) right-padded prompt tokens, 1 on real ones.
    response_ids, response_mask: (B, T) right-padded response tokens; the mask is 1 up to
        and including the stop token. It is the loss mask: every loss, KL, entropy and
        normalizer counts the tokens where it is 1, and only those.
    response_attention_mask: (B, T) 1 on every real response token, the model's and the
        tools'; None when equal to response_mask (single-turn). In a multi-turn episode
        (`rollout.episodes`) the response interleaves model turns (response_mask 1) with tool
        output and chat-template tokens (response_mask 0): they are context the model reads,
        never a label, so no log-prob, KL, entropy or value is computed on them.
    scores: (B,) the combined reward; source_scores: {source: (B,) raw score}.
    prompt_index: (B,) which prompt of the step a row answers; group_size: rows per prompt.
    finished: (B,) True where the response ended with a stop token (not the length limit).
    gold: (B,) 1.0 where the demo task's checker accepts the response (demo prompts only).
    baseline_scores: (B,) the score of a baseline decode of the row's prompt (ReMax's
        greedy one), when `build_rollout` is asked for it.
    episode: {name: (B,)} per-episode counts of a multi-turn rollout (turns, tool_calls,
        errors, timeouts); empty for single-turn.
    old_logprobs, ref_logprobs, entropy, values: (B, T), 0 on padding; filled by
        `with_logprobs` (values only with a critic).
    sampler_logprobs: (B, T) the log-probs the sampler reported for the tokens it sampled
        (a vLLM server does; 0 on padding), else None. Logged against old_logprobs
        (`rollout_metrics`: `sampler/kl`, the gap between sampler and trainer); the critic-free
        recipes weight their surrogate by min(π_old/μ, C) with them (`truncated_importance_weights`).
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
    baseline_scores: Tensor | None = None
    old_logprobs: Tensor | None = None
    sampler_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    entropy: Tensor | None = None
    values: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    response_attention_mask: Tensor | None = None
    episode: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.response_ids.shape[0])

    @property
    def response_present(self) -> Tensor:
        """(B, T) 1 on every real response token (model and tool), right-padded."""
        return self.response_mask if self.response_attention_mask is None else self.response_attention_mask

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_mask.sum() + self.response_present.sum())

    def select(self, rows: Tensor | Sequence[int]) -> Rollout:
        """The rows `rows`, in that order (a minibatch); tensors are trimmed to the longest kept row."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        t = int(self.response_present[rows].sum(-1).max()) if len(rows) else 0
        p = int(self.prompt_mask[rows].sum(-1).max()) if len(rows) else 0
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v[rows]
                if v.dim() == 2:
                    v = v[:, :p] if f.name.startswith("prompt_") else v[:, :t]
            elif f.name in ("source_scores", "episode"):
                v = {k: s[rows] for k, s in v.items()}
            elif f.name == "texts":
                v = tuple(v[i] for i in rows.tolist())
            changes[f.name] = v
        return Rollout(**changes)

    def to(self, device) -> Rollout:
        return to_device(self, device)

    def lm_batch(self, pad_id: int, *, share_prompts: bool = False) -> LMBatch:
        """Rows prompt + response (no padding in between), right-padded; labels on the response.

        Row i holds P_i prompt and R_i response tokens; the label at position P_i − 1 + j is
        response token j where response_mask is 1 (IGNORE_INDEX on tool tokens), so the label
        layout's counted positions, read row by row, are the model's response tokens in order
        (see `response_layout`).

        share_prompts: consecutive rows with the same prompt (a group's samples, kept together
        by `micro_batches(by_prompt=True)`) store it once, in one packed row
        (`data.packing.collate_shared_prompts`: G samples of a P-token prompt cost
        P + Σ (R_j + 1) − 1 positions instead of Σ (P + R_j)); the counted labels keep the
        same order. Needs rlhfkit's attention kernels (`models.attention`).
        """
        seqs, labels, prompt_lengths = [], [], []
        for ids, pm, rids, present, rm in zip(self.prompt_ids.tolist(), self.prompt_mask.tolist(),
                                              self.response_ids.tolist(), self.response_present.tolist(),
                                              self.response_mask.tolist()):
            prompt = [t for t, m in zip(ids, pm) if m]
            response = [t for t, m in zip(rids, present) if m]
            targets = [t if m else IGNORE_INDEX for t, m, p in zip(rids, rm, present) if p]
            seqs.append(prompt + response)
            labels.append([IGNORE_INDEX] * (len(prompt) - 1) + targets + [IGNORE_INDEX])
            prompt_lengths.append(len(prompt))
        device = self.response_ids.device
        if share_prompts:
            return collate_shared_prompts(list(zip(seqs, labels, strict=True)), prompt_lengths).to(device)
        return LMBatch(pad_right(seqs, pad_id).to(device), pad_right([[1] * len(s) for s in seqs], 0).to(device),
                       pad_right(labels, IGNORE_INDEX).to(device))

    def response_layout(self, per_position: Tensor, batch: LMBatch) -> Tensor:
        """(B, L) label-layout values → (B, T) response layout, 0 off response_mask (keeps the gradient)."""
        counted = per_position[batch.labels != IGNORE_INDEX]
        out = torch.zeros(self.response_mask.shape, dtype=per_position.dtype, device=per_position.device)
        return out.masked_scatter(self.response_mask.bool(), counted)


def micro_batches(rollout: Rollout, rows: Tensor | Sequence[int], size: int, *,
                  by_prompt: bool = False) -> list[Tensor]:
    """`rows` in micro-batches of ≤ `size` rows of similar length (prompt + response tokens).

    Each forward pads its rows to the longest of them; sorting by length first (stable, so
    the split is a pure function of the lengths) keeps that padding small: on a 32-row GRPO
    rollout of the demo tasks, one micro-batch is 25% padding, four sorted ones 7.5%.
    by_prompt: sorted by prompt instead (stable: rows of one prompt keep their order), so the rows
    of one prompt sit together and share it (`Rollout.lm_batch(share_prompts=True)`, packed
    rows: no padding to keep small).
    """
    rows = torch.as_tensor(rows, dtype=torch.long).cpu()
    if by_prompt:
        keys = rollout.prompt_index.cpu()[rows]
    else:
        keys = (rollout.prompt_mask.sum(-1) + rollout.response_present.sum(-1)).cpu()[rows]
    ordered = rows[torch.sort(keys, stable=True).indices]
    return [ordered[s:s + size] for s in range(0, len(ordered), size)]


def assemble_rollout(generations: Sequence[Generation], scores: Tensor, source_scores: dict[str, Tensor], *,
                     group_size: int, pad_id: int, prompts: Sequence[RLPrompt] | None = None) -> Rollout:
    """A Rollout (no log-probs yet) from generated responses and their scores, in generation order."""
    if any(len(g.response_ids) == 0 for g in generations):
        raise ValueError("a generation has no response tokens; max_new_tokens must be ≥ 1")
    prompt_ids = pad_right([g.prompt_ids for g in generations], pad_id)
    prompt_mask = pad_right([[1] * len(g.prompt_ids) for g in generations], 0)
    response_ids = pad_right([g.response_ids for g in generations], pad_id)
    response_mask = pad_right([[1] * len(g.response_ids) for g in generations], 0).float()
    sampler_logprobs = None
    if all(g.logprobs is not None for g in generations):
        sampler_logprobs = torch.zeros(response_mask.shape)
        for row, g in enumerate(generations):
            sampler_logprobs[row, :len(g.response_ids)] = torch.tensor(g.logprobs, dtype=torch.float32)
    gold = None
    if prompts is not None and all("task" in prompts[g.prompt_index].meta for g in generations):
        gold = torch.tensor([float(check(prompts[g.prompt_index].meta["task"], g.text)) for g in generations])
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                   response_mask=response_mask, scores=scores.float(),
                   source_scores={k: v.float() for k, v in source_scores.items()},
                   prompt_index=torch.tensor([g.prompt_index for g in generations], dtype=torch.long),
                   group_size=group_size, finished=torch.tensor([g.finished for g in generations]),
                   texts=tuple(g.text for g in generations), gold=gold, sampler_logprobs=sampler_logprobs)


def score_generations(reward: WeightedRewards, prompts: Sequence[RLPrompt],
                      generations: Sequence[Generation]) -> tuple[Tensor, dict[str, Tensor]]:
    """(combined (N,), {source: raw (N,)}) for the generated responses."""
    samples = [Sample(prompt_text(prompts[g.prompt_index].prompt), g.text,
                      {**prompts[g.prompt_index].meta, "conversation": prompts[g.prompt_index].prompt})
               for g in generations]
    combined, raw = reward.score_detailed(samples)
    return torch.tensor(combined, dtype=torch.float32), {k: torch.tensor(v, dtype=torch.float32)
                                                         for k, v in raw.items()}


@dataclass(frozen=True)
class ResponseOutputs:
    """The policy's outputs on a rollout's response tokens, (B, T) each."""

    logprobs: Tensor
    entropy: Tensor | None
    values: Tensor | None


def policy_outputs(module: nn.Module, rollout: Rollout, pad_id: int, *, temperature: float,
                   with_entropy: bool = False, with_values: bool = False, entropy_grad: bool = True,
                   batch: LMBatch | None = None, share_prompts: bool = False) -> ResponseOutputs:
    """One forward of a PolicyValueModel (possibly DDP-wrapped) over the rollout's rows (laid
    out by `Rollout.lm_batch(share_prompts=…)` unless `batch` is given)."""
    batch = rollout.lm_batch(pad_id, share_prompts=share_prompts) if batch is None else batch
    out = module(batch, temperature=temperature, with_entropy=with_entropy, with_values=with_values,
                 entropy_grad=entropy_grad)
    return ResponseOutputs(rollout.response_layout(out.logprobs, batch),
                           None if out.entropy is None else rollout.response_layout(out.entropy, batch),
                           None if out.values is None else rollout.response_layout(out.values, batch))


@torch.no_grad()
def with_logprobs(rollout: Rollout, module: nn.Module, reference: ReferencePolicy, *, pad_id: int,
                  temperature: float, micro_batch_size: int, with_values: bool = False,
                  chunk_size: int = DEFAULT_CHUNK, policy_pass: bool = True, share_prompts: bool = False) -> Rollout:
    """Fill old log-probs (and entropy, values) from the policy and ref log-probs from π_ref.

    policy_pass=False skips the policy forward (old log-probs and entropy stay None): for an
    on-policy update, whose training forward gives exactly these log-probs (see
    `recipes.online.update`). share_prompts: each micro-batch's rows of one prompt share it
    (`Rollout.lm_batch`)."""
    was_training = module.training
    module.eval()
    shape, device = rollout.response_mask.shape, rollout.response_mask.device
    filled: dict[str, Tensor] = {}

    def put(name: str, rows: Tensor, values: Tensor) -> None:
        if name not in filled:
            filled[name] = torch.zeros(shape, dtype=values.dtype, device=device)
        put_rows(filled[name], rows, values)

    for rows in micro_batches(rollout, range(rollout.num_rows), micro_batch_size, by_prompt=share_prompts):
        part = rollout.select(rows)
        batch = part.lm_batch(pad_id, share_prompts=share_prompts)
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
                  with_values: bool = False, chunk_size: int = DEFAULT_CHUNK, sampler: PolicySampler | None = None,
                  policy_pass: bool = True, baseline: SamplingConfig | None = None, share_prompts: bool = False,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Rollout:
    """Generate `sampling.n` responses per prompt, score them, and fill the log-probs.

    policy: the (unwrapped) PolicyValueModel. Generation uses `sampler` (synced with the
    policy first), else the policy's causal LM at `.model` directly, outside `autocast`
    (the precision context of the log-prob forwards: the engine's).
    baseline: also decode each prompt with these settings (ReMax: greedily) and score those
    responses in the same call as the samples, so a normalized reward treats both alike;
    their score per row is `Rollout.baseline_scores`. policy_pass, share_prompts: see `with_logprobs`.
    """
    prompt_convs = [p.prompt for p in prompts]
    if sampler is not None:
        sampler.sync()
    decode = sampler.generate if sampler is not None else functools.partial(generate, policy.model)
    generations = decode(tokenizer, prompt_convs, sampling)
    baseline_generations = decode(tokenizer, prompt_convs, baseline) if baseline is not None else []
    scores, source_scores = score_generations(reward, prompts, list(generations) + list(baseline_generations))
    n = len(generations)
    pad_id = pad_token_id(tokenizer)
    rollout = assemble_rollout(generations, scores[:n], {k: v[:n] for k, v in source_scores.items()},
                               group_size=sampling.n, pad_id=pad_id, prompts=prompts)
    if baseline is not None:
        rollout = dataclasses.replace(rollout, baseline_scores=scores[n:][rollout.prompt_index])
    rollout = rollout.to(next(policy.parameters()).device)
    with autocast():
        return with_logprobs(rollout, policy, reference, pad_id=pad_id, temperature=logprob_temperature(sampling),
                             micro_batch_size=micro_batch_size, with_values=with_values, chunk_size=chunk_size,
                             policy_pass=policy_pass, share_prompts=share_prompts)


def rollout_metrics(rollout: Rollout) -> dict[str, float]:
    """The per-step diagnostics every online recipe logs, with stable names."""
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
    if rollout.old_logprobs is not None and rollout.sampler_logprobs is not None:
        # The sampler μ (a server's engine) against the trainer's π_old on the same tokens, drawn from μ:
        # KL(μ ‖ π_old) per response ≈ Σ_t (log μ − log π_old), averaged over responses (nats).
        gap = (rollout.sampler_logprobs - rollout.old_logprobs) * mask
        m["sampler/kl"] = float(gap.sum(-1).mean())
        m["sampler/max_abs_logprob_diff"] = float(gap.abs().max())
    if rollout.entropy is not None:
        m["entropy"] = float(masked_mean(rollout.entropy, mask))
    if rollout.gold is not None:
        m["gold_accuracy"] = float(rollout.gold.mean())
    for name, counts in rollout.episode.items():
        m[f"episode/{name}"] = float(counts.float().mean())
    return m


def pack_left(x: Tensor, mask: Tensor) -> Tensor:
    """Each row's entries where `mask` is 1 moved, in order, to the front; 0 after them.

    x, mask: (B, T). Returns (B, T). A right-padded mask leaves x·mask unchanged; a holed one
    (a multi-turn loss mask: model turns between tool outputs) becomes right-padded, so the
    per-token recursions that need one (`kl_penalized_rewards`, `gae`, returns-to-go) run over
    the model's tokens as one sequence: a tool's output is part of the environment's step
    between two model tokens, not a token of its own. Inverse: `unpack_left`.
    """
    m = mask.bool()
    packed = torch.zeros_like(x)
    lengths = m.sum(-1, keepdim=True)
    front = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths
    return packed.masked_scatter(front, x[m])


def unpack_left(packed: Tensor, mask: Tensor) -> Tensor:
    """The inverse of `pack_left`: the first Σ_t mask entries of each row of `packed` (B, T)
    put back where `mask` (B, T) is 1; 0 elsewhere."""
    m = mask.bool()
    front = torch.arange(packed.shape[1], device=packed.device).unsqueeze(0) < m.sum(-1, keepdim=True)
    return torch.zeros_like(packed).masked_scatter(m, packed[front])
