"""Process-reward-model loss: binary cross-entropy on every step of a solution.

A process reward model gives each step k of a solution a logit z_k; p_k = σ(z_k) is its
estimate that the solution is right up to and including step k (the labels of
`tasks.step_labels`). The loss is pure: explicit tensors in, per-step values out, so the
recipe divides the sum over a step by the number of steps itself. Computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def step_bce_loss(logits: Tensor, labels: Tensor, step_mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-step binary cross-entropy of step logits against 0/1 step labels.

        ℓ_{b,k} = −[y_{b,k} · log σ(z_{b,k}) + (1 − y_{b,k}) · log(1 − σ(z_{b,k}))]
                = softplus(z_{b,k}) − y_{b,k} · z_{b,k}                 on real steps
        ℓ_{b,k} = 0                                                    where step_mask is 0

    logits: (B, S) one logit per step slot; labels: (B, S) 0/1 (any value on padding);
    step_mask: (B, S) 1 on real steps, 0 on padding (rows have different step counts).
    Returns (ℓ (B, S) float32, metrics), every metric a (B,) float32 sum over the row's steps
    so a caller sums them over any number of batches: `steps/correct` (σ(z) > ½ agrees with
    the label), `steps/count`, `steps/positive` (label 1), `steps/prob` (Σ σ(z)).
    """
    if logits.dim() != 2 or logits.shape != labels.shape or logits.shape != step_mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)}, labels {tuple(labels.shape)} and step_mask "
                         f"{tuple(step_mask.shape)} must have the same (B, S) shape")
    z = logits.float()
    m = step_mask.float()
    y = labels.float() * m
    bad = ((y != 0) & (y != 1)).any()
    if bool(bad):
        raise ValueError("step labels must be 0 or 1 on real steps")
    per_step = (F.softplus(z) - y * z) * m
    with torch.no_grad():
        predicted = (z > 0).float()
        metrics = {"steps/correct": ((predicted == y).float() * m).sum(-1),
                   "steps/count": m.sum(-1),
                   "steps/positive": y.sum(-1),
                   "steps/prob": (torch.sigmoid(z) * m).sum(-1)}
    return per_step, metrics
