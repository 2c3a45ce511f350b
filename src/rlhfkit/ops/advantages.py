"""Rewards and advantages for the online methods, one small function per idea.

Shapes: B responses, T response tokens (right-padded); `mask` (B, T) is 1 on real response
tokens. Sequence-level methods (GRPO, RLOO, ReMax, REINFORCE) work on one score per response,
(B,), and broadcast it over the tokens at the end; PPO shapes per-token rewards for GAE.

Grouped methods expect the batch laid out prompt by prompt: rows
[g·k, (g+1)·k) are the k = `group_size` samples for prompt g.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rlhfkit.ops.kl import get_kl_estimator
from rlhfkit.ops.stats import masked_whiten


def _response_lengths(mask: Tensor) -> Tensor:
    """Number of real tokens per row, (B,) long; checks the mask is right-padded."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be (B, T), got shape {tuple(mask.shape)}")
    lengths = mask.long().sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    expected = (positions.unsqueeze(0) < lengths.unsqueeze(1)).to(mask.dtype)
    # The score goes to index length − 1, which is only the last real token when every
    # real token comes before every pad: a left-padded or holed mask would misplace it.
    if not torch.equal(mask.to(expected.dtype), expected):
        raise ValueError("mask must be right-padded: 1s on real response tokens, then 0s")
    return lengths


def kl_penalized_rewards(scores: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, *,
                         kl_coef: float, kl_clamp: float | None, estimator: str) -> tuple[Tensor, Tensor]:
    """InstructGPT reward shaping for PPO: a KL penalty on every token, the score at the end.

        kl_t = clamp(k(logp_t, ref_logp_t), −c, c)             (no clamp when kl_clamp is None)
        r_t  = −β · kl_t  +  [t = L − 1] · score               on real tokens, L = row length
        r_t  = 0                                               on padding

    Why clamp: the per-token estimate from a single sample is noisy, and one token the
    reference finds very unlikely (or a log-prob mismatch between the sampler and the
    trainer) can give |kl_t| in the tens. Left alone, that token dominates the return,
    blows up the value targets, and with k1 a large *negative* estimate becomes a reward
    the policy can farm. Clamping bounds each token's contribution while keeping its sign.

    scores: (B,) one scalar reward per response.
    logp, ref_logp: (B, T) log-probs of the sampled response tokens under the policy that
        generated them and under the reference (rollout-time values, no gradient needed).
    mask: (B, T) right-padded, 1 on real response tokens; every row needs ≥ 1 real token.
    Returns (rewards (B, T), kl (B, T)), both 0 on padding; `kl` is the clamped estimate.
    """
    if logp.shape != ref_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, ref_logp {tuple(ref_logp.shape)} and "
                         f"mask {tuple(mask.shape)} must have the same (B, T) shape")
    if scores.shape != (logp.shape[0],):
        raise ValueError(f"scores must be (B,) = ({logp.shape[0]},), got {tuple(scores.shape)}")
    if kl_clamp is not None and not kl_clamp > 0:
        raise ValueError(f"kl_clamp must be > 0 or None, got {kl_clamp}")
    lengths = _response_lengths(mask)
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"rows {empty} have no response tokens, so no token can carry the score")

    m = mask.to(logp.dtype)
    kl = get_kl_estimator(estimator)(logp, ref_logp)
    if kl_clamp is not None:
        kl = kl.clamp(-kl_clamp, kl_clamp)
    kl = kl * m
    rewards = -kl_coef * kl
    last = (lengths - 1).unsqueeze(1)
    rewards = rewards.scatter_add(1, last, scores.to(rewards.dtype).unsqueeze(1))
    return rewards, kl


