"""Candidates of a round: k samples per prompt from the current policy, then the pairs to compare.

Records (one JSON object per line):

    samples.jsonl      {"index", "task_id", "prompt", "responses": [k texts]}
    comparisons.jsonl  {"id", "index", "task_id", "prompt", "a", "b"}

`index` points into the loop's prompt pool, which holds what a checker needs (the demo task,
an `answer` or `tests`), so the records stay plain JSON.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from rlhfkit.data.schemas import Conversation
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.rollout.prompts import RLPrompt


def prompt_window(pool: Sequence[RLPrompt], start: int, count: int, seed: int) -> list[int]:
    """Indices into `pool` at positions [start, start + count) of its shuffled passes: rounds that
    take consecutive windows see fresh prompts until the pool is used up (then a new pass)."""
    order: list[int] = []
    passes = 0
    while len(order) < start + count:
        idx = list(range(len(pool)))
        random.Random(f"loop-prompts/{seed}/{passes}").shuffle(idx)
        order += idx
        passes += 1
    return order[start: start + count]


def conversation_dicts(prompt: Conversation) -> list[dict[str, str]]:
    return [m.to_dict() for m in prompt]


def sample_candidates(model, tokenizer, pool: Sequence[RLPrompt], indices: Sequence[int], *, k: int,
                      temperature: float, max_new_tokens: int, seed: int, batch_size: int = 32,
                      progress: bool = True) -> list[dict[str, Any]]:
    """k responses per prompt (temperature sampling, KV-cached batched decoding)."""
    gens = generate(model, tokenizer, [pool[i].prompt for i in indices],
                    SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=k, seed=seed,
                                   batch_size=batch_size), progress=progress)
    return [{"index": i, "task_id": pool[i].id, "prompt": conversation_dicts(pool[i].prompt),
             "responses": [g.text for g in gens[j * k:(j + 1) * k]]} for j, i in enumerate(indices)]


def _distinct(responses: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(r for r in responses if r.strip()))


def select_pairs(samples: Sequence[dict[str, Any]], *, per_prompt: int, selection: str, round: int, seed: int,
                 decided: Callable[[dict[str, Any], str, str], bool] | None = None,
                 uncertainty: Callable[[list[tuple[dict[str, Any], str, str]]], list[float]] | None = None,
                 ) -> list[dict[str, Any]]:
    """At most `per_prompt` pairs of distinct responses per prompt.

    random: uniformly among the k(k−1)/2 pairs. decided_first: pairs `decided(sample, a, b)`
    says the feedback can decide come first (e.g. one right and one wrong answer for the
    exact checkers), the rest after, each group in random order. uncertain: the pairs with
    the largest `uncertainty` (e.g. a reward-model ensemble's disagreement) come first.
    """
    rng = random.Random(f"loop-pairs/{seed}/{round}")
    per_sample = []
    for s in samples:
        combos = list(itertools.combinations(_distinct(s["responses"]), 2))
        rng.shuffle(combos)
        per_sample.append([(s, a, b) for a, b in combos])
    if selection == "decided_first":
        if decided is None:
            raise ValueError("decided_first needs a `decided` function")
        per_sample = [sorted(c, key=lambda t: not decided(*t)) for c in per_sample]   # stable: random within
    elif selection == "uncertain":
        if uncertainty is None:
            raise ValueError("uncertain needs an `uncertainty` function")
        flat = [t for c in per_sample for t in c]
        score = dict(zip(map(id, flat), uncertainty(flat))) if flat else {}
        per_sample = [sorted(c, key=lambda t: -score[id(t)]) for c in per_sample]
    elif selection != "random":
        raise ValueError(f"unknown pair selection {selection!r}")
    out = []
    for s_pairs in per_sample:
        for s, a, b in s_pairs[:per_prompt]:
            out.append({"id": f"r{round}-{len(out):05d}", "index": s["index"], "task_id": s["task_id"],
                        "prompt": s["prompt"], "a": a, "b": b})
    return out


def ensemble_disagreement(scores_a: torch.Tensor, scores_b: torch.Tensor) -> list[float]:
    """Uncertainty of each pair from reward heads' scores (E, N): the spread of the heads'
    margins r_a − r_b when there are several heads (epistemic), else closeness to a coin flip
    (−|r_a − r_b|)."""
    margin = scores_a - scores_b
    if margin.shape[0] > 1:
        return margin.std(dim=0).tolist()
    return (-margin.abs()[0]).tolist()
