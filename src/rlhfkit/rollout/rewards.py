"""Reward sources behind one small protocol, and their weighted combination.

Every source maps a batch of (prompt, response, meta) samples to one float each:

    RewardSource.score(samples) -> list[float]

Sources here: `WeightedRewards` (several sources, weights, per-source running
normalization), `ClassifierReward` (any Hugging Face sequence classifier, e.g. toxicity as
a negative reward) and `FunctionReward` (any per-sample function, e.g. a task checker).
Rule verifiers and sandboxed code execution live in `rlhfkit.rollout.verifiers`; the gold
check and a trained reward model (`GoldReward`, `RewardModelSource`), and the `--reward`
spec that combines sources, in `rlhfkit.rollout.reward_spec`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Sample:
    """One response to score, with what a verifier needs to check it."""

    prompt: str                                                 # the prompt text the policy saw
    response: str                                               # the policy's response text
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False)  # answer, tests, task id


@runtime_checkable
class RewardSource(Protocol):
    """Anything that scores a batch of samples, one float per sample."""

    name: str

    def score(self, samples: Sequence[Sample]) -> list[float]: ...


class FunctionReward:
    """A reward source from a per-sample function, e.g. a task's own checker:

        FunctionReward("gold", lambda s: float(check(s.meta["task"], s.response)))
    """

    def __init__(self, name: str, fn: Callable[[Sample], float]) -> None:
        self.name = name
        self.fn = fn

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [float(self.fn(s)) for s in samples]


class RunningMoments:
    """Running mean and (Bessel-corrected) variance of a stream of scalars.

    Batches are merged with the parallel update of Chan et al.: for the state (n_a, μ_a, M2_a)
    and a batch (n_b, μ_b, M2_b), with δ = μ_b − μ_a and n = n_a + n_b,

        μ  = μ_a + δ · n_b / n
        M2 = M2_a + M2_b + δ² · n_a · n_b / n,          var = M2 / (n − 1).

    M2 is the sum of squared deviations from the mean; merging this way stays accurate where
    accumulating Σx and Σx² would cancel catastrophically.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: Sequence[float]) -> None:
        n_b = len(values)
        if n_b == 0:
            return
        mean_b = math.fsum(values) / n_b
        m2_b = math.fsum((x - mean_b) ** 2 for x in values)
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n

    @property
    def var(self) -> float:
        return self.m2 / (self.count - 1) if self.count > 1 else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalize(self, values: Sequence[float], eps: float = 1e-8) -> list[float]:
        """(x − μ) / max(σ, eps) with the current moments."""
        scale = max(self.std, eps)
        return [(x - self.mean) / scale for x in values]

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        missing = {"count", "mean", "m2"} - set(state)
        if missing:
            raise ValueError(f"RunningMoments.load_state_dict: missing keys {sorted(missing)}")
        if state["count"] < 0 or state["m2"] < 0:
            raise ValueError(f"RunningMoments.load_state_dict: invalid state {dict(state)}")
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def _checked_scores(source: RewardSource, samples: Sequence[Sample]) -> list[float]:
    scores = [float(s) for s in source.score(samples)]
    if len(scores) != len(samples):
        raise ValueError(f"reward source {source.name!r} returned {len(scores)} scores "
                         f"for {len(samples)} samples")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ValueError(f"reward source {source.name!r} returned non-finite scores at "
                         f"positions {bad[:10]}")
    return scores


