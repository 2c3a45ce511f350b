"""Process rewards: a trained process reward model (PRM) as a `--reward prm:PATH` term.

The PRM gives each step k of a response (its non-empty lines, `tasks.step_labels.split_steps`)
p_k = P(the solution is right up to step k). Two ways to use the scores:

- a sequence reward (every recipe: GRPO, RLOO, best-of-n, ...): r = min_k p_k, the chance of
  its weakest step; a response with no step gets 0. `ProcessRewardSource.score` returns it.
- dense rewards (PPO): with m_0 = 0 and m_k = min(p_1, …, p_k), the token that ends step k
  gets r_k = m_k − m_{k−1} (`dense_step_rewards`). The first step's token gets p_1, a later
  step's token gets 0 unless it lowers the running minimum, and then the drop: Σ_k r_k =
  min_k p_k, the sequence reward, so the return from the first token is the same number as
  GRPO's reward and GAE sees *where* the solution went wrong. `process_token_rewards`
  replaces the PRM's share of the sequence score by these per-token rewards.

The token that ends step k is the first response token whose decoded prefix reaches the
step's last character (`step_end_tokens`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlhfkit.data.schemas import as_conversation
from rlhfkit.models.device import inference_device
from rlhfkit.models.process_reward import load_trained_process_reward_model, score_steps
from rlhfkit.rollout.rewards import Sample, WeightedRewards
from rlhfkit.tasks.step_labels import split_steps


def sequence_reward(step_probs: Sequence[float]) -> float:
    """min_k p_k; 0 for a response without steps."""
    return min(step_probs) if step_probs else 0.0


class ProcessRewardSource:
    """A trained PRM: `score` gives min_k p_k per response; the step probabilities of the last
    scored batch stay in `last` (responses, [p_1..p_K] each) for PPO's dense rewards."""

    def __init__(self, path: str, *, batch_size: int = 16, name: str = "prm") -> None:
        self.model, self.tokenizer = load_trained_process_reward_model(path)
        self.model.to(inference_device())
        self.batch_size, self.name = batch_size, name
        self.last: tuple[tuple[str, ...], list[list[float]]] = ((), [])

    def step_scores(self, samples: Sequence[Sample]) -> list[list[float]]:
        prompts = [s.meta.get("conversation") or as_conversation(s.prompt) for s in samples]
        steps = [[text for text, _ in split_steps(s.response)] for s in samples]
        return score_steps(self.model, self.tokenizer, prompts, steps, batch_size=self.batch_size)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        probs = self.step_scores(samples)
        self.last = (tuple(s.response for s in samples), probs)
        return [sequence_reward(p) for p in probs]


def dense_step_rewards(step_probs: Sequence[float]) -> list[float]:
    """r_k = m_k − m_{k−1}, m_0 = 0, m_k = min(p_1..p_k): [0.9, 0.95, 0.3] → [0.9, 0, −0.6]."""
    out, running = [], None
    for p in step_probs:
        low = p if running is None else min(running, p)
        out.append(low - (0.0 if running is None else running))
        running = low
    return out


def step_end_tokens(tokenizer, response_ids: Sequence[int], ends: Sequence[int]) -> list[int]:
    """For each character offset in `ends`, the first response token whose decoded prefix
    (special tokens skipped, as responses are decoded) is at least that long; the last token
    when none is."""
    lengths = [len(tokenizer.decode(list(response_ids[:j + 1]), skip_special_tokens=True))
               for j in range(len(response_ids))]
    out = []
    for end in ends:
        out.append(next((j for j, n in enumerate(lengths) if n >= end), len(response_ids) - 1))
    return out


def place_step_rewards(step_rewards: Sequence[Sequence[float]], step_tokens: Sequence[Sequence[int]],
                       shape: tuple[int, int]) -> Tensor:
    """(B, T) float32 rewards with step_rewards[b][k] added at (b, step_tokens[b][k])."""
    out = torch.zeros(shape, dtype=torch.float32)
    for b, (rewards, tokens) in enumerate(zip(step_rewards, step_tokens)):
        for r, t in zip(rewards, tokens):
            out[b, t] += r
    return out


def _process_sources(reward: WeightedRewards) -> list[tuple[ProcessRewardSource, float]]:
    found = []
    for source, weight in reward.sources:
        inner = getattr(source, "source", source)  # a second term of one kind is wrapped to rename it
        if isinstance(inner, ProcessRewardSource):
            found.append((inner, weight))
    return found


def process_token_rewards(reward: WeightedRewards, tokenizer, texts: Sequence[str], response_ids: Tensor,
                          response_mask: Tensor, scores: Tensor) -> tuple[Tensor, Tensor | None]:
    """(the scores without the PRM terms' share (B,), their dense per-token rewards (B, T) or
    None when the reward has no PRM term). With weight w, a row's share is w · min_k p_k and its
    dense rewards w · r_k sum to the same, so the return of every row is unchanged.

    texts, response_ids, response_mask: the rollout's rows, in the order they were scored.
    """
    sources = _process_sources(reward)
    if not sources:
        return scores, None
    dense = torch.zeros(response_mask.shape, dtype=torch.float32)
    rest = scores.detach().float().cpu().clone()
    ids = [[t for t, m in zip(row, mask) if m] for row, mask in zip(response_ids.tolist(), response_mask.tolist())]
    tokens = [step_end_tokens(tokenizer, row, [end for _, end in split_steps(text)]) for row, text in zip(ids, texts)]
    for source, weight in sources:
        responses, probs = source.last
        if responses != tuple(texts):
            raise ValueError(f"reward source {source.name!r}: its last scored batch is not this rollout's responses")
        rest -= weight * torch.tensor([sequence_reward(p) for p in probs])
        dense += weight * place_step_rewards([dense_step_rewards(p) for p in probs], tokens, tuple(dense.shape))
    return rest.to(scores.device), dense.to(response_mask.device)
