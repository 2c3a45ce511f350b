"""KL of a policy to its reference, measured on the policy's own samples.

    KL(π ‖ π_ref) = E_{x, y ~ π(·|x)} [ Σ_t log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t) ]

in nats per response. Only sampled tokens are scored, so each response gives one
single-sample estimate: the k1 sum Σ_t (log π − log π_ref) is unbiased for the sequence KL
(it can be negative for one response; the mean over many is not), and the per-token k3
estimator (`rlhfkit.ops.kl`) is reported beside it as a low-variance, never-negative check.

The estimate is only a KL when the responses were sampled from π itself: temperature 1, no
top-p / top-k truncation. The log-probs are scored at temperature 1 on exactly the token ids
that were sampled (no decode → re-encode round trip, which can change the tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from rlhfkit.config import ConfigError
from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.eval.winrate import bootstrap_means
from rlhfkit.ops.kl import kl_k1, kl_k3
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.ops.stats import masked_mean, masked_sum


@dataclass(frozen=True)
class KLEstimate:
    """KL(π ‖ π_ref) in nats per response (k1, with a bootstrap interval over responses),
    per token (k1 and k3), and what it was measured on."""

    mean: float
    ci_low: float
    ci_high: float
    per_token: float
    per_token_k3: float
    n_responses: int
    n_tokens: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.ci_low, "ci_high": self.ci_high, "per_token": self.per_token,
                "per_token_k3": self.per_token_k3, "n_responses": self.n_responses, "n_tokens": self.n_tokens}


def response_batch(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, labels), each (B, T), for (prompt_ids, response_ids)
    pairs. labels[b, t] = input_ids[b, t + 1] where that next token is a response token, else
    IGNORE_INDEX: only the response is scored, each token from the positions before it."""
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, response) in enumerate(sequences):
        if not prompt:
            raise ValueError(f"sequence {row}: an empty prompt leaves the first response token unscored")
        ids = list(prompt) + list(response)
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = 1
        if response:
            start = len(prompt) - 1
            labels[row, start:start + len(response)] = torch.tensor(list(response), dtype=torch.long)
    return input_ids, attention_mask, labels


@torch.no_grad()
def response_token_logprobs(model, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_id: int,
                            batch_size: int = 8) -> list[Tensor]:
    """log π(y_t | x, y_<t) of every response token, one (len(response),) tensor per sequence."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[Tensor] = []
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            input_ids, attention_mask, labels = response_batch(chunk, pad_id)
            logps = gather_logprobs(model, input_ids.to(device), labels.to(device),
                                    attention_mask=attention_mask.to(device)).cpu()
            mask = labels != IGNORE_INDEX
            out.extend(logps[row][mask[row]] for row in range(len(chunk)))
    finally:
        model.train(was_training)
    return out


def kl_from_logprobs(policy_logps: Sequence[Tensor], reference_logps: Sequence[Tensor], *,
                     confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> KLEstimate:
    """Sequence and per-token KL estimates from per-response token log-probs.

    policy_logps[i], reference_logps[i]: (T_i,) log-probs of response i's tokens under π and
    π_ref (sampled from π). Padded into (N, T_max) with a mask; the k1 sums per response
    give the mean and its bootstrap interval, k1 and k3 averaged over all tokens the per-token
    numbers. Empty responses count as 0 nats.
    """
    if len(policy_logps) != len(reference_logps) or not policy_logps:
        raise ValueError(f"need the same, non-zero number of policy and reference responses "
                         f"(got {len(policy_logps)} and {len(reference_logps)})")
    width = max(1, max(len(x) for x in policy_logps))
    logp = torch.zeros(len(policy_logps), width, dtype=torch.float64)
    ref = torch.zeros_like(logp)
    mask = torch.zeros_like(logp, dtype=torch.bool)
    for i, (a, b) in enumerate(zip(policy_logps, reference_logps)):
        if a.shape != b.shape:
            raise ValueError(f"response {i}: {tuple(a.shape)} policy log-probs but {tuple(b.shape)} reference ones")
        logp[i, :len(a)], ref[i, :len(b)], mask[i, :len(a)] = a.double(), b.double(), True
    per_response = masked_sum(kl_k1(logp, ref), mask, dim=-1)  # (N,)
    values = per_response.numpy()
    alpha = 1.0 - confidence
    boot = bootstrap_means(values, n_boot, np.random.default_rng(seed))
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    n_tokens = int(mask.sum())
    return KLEstimate(
        mean=float(values.mean()), ci_low=float(low), ci_high=float(high),
        per_token=float(masked_mean(kl_k1(logp, ref), mask)) if n_tokens else 0.0,
        per_token_k3=float(masked_mean(kl_k3(logp, ref), mask)) if n_tokens else 0.0,
        n_responses=len(values), n_tokens=n_tokens)


def policy_reference_kl(policy, reference, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                        pad_id: int, batch_size: int = 8, confidence: float = 0.95, seed: int = 0) -> KLEstimate:
    """KL(π ‖ π_ref) on (prompt_ids, response_ids) sampled from `policy` (see module docstring).
    Both models must share the tokenizer."""
    vocab = [getattr(getattr(m, "config", None), "vocab_size", None) for m in (policy, reference)]
    if None not in vocab and vocab[0] != vocab[1]:
        raise ConfigError(f"the policy and the reference have different vocabularies ({vocab[0]} vs "
                          f"{vocab[1]} tokens): a KL between them needs a shared tokenizer")
    mine = response_token_logprobs(policy, sequences, pad_id=pad_id, batch_size=batch_size)
    theirs = response_token_logprobs(reference, sequences, pad_id=pad_id, batch_size=batch_size)
    return kl_from_logprobs(mine, theirs, confidence=confidence, seed=seed)


def kl_of_generations(policy, reference, generations, *, pad_id: int, batch_size: int = 8,
                      seed: int = 0) -> KLEstimate:
    """`policy_reference_kl` on `rlhfkit.rollout.generate.Generation`s sampled from `policy`
    (their prompt and response token ids, the stop token included: π chose to stop there)."""
    return policy_reference_kl(policy, reference, [(g.prompt_ids, g.response_ids) for g in generations],
                               pad_id=pad_id, batch_size=batch_size, seed=seed)
