"""Multi-turn rollouts: generation interleaved with tool execution, as typed episodes.

    for each of the B = prompts × n episodes:  env.reset(prompt) → the first context (tokens)
    for turn in 1..max_turns, over the episodes still running, together:
        1. one model turn per episode, decoded in length-sorted batches from its exact context
           tokens (KV cache; the n samples of a prompt share the first turn's prefill);
        2. env.step(turn text) for every episode at once, each in its own thread, with a
           wall-clock limit: a step that raises ends its episode with reward 0 (`errors`), one
           still running at the limit is abandoned and its episode ends with reward 0 (`timeouts`);
        3. an observation is appended as a user turn rendered by the chat template.

An episode's tokens are exactly what the model read and wrote: the prompt, then its turns
(loss mask 1, the stop token included) interleaved with the tool turns (loss mask 0). Nothing
is re-tokenized, so the trained sequence is the sampled one. `episode_rollout` lays episodes
out as a `Rollout` whose `response_mask` is the loss mask and `response_attention_mask` marks
every real token; the online recipes then train on them unchanged.

A hung step's thread cannot be killed (Python threads cannot be): the Python tool's process
is killed by the sandbox at its own limit, and the calculator's work is bounded by design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rlhfkit.config import check
from rlhfkit.data.batches import pad_right
from rlhfkit.data.schemas import Message
from rlhfkit.data.tokenize import encode_prompt, pad_token_id, render_prompt
from rlhfkit.models.prepacked import prepacked_linears
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.ops.logprobs import DEFAULT_CHUNK
from rlhfkit.rollout.environments import ENVIRONMENTS, EnvConfig, Environment, StepResult, make_environment
from rlhfkit.rollout.generate import (
    PolicySampler,
    SamplingConfig,
    cache_argument,
    sampling_processors,
    shared_prompt_cache,
)
from rlhfkit.rollout.prompts import RLPrompt
from rlhfkit.rollout.rollout import Rollout, logprob_temperature, with_logprobs

COUNTS = ("turns", "tool_calls", "errors", "timeouts", "truncated")
_MARK = "\x1fturn-end\x1f"


@dataclass(frozen=True)
class EpisodeConfig:
    """How episodes run: the environment, its tools' limits, and the context budget."""

    env: str
    env_cfg: EnvConfig = EnvConfig()
    step_timeout_s: float = 30.0   # wall clock of one env.step, all its tool calls together
    max_length: int = 1024         # prompt + every turn, in tokens; an episode that would pass it ends

    def __post_init__(self) -> None:
        check(self.env in ENVIRONMENTS, f"unknown environment '{self.env}' (choose from {sorted(ENVIRONMENTS)})")
        check(self.env_cfg.max_turns >= 1, "max_turns must be ≥ 1")
        check(self.env_cfg.tool_timeout_s > 0 and self.step_timeout_s > 0, "tool and step timeouts must be > 0")


@dataclass
class Episode:
    """One episode as tokens: `response_ids` are the model's turns and the tool turns after the
    prompt, `loss_mask` (same length) is 1 on the model's tokens; `counts` has COUNTS."""

    prompt_index: int
    env: Environment
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    reward: float = 0.0
    done: bool = False
    finished: bool = False         # the last model turn ended with a stop token
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def end(self, reward: float, count: str | None = None) -> None:
        self.reward, self.done = reward, True
        if count is not None:
            self.counts[count] += 1


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a model turn: eos and ChatML's <|im_end|> where the vocabulary has it.
    Narrower than `generate.stop_token_ids` on purpose: a turn that ends must end with the token
    the chat template closes a turn with (an unfinished one gets `stop_ids(...)[0]` appended) so
    that the tool's turn follows as the template renders it; <|endoftext|> is not that token."""
    ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    return sorted(i for i in ids if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id)


def tool_turn_ids(tokenizer, observation: str) -> list[int]:
    """The tokens between the end-of-turn token of a model turn and the next model turn: the
    observation as a user turn, then the assistant's generation prompt, as the chat template
    renders them (ChatML: "\\n<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n")."""
    text = render_prompt(tokenizer, (Message("user", "."), Message("assistant", _MARK), Message("user", observation)))
    turn_end = _MARK + (tokenizer.eos_token or "")
    if turn_end not in text:
        raise ValueError("the chat template does not end an assistant turn with the eos token; "
                         "multi-turn environments need one that does")
    return tokenizer(text[text.index(turn_end) + len(turn_end):], add_special_tokens=False)["input_ids"]