def _grouped(scores: Tensor, group_size: int, min_size: int) -> Tensor:
    """scores (B,) → (B/k, k), with clear errors for a bad layout."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    if group_size < min_size:
        raise ValueError(f"group_size must be ≥ {min_size} here, got {group_size}")
    if scores.shape[0] % group_size != 0:
        raise ValueError(f"batch of {scores.shape[0]} scores is not a whole number of "
                         f"groups of {group_size}")
    return scores.view(-1, group_size)


def group_normalized_advantages(scores: Tensor, group_size: int, *, scale: bool, eps: float = 1e-6) -> Tensor:
    """GRPO: each sample's score relative to the other samples of its prompt.

        A_i = (r_i − mean_g) / (std_g + eps)     scale=True (GRPO; std with Bessel's n−1)
        A_i =  r_i − mean_g                      scale=False (Dr. GRPO: no std division,
                                                 which up-weights near-solved prompts)

    A group whose samples all score the same gets A = 0: it carries no learning signal.
    scores: (B,) with B a multiple of group_size, grouped by prompt. Returns (B,).
    """
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    grouped = _grouped(scores, group_size, min_size=2 if scale else 1)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True)
        # An all-equal group is 0/0 when eps = 0; its advantage is 0 by definition.
        centred = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return centred.reshape(-1)


# How group-centred rewards are scaled (TRL's `scale_rewards`): by the std of the group, of the
# whole batch, or not at all.
REWARD_SCALES = ("group", "batch", "none")


def scaled_group_advantages(scores: Tensor, group_size: int, *, scale: str, eps: float = 1e-6) -> Tensor:
    """GRPO's group-centred reward, divided by a std taken over the group, the batch, or nothing.

        A_i = (r_i − mean_g) / (std_g + eps)      "group"  (GRPO; = group_normalized_advantages)
        A_i = (r_i − mean_g) / (std_B + eps)      "batch"  (std of all B rewards, Bessel's n−1)
        A_i =  r_i − mean_g                       "none"   (Dr. GRPO)

    "batch" keeps the relative size of the groups' spreads: a prompt whose samples barely
    differ gets small advantages instead of being blown up to unit scale. A batch whose
    rewards are all equal gets A = 0. scores: (B,) grouped by prompt. Returns (B,).
    """
    if scale not in REWARD_SCALES:
        raise ValueError(f"scale must be one of {', '.join(REWARD_SCALES)}; got {scale!r}")
    if scale != "batch":
        return group_normalized_advantages(scores, group_size, scale=scale == "group", eps=eps)
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    centred = group_normalized_advantages(scores, group_size, scale=False)
    std = scores.std() if scores.numel() > 1 else torch.zeros((), dtype=scores.dtype, device=scores.device)
    return centred / (std + eps) if float(std) > 0 else torch.zeros_like(centred)


def informative_rows(scores: Tensor, group_size: int) -> Tensor:
    """DAPO's dynamic-sampling filter: True on the rows of groups whose scores are not all equal.

    A group whose k samples all score the same (all solved, all failed) has zero variance, so
    every group-relative advantage in it is 0: it only dilutes the batch. scores: (B,)
    grouped by prompt. Returns (B,) bool, constant within each group.
    """
    grouped = _grouped(scores, group_size, min_size=1)
    spread = grouped.amax(dim=1) > grouped.amin(dim=1)
    return spread.repeat_interleave(group_size)


def overlong_penalty(lengths: Tensor, *, max_length: int, cache: int) -> Tensor:
    """DAPO's soft overlong punishment, a reward to add: 0, then a linear ramp to −1, then −1.

        p(L) = 0                               L ≤ L_max − L_cache
        p(L) = (L_max − L_cache − L) / L_cache  L_max − L_cache < L ≤ L_max
        p(L) = −1                              L > L_max

    lengths: (B,) response lengths in tokens. max_length L_max ≥ 1, cache 0 ≤ L_cache ≤ L_max
    (L_cache = 0: a hard −1 beyond L_max). Returns (B,) float.
    """
    if not 0 <= cache <= max_length or max_length < 1:
        raise ValueError(f"need 1 ≤ max_length and 0 ≤ cache ≤ max_length, got {max_length}, {cache}")
    lengths = lengths.to(torch.float32) if not lengths.is_floating_point() else lengths
    start = max_length - cache
    ramp = (start - lengths) / cache if cache > 0 else torch.zeros_like(lengths)
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp)
    return torch.where(lengths > max_length, -torch.ones_like(lengths), penalty)


def batch_normalized_returns(rewards: Tensor, mask: Tensor, *, eps: float = 1e-8) -> Tensor:
    """REINFORCE++: the return-to-go of per-token rewards, whitened over the whole batch.

        G_{i,t} = Σ_{s ≥ t} r_{i,s}                       (γ = 1, no critic)
        A_{i,t} = (G_{i,t} − μ) / √(σ² + eps)             μ, σ² over every real token of the batch

    The batch mean is the only baseline, and the whitening bounds the step whatever the
    reward scale. rewards: (B, T) per-token rewards, e.g. `kl_penalized_rewards` (score on
    the last token, −β·kl on each), 0 on padding. mask: (B, T). Returns (B, T), 0 on padding.
    """
    if rewards.shape != mask.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and mask {tuple(mask.shape)} must have one (B, T) shape")
    masked = rewards * mask.to(rewards.dtype)
    returns = masked.flip(1).cumsum(1).flip(1)
    return masked_whiten(returns, mask, eps=eps)


def leave_one_out_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: baseline for sample i = mean score of the other k − 1 samples of its prompt.

        A_i = r_i − (Σ_j r_j − r_i) / (k − 1)

    The baseline excludes r_i, so it is independent of sample i and the gradient stays
    unbiased. Needs k ≥ 2. scores: (B,) grouped by prompt. Returns (B,).
    """
    grouped = _grouped(scores, group_size, min_size=2)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def baseline_advantages(scores: Tensor, baseline: Tensor | float) -> Tensor:
    """REINFORCE with a baseline: A_i = r_i − b_i.

    ReMax: b_i = score of the greedy decode for the same prompt, (B,).
    REINFORCE: b = a scalar such as `MovingAverageBaseline.value`.
    scores: (B,); baseline: (B,) or a scalar. Returns (B,).
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got shape {tuple(scores.shape)}")
    baseline = torch.as_tensor(baseline, dtype=scores.dtype, device=scores.device)
    if baseline.dim() != 0 and baseline.shape != scores.shape:
        raise ValueError(f"baseline must be a scalar or shaped like scores {tuple(scores.shape)},"
                         f" got {tuple(baseline.shape)}")
    return scores - baseline


class MovingAverageBaseline:
    """Exponential moving average of past batch-mean scores, the REINFORCE baseline.

        b ← mean(batch)                         on the first update
        b ← decay · b + (1 − decay) · mean(batch)   afterwards

    Read `value` *before* calling `update` with the current batch, so the baseline does not
    depend on the samples it is subtracted from. `decay` is fixed at construction; the state
    (value, number of updates) round-trips through state_dict for exact resume.
    """

    def __init__(self, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self._decay = float(decay)
        self._value = 0.0
        self._num_updates = 0

    @property
    def value(self) -> float:
        """The current baseline (0.0 before any update)."""
        return self._value

    def update(self, scores: Tensor) -> float:
        """Fold one batch of scores (B,) into the average; returns the new value."""
        if scores.numel() == 0:
            raise ValueError("cannot update the baseline with an empty batch of scores")
        batch_mean = float(scores.detach().float().mean())
        if not math.isfinite(batch_mean):
            raise ValueError(f"scores contain a non-finite value (batch mean {batch_mean})")
        if self._num_updates == 0:
            self._value = batch_mean
        else:
            self._value = self._decay * self._value + (1.0 - self._decay) * batch_mean
        self._num_updates += 1
        return self._value

    def state_dict(self) -> dict[str, float | int]:
        return {"decay": self._decay, "value": self._value, "num_updates": self._num_updates}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        if float(state["decay"]) != self._decay:
            raise ValueError(f"saved baseline used decay={state['decay']}, this one uses "
                             f"decay={self._decay}; resume with the same config")
        self._value = float(state["value"])
        self._num_updates = int(state["num_updates"])


def broadcast_sequence_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Give every real token of response i the advantage A_i: (B,) × mask (B, T) → (B, T)."""
    if advantages.shape != (mask.shape[0],):
        raise ValueError(f"advantages must be (B,) = ({mask.shape[0]},), "
                         f"got {tuple(advantages.shape)}")
    return advantages.unsqueeze(1) * mask.to(advantages.dtype)
