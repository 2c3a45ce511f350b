"""The frozen reference policy π_ref that KL-regularized recipes compare the policy with.

One object for both uses: the DPO family reads summed response log-probs
(`sequence_sums`, usually once before training, cached by `data.reference_cache`), the
online recipes per-token log-probs of every rollout (`logprobs`). It holds the reference
in one of three ways, cheapest first:

- LoRA: the policy's own base weights, its adapter disabled while scoring (no second model);
- `share_weights=True`: the model itself, as it is. Valid only while the model has not been
  updated, e.g. DPO's one reference pass before the first step (no copy at all);
- otherwise a frozen copy of `model` (the starting policy, or another model the caller
  loaded), moved to `device`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from rlhfkit.data.batches import LMBatch
from rlhfkit.data.reference_cache import sequence_sums
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.ops.logprobs import DEFAULT_CHUNK, gather_logprobs


class ReferencePolicy:
    """π_ref, frozen: a copy of the initial policy, or (LoRA) the policy with its adapter off.

    Build it from the model *before* any update (and before a resume loads trained weights);
    `device` is where the copy runs (the training device: the model is usually still on the
    CPU at that point, before the engine moves it). `identity` names the weights for the
    reference cache key (`data.reference_cache.model_identity`); `chunk_size` is the
    log-prob chunk of `sequence_sums`.
    """

    def __init__(self, model: nn.Module, device: torch.device | str | None = None, *, share_weights: bool = False,
                 identity: str = "", chunk_size: int = DEFAULT_CHUNK):
        self.uses_adapter = hasattr(model, "disable_adapter")
        if self.uses_adapter or share_weights:
            self.model = model
        else:
            self.model = copy.deepcopy(model).eval()
            if device is not None:
                self.model.to(device)
            for p in self.model.parameters():
                p.requires_grad_(False)
        self.identity = identity
        self.scorer = TokenLogprobs(self.model, chunk_size)

    @contextlib.contextmanager
    def active(self) -> Iterator[TokenLogprobs]:
        """Scoring mode, yielding the `TokenLogprobs` to score with: eval, no grad, and the
        LoRA adapter (if any) switched off; the model's train/eval mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        adapter_off = self.model.disable_adapter() if self.uses_adapter else contextlib.nullcontext()
        try:
            with torch.no_grad(), adapter_off:
                yield self.scorer
        finally:
            self.model.train(was_training)

    def sequence_sums(self, batch: LMBatch, count: int) -> Tensor:
        """(count,) Σ_t log π_ref(y_t | x, y_<t) over each sequence's response tokens."""
        with self.active() as scorer:
            return sequence_sums(scorer, batch, count)

    @torch.no_grad()
    def logprobs(self, batch: LMBatch, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
        """(B, L) log π_ref(labels), 0 where labels = IGNORE_INDEX."""
        def run():
            return gather_logprobs(self.model, batch.input_ids, batch.labels,
                                   attention_mask=None if batch.packed else batch.attention_mask,
                                   position_ids=batch.position_ids, chunk_size=chunk_size, temperature=temperature)
        if self.uses_adapter:
            with self.model.disable_adapter():
                return run()
        return run()