@torch.no_grad()
def decode_turns(model: nn.Module, tokenizer, contexts: Sequence[list[int]], cfg: SamplingConfig, *,
                 share: Sequence[int] | None = None) -> list[tuple[list[int], bool]]:
    """One model turn per context (token ids): (sampled ids, the stop token included when it
    came; True when it came) in context order. Rows are left-padded in length-sorted batches of
    `cfg.batch_size`; rows with equal `share` keys (identical contexts) share one prefill.
    Sampling follows `rollout.generate` (its processors, seeded per batch from cfg.seed)."""
    device = next(model.parameters()).device
    pad, stops = pad_token_id(tokenizer), stop_ids(tokenizer)
    order = sorted(range(len(contexts)), key=lambda i: len(contexts[i]))
    gen = torch.Generator().manual_seed(cfg.seed)
    out: list[tuple[list[int], bool]] = [([], False)] * len(contexts)
    was_training = model.training
    model.eval()
    with prepacked_linears(model, rows=min(cfg.batch_size, len(contexts))):
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start:start + cfg.batch_size]
            width = max(len(contexts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, i in enumerate(rows):
                ids[r, width - len(contexts[i]):] = torch.tensor(contexts[i])
                attn[r, width - len(contexts[i]):] = 1
            ids, attn = ids.to(device), attn.to(device)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True,
                          do_sample=False, temperature=None, top_p=None, top_k=None)
            if share is not None:
                cache = shared_prompt_cache(model, ids, attn, [share[i] for i in rows])
                if cache is not None:
                    kwargs[cache_argument(model)] = cache
            if cfg.temperature > 0:
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
                kwargs["logits_processor"] = sampling_processors(cfg, torch.Generator().manual_seed(seed))
            new = model.generate(input_ids=ids, attention_mask=attn, **kwargs)[:, width:].cpu().tolist()
            for r, i in enumerate(rows):
                stop = next((pos for pos, t in enumerate(new[r]) if t in stops), None)
                out[i] = (new[r] if stop is None else new[r][:stop + 1], stop is not None)
    model.train(was_training)
    return out


def contained_steps(envs: Sequence[Environment], texts: Sequence[str],
                    timeout_s: float) -> list[StepResult | BaseException | None]:
    """env.step(text) for every pair at once, each in a daemon thread; after `timeout_s` of wall
    clock in all, a step still running gives None (abandoned), one that raised its exception."""
    results: list[StepResult | BaseException | None] = [None] * len(envs)

    def run(i: int) -> None:
        try:
            results[i] = envs[i].step(texts[i])
        except Exception as e:  # the episode is contained: it ends with reward 0, counted in `errors`
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"env-step-{i}") for i in range(len(envs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [None if t.is_alive() else results[i] for i, t in enumerate(threads)]


def run_episodes(model: nn.Module, tokenizer, prompts: Sequence[RLPrompt], cfg: EpisodeConfig,
                 sampling: SamplingConfig, *,
                 make_env: Callable[[str, EnvConfig], Environment] = make_environment) -> list[Episode]:
    """`sampling.n` episodes per prompt (prompt i's at i·n … i·n+n−1), each up to max_turns model
    turns of ≤ sampling.max_new_tokens tokens, generation batched across episodes each turn."""
    stops = set(stop_ids(tokenizer))
    episodes = []
    for i, prompt in enumerate(prompts):
        for _ in range(sampling.n):
            env = make_env(cfg.env, cfg.env_cfg)
            episodes.append(Episode(i, env, encode_prompt(tokenizer, env.reset(prompt))))
    for turn in range(cfg.env_cfg.max_turns):
        for ep in episodes:
            if not ep.done and len(ep.context) >= cfg.max_length:
                ep.end(0.0, "truncated")
        active = [ep for ep in episodes if not ep.done]
        if not active:
            break
        share = [ep.prompt_index for ep in active] if turn == 0 else None
        turn_sampling = dataclasses.replace(sampling, n=1, seed=sampling.seed * 1009 + turn)
        outs = decode_turns(model, tokenizer, [ep.context for ep in active], turn_sampling, share=share)
        texts = []
        for ep, (sampled, finished) in zip(active, outs):
            ids = sampled[:cfg.max_length - len(ep.context)]
            ep.response_ids += ids
            ep.loss_mask += [1] * len(ids)
            ep.finished, ep.counts["turns"] = finished and len(ids) == len(sampled), ep.counts["turns"] + 1
            texts.append(tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True).strip())
            ep.texts.append(texts[-1])
        for ep, result in zip(active, contained_steps([ep.env for ep in active], texts, cfg.step_timeout_s)):
            if result is None:
                ep.end(0.0, "timeouts")
            elif isinstance(result, BaseException):
                ep.end(0.0, "errors")
            else:
                ep.counts["tool_calls"] += int(result.info.get("tool_calls", 0))
                if result.done or result.observation is None:
                    ep.end(float(result.reward))
                    continue
                tool = ([] if ep.finished else [stop_ids(tokenizer)[0]]) + tool_turn_ids(tokenizer, result.observation)
                ep.response_ids += tool
                ep.loss_mask += [0] * len(tool)
                ep.texts.append(f"[tool] {result.observation}")
    for ep in episodes:
        if not ep.done:  # the runner's turn limit came before the environment's
            ep.end(0.0, "truncated")
    return episodes


def episode_rollout(episodes: Sequence[Episode], *, group_size: int, pad_id: int) -> Rollout:
    """The episodes as a Rollout (no log-probs yet): response_mask = the loss mask (model
    tokens), response_attention_mask = every real token; scores and gold = the episode rewards
    (the task checker's verdict); `episode` = the per-episode counts (B,) each. A tool turn
    that ends an episode is trimmed: no row ends in tokens nothing is trained on."""
    rows = []
    for ep in episodes:
        last = max(j for j, m in enumerate(ep.loss_mask) if m) + 1 if any(ep.loss_mask) else 0
        if last == 0:
            raise ValueError("an episode has no model tokens; max_new_tokens must be ≥ 1")
        rows.append((ep.response_ids[:last], ep.loss_mask[:last]))
    rewards = torch.tensor([ep.reward for ep in episodes], dtype=torch.float32)
    return Rollout(
        prompt_ids=pad_right([ep.prompt_ids for ep in episodes], pad_id),
        prompt_mask=pad_right([[1] * len(ep.prompt_ids) for ep in episodes], 0),
        response_ids=pad_right([ids for ids, _ in rows], pad_id),
        response_mask=pad_right([mask for _, mask in rows], 0).float(),
        response_attention_mask=pad_right([[1] * len(ids) for ids, _ in rows], 0).float(),
        scores=rewards, source_scores={"env": rewards.clone()},
        prompt_index=torch.tensor([ep.prompt_index for ep in episodes], dtype=torch.long),
        group_size=group_size, finished=torch.tensor([ep.finished for ep in episodes]),
        texts=tuple("\n".join(ep.texts) for ep in episodes), gold=rewards.clone(),
        episode={k: torch.tensor([ep.counts[k] for ep in episodes], dtype=torch.float32) for k in COUNTS})


def build_episode_rollout(policy: nn.Module, reference: ReferencePolicy, tokenizer, prompts: Sequence[RLPrompt],
                          cfg: EpisodeConfig, sampling: SamplingConfig, *, micro_batch_size: int,
                          with_values: bool = False, chunk_size: int = DEFAULT_CHUNK,
                          sampler: PolicySampler | None = None, policy_pass: bool = True,
                          share_prompts: bool = False,
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                          ) -> Rollout:
    """`build_rollout` for episodes: run them with `sampler` (synced first; else the policy's
    causal LM at `.model`), lay them out, fill the log-probs (model tokens only)."""
    if sampler is not None:
        sampler.sync()
    model = sampler.model if sampler is not None else policy.model
    episodes = run_episodes(model, tokenizer, prompts, cfg, sampling)
    pad_id = pad_token_id(tokenizer)
    rollout = episode_rollout(episodes, group_size=sampling.n, pad_id=pad_id)
    rollout = rollout.to(next(policy.parameters()).device)
    with autocast():
        return with_logprobs(rollout, policy, reference, pad_id=pad_id, temperature=logprob_temperature(sampling),
                             micro_batch_size=micro_batch_size, with_values=with_values, chunk_size=chunk_size,
                             policy_pass=policy_pass, share_prompts=share_prompts)
