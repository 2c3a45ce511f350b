"""Diversity of a set of responses: the numbers that catch mode collapse.

Responses are split into words on whitespace, case kept (so the numbers do not depend on a
tokenizer); lengths in tokens are added when a tokenizer is given.

  * distinct-n: distinct n-grams / total n-grams, pooled over all responses (corpus level).
    1.0 when no n-gram repeats anywhere; falls toward 1/len as responses collapse to one
    string. 0.0 when no response has n words.
  * self-similarity: the mean, over pairs of responses, of the Jaccard overlap
    |G_i ∩ G_j| / |G_i ∪ G_j| of their n-gram sets G (all orders 1..max_n together).
    Chosen over self-BLEU because it is symmetric, bounded in [0, 1], and exactly 1.0 for
    identical responses and 0.0 for responses sharing no word. Two empty responses count
    as identical (1.0). Over `max_pairs` pairs, a seeded random sample of pairs is used.
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rlhfkit.data.errors import DataError


def words(text: str) -> list[str]:
    return text.split()


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _check_responses(responses: Sequence[str]) -> None:
    if isinstance(responses, str):
        raise DataError("expected a list of responses, got one string", field="responses")
    if len(responses) == 0:
        raise DataError("no responses to measure", field="responses")
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise DataError(f"expected text, got {type(r).__name__}", field=f"responses[{i}]")


def distinct_n(responses: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over all `responses` (words split on whitespace)."""
    _check_responses(responses)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [g for r in responses for g in ngrams(words(r), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _gram_set(text: str, max_n: int) -> frozenset[tuple[str, ...]]:
    tokens = words(text)
    return frozenset(g for n in range(1, max_n + 1) for g in ngrams(tokens, n))


def self_similarity(responses: Sequence[str], *, max_n: int = 3, max_pairs: int = 20_000,
                    seed: int = 0) -> float:
    """Mean pairwise Jaccard overlap of 1..max_n-gram sets (see module docstring).
    A single response has nothing to be similar to: 0.0."""
    _check_responses(responses)
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")
    sets = [_gram_set(r, max_n) for r in responses]
    m = len(sets)
    n_pairs = m * (m - 1) // 2
    if n_pairs == 0:
        return 0.0
    if n_pairs <= max_pairs:
        pairs: Any = itertools.combinations(range(m), 2)
    else:
        rng = random.Random(seed)
        pairs = (tuple(rng.sample(range(m), 2)) for _ in range(max_pairs))
    total, count = 0.0, 0
    for i, j in pairs:
        union = len(sets[i] | sets[j])
        total += len(sets[i] & sets[j]) / union if union else 1.0
        count += 1
    return total / count


@dataclass(frozen=True)
class DiversityReport:
    """Diversity and length of one set of responses (e.g. one model's outputs on a prompt set).

    `distinct[n]` is distinct-n; token lengths are None without a tokenizer.
    """

    n_responses: int
    distinct: dict[int, float] = field(hash=False)
    self_similarity: float
    mean_words: float
    median_words: float
    mean_tokens: float | None = None
    median_tokens: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_responses": self.n_responses}
        out.update({f"distinct_{n}": v for n, v in self.distinct.items()})
        out.update(self_similarity=self.self_similarity, mean_words=self.mean_words,
                   median_words=self.median_words, mean_tokens=self.mean_tokens,
                   median_tokens=self.median_tokens)
        return out


def _token_count(tokenizer: Any, text: str) -> int:
    if hasattr(tokenizer, "encode"):
        try:
            return len(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:  # a plain tokenizers.Tokenizer, or a custom encode(text)
            encoded = tokenizer.encode(text)
            return len(getattr(encoded, "ids", encoded))
    if callable(tokenizer):
        return len(tokenizer(text))
    raise TypeError("tokenizer must have .encode(text) or be a callable text -> tokens")


def diversity_report(responses: Sequence[str], *, tokenizer: Any = None,
                     ns: Sequence[int] = (1, 2, 3), self_similarity_max_n: int = 3,
                     seed: int = 0) -> DiversityReport:
    """distinct-n for each n in `ns`, self-similarity, and mean/median length in words (and
    in tokens of `tokenizer`, special tokens excluded, when one is given)."""
    _check_responses(responses)
    word_lengths = [len(words(r)) for r in responses]
    token_lengths = ([_token_count(tokenizer, r) for r in responses]
                     if tokenizer is not None else None)
    return DiversityReport(
        n_responses=len(responses),
        distinct={n: distinct_n(responses, n) for n in ns},
        self_similarity=self_similarity(responses, max_n=self_similarity_max_n, seed=seed),
        mean_words=statistics.fmean(word_lengths),
        median_words=float(statistics.median(word_lengths)),
        mean_tokens=statistics.fmean(token_lengths) if token_lengths else None,
        median_tokens=float(statistics.median(token_lengths)) if token_lengths else None)


def diversity_numbers(samples_per_prompt: Sequence[Sequence[str]], greedy: Sequence[str], tokenizer=None,
                      *, seed: int = 0) -> dict[str, Any]:
    """distinct-n over all samples, mean within-prompt self-similarity of the samples, and the
    self-similarity of the greedy answers across prompts."""
    pooled = [s for group in samples_per_prompt for s in group]
    out: dict[str, Any] = {"n_prompts": len(samples_per_prompt), "n_samples": len(pooled)}
    if pooled:
        report = diversity_report(pooled, tokenizer=tokenizer, seed=seed).to_dict()
        out.update({k: v for k, v in report.items() if k.startswith("distinct_")})
        out["sample_mean_tokens"] = report["mean_tokens"]
        groups = [g for g in samples_per_prompt if len(g) >= 2]
        out["within_prompt_self_similarity"] = (statistics.fmean(self_similarity(g, seed=seed) for g in groups)
                                                if groups else None)
    if len(greedy) >= 2:
        out["across_prompt_self_similarity"] = self_similarity(list(greedy), seed=seed)
    return out
