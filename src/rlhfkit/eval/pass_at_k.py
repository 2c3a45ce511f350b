"""Accuracy from several samples per prompt: pass@k and majority vote (`rlhf eval --samples-per-prompt n`).

pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code", arXiv:2107.03374):
the chance that at least one of k samples is correct, estimated without bias from n ≥ k samples
of which c are correct,

    pass@k = 1 − C(n − c, k) / C(n, k) = 1 − Π_{i = n−c+1}^{n} (1 − k/i)      (1 when n − c < k)

per prompt, then averaged over prompts. The product form never builds a binomial coefficient, so
it stays exact in floating point for any n. pass@1 is the plain fraction c/n.

Majority vote (self-consistency): a prompt counts as right when the most frequent extracted
answer among its n samples is the correct one. Samples without an extractable answer do not
vote. Ties between answers go to the tied answer whose first vote came earliest in sample order
(sample order is fixed by the sampling seed, so the result is deterministic); a prompt whose
samples give no answer at all is wrong.

Intervals are bootstrap 95% percentile intervals over prompts (`eval.winrate.win_rate` on the
per-prompt values), as for exact match.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from rlhfkit.data.schemas import as_conversation
from rlhfkit.eval.winrate import win_rate
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.tasks.check import check, extract_answer
from rlhfkit.tasks.generate import Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with `c` correct among `n` samples: 1 − C(n−c, k)/C(n, k)."""
    if not 0 <= c <= n:
        raise ValueError(f"correct count must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_answer(answers: Sequence[Hashable | None]) -> Hashable | None:
    """The most frequent non-None answer; a tie goes to the answer seen first; None when none voted."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == top)


def interval_block(per_prompt: Sequence[float], *, n_boot: int, seed: int) -> dict[str, Any]:
    """{"mean", "ci_low", "ci_high", "n"}: the mean over prompts with its bootstrap interval."""
    wr = win_rate(per_prompt, n_boot=n_boot, seed=seed)
    return {"mean": wr.mean, "ci_low": wr.ci_low, "ci_high": wr.ci_high, "n": wr.n}


def majority_correct(correct: Sequence[bool], answers: Sequence[Hashable | None]) -> bool:
    """Whether the majority answer is right (a sample giving it is); False when nothing voted."""
    majority = majority_answer(answers)
    return majority is not None and bool(correct[list(answers).index(majority)])


def sample_scores(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[Hashable | None]],
                  ks: Sequence[int], *, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """pass@1, pass@k for each k in `ks` and majority-vote accuracy over prompts.

    correct[p][s]: whether sample s of prompt p is right; answers[p][s] its extracted
    (normalized) answer or None. Every prompt has the same number of samples n, and every k ≤ n.
    """
    if not correct:
        raise ValueError("no prompts to score")
    n = len(correct[0])
    if any(len(c) != n for c in correct) or any(len(a) != n for a in answers):
        raise ValueError(f"every prompt needs the same number of samples ({n})")
    pass_k = {str(k): interval_block([pass_at_k(n, sum(c), k) for c in correct], n_boot=n_boot, seed=seed)
              for k in sorted({1, *ks})}
    votes = [float(majority_correct(c, a)) for c, a in zip(correct, answers)]
    return {"samples_per_prompt": n, "prompts": len(correct), "pass_at_k": pass_k,
            "majority_vote": interval_block(votes, n_boot=n_boot, seed=seed)}


def sampled_accuracy(model, tokenizer, tasks: Sequence[Task], *, n: int, ks: Sequence[int], temperature: float,
                     max_new_tokens: int, batch_size: int, seed: int, n_boot: int) -> dict[str, Any]:
    """Sample `n` answers per checkable task, check each, and score them with `sample_scores`."""
    tasks = [t for t in tasks if t.checkable]
    if not tasks:
        raise ValueError("no checkable tasks to evaluate")
    gens = generate(model, tokenizer, [as_conversation(t.prompt) for t in tasks],
                    SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=n,
                                   batch_size=batch_size, seed=seed))
    groups = [(t, gens[i * n:(i + 1) * n]) for i, t in enumerate(tasks)]
    answers = [[extract_answer(t, g.text) for g in group] for t, group in groups]
    correct = [[check(t, g.text) for g in group] for t, group in groups]
    return {**sample_scores(correct, answers, ks, n_boot=n_boot, seed=seed), "temperature": temperature}