class WeightedRewards:
    """r = Σ_k w_k · f_k(r_k): several reward sources combined into one.

    With `normalize`, f_k(x) = (x − μ_k)/σ_k where μ_k, σ_k are running moments of source k
    over every batch seen so far, this batch included (so the first batch is normalized by
    its own statistics). This puts sources on different scales (a reward model's logits, a
    0/1 verifier, a length penalty) on a common one before the weights apply. Without it
    f_k is the identity. The moments are part of `state_dict` so a resumed run continues
    with the same normalization.
    """

    def __init__(self, sources: Sequence[tuple[RewardSource, float]], normalize: bool = False,
                 *, name: str = "weighted", eps: float = 1e-8) -> None:
        if not sources:
            raise ValueError("WeightedRewards needs at least one (source, weight)")
        names = [s.name for s, _ in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"WeightedRewards: source names must be unique; repeated: {duplicates}")
        for source, weight in sources:
            if not math.isfinite(weight):
                raise ValueError(f"WeightedRewards: weight of {source.name!r} is {weight}")
        self.name = name
        self.sources = list(sources)
        self.normalize = normalize
        self.eps = eps
        self.moments = {n: RunningMoments() for n in names} if normalize else {}

    def score_detailed(
            self, samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        """(combined reward per sample, {source name: raw scores}) — the raw ones for logging."""
        raw: dict[str, list[float]] = {}
        combined = [0.0] * len(samples)
        for source, weight in self.sources:
            scores = _checked_scores(source, samples)
            raw[source.name] = scores
            if self.normalize:
                moments = self.moments[source.name]
                moments.update(scores)
                scores = moments.normalize(scores, self.eps)
            combined = [c + weight * s for c, s in zip(combined, scores)]
        return combined, raw

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return self.score_detailed(samples)[0]

    def state_dict(self) -> dict[str, Any]:
        return {"moments": {n: m.state_dict() for n, m in self.moments.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("moments", {})
        if set(saved) != set(self.moments):
            raise ValueError(f"WeightedRewards.load_state_dict: saved sources {sorted(saved)} "
                             f"do not match these {sorted(self.moments)}")
        for n, moments in self.moments.items():
            moments.load_state_dict(saved[n])


class ClassifierReward:
    """sign · P(label | text) from any Hugging Face sequence classifier.

    `output="prob"` (default) scores with the probability of `label`: softmax over the
    labels, or a sigmoid of that label's logit when the model is multi-label
    (`config.problem_type == "multi_label_classification"`, as most toxicity classifiers are)
    or has a single output. Probabilities are bounded in [0, 1], which keeps one confident
    classifier from dominating a weighted sum. `output="logit"` uses the raw logit instead.
    Use sign=-1 for a penalty (e.g. toxicity).

    The text is the response alone, or (prompt, response) as a text pair when
    `include_prompt`. The model is put in eval mode and run without gradients, in batches of
    `batch_size`, truncated to `max_length` tokens.
    """

    def __init__(self, model, tokenizer, *, label: int | str, sign: float = 1.0,
                 batch_size: int = 16, max_length: int = 512, output: str = "prob",
                 include_prompt: bool = False, name: str | None = None) -> None:
        if output not in ("prob", "logit"):
            raise ValueError(f"ClassifierReward: output must be 'prob' or 'logit', got {output!r}")
        if batch_size < 1 or max_length < 1:
            raise ValueError("ClassifierReward: batch_size and max_length must be >= 1")
        if tokenizer.pad_token_id is None:
            raise ValueError("ClassifierReward: the tokenizer has no pad token; set one "
                             "(e.g. tokenizer.pad_token = tokenizer.eos_token)")
        config = model.config
        num_labels = config.num_labels
        if isinstance(label, str):
            label2id = dict(config.label2id or {})
            if label not in label2id:
                raise ValueError(f"ClassifierReward: label {label!r} not in the model's labels "
                                 f"{sorted(label2id)}")
            label = int(label2id[label])
        if not 0 <= label < num_labels:
            raise ValueError(f"ClassifierReward: label index {label} out of range for "
                             f"{num_labels} labels")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.label = label
        self.sign = float(sign)
        self.batch_size = batch_size
        self.max_length = max_length
        self.output = output
        self.include_prompt = include_prompt
        self.sigmoid = num_labels == 1 or config.problem_type == "multi_label_classification"
        label_name = (config.id2label or {}).get(label, str(label))
        self.name = name or f"classifier:{label_name}"

    @torch.inference_mode()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start:start + self.batch_size]
            texts = [s.response for s in chunk]
            # A text pair puts the prompt in the first segment, as pair classifiers expect.
            args = ([s.prompt for s in chunk], texts) if self.include_prompt else (texts,)
            enc = self.tokenizer(*args, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            logits = self.model(**enc).logits.float()                          # (b, num_labels)
            if self.output == "logit":
                values = logits[:, self.label]
            elif self.sigmoid:
                values = torch.sigmoid(logits[:, self.label])
            else:
                values = torch.softmax(logits, dim=-1)[:, self.label]
            scores.extend((self.sign * values).tolist())
        return scores
