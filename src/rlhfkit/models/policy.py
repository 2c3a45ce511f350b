"""A causal LM as a module that returns token log-probs (what every policy recipe needs).

Wrapping the model this way lets accelerate/DDP wrap *this* module, so gradient sync
hooks fire, while the log-probs are computed by the chunked path in `rlhfkit.ops.logprobs`
(the full-vocabulary logits are never materialized).
"""

from __future__ import annotations

from torch import Tensor, nn

from rlhfkit.data.batches import LMBatch
from rlhfkit.ops.logprobs import DEFAULT_CHUNK, gather_logprobs


class TokenLogprobs(nn.Module):
    def __init__(self, model: nn.Module, chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: LMBatch, temperature: float = 1.0) -> Tensor:
        """(B, T) fp32 log π(labels), 0 where labels = IGNORE_INDEX."""
        return gather_logprobs(self.model, batch.input_ids, batch.labels,
                               attention_mask=None if batch.packed else batch.attention_mask,
                               position_ids=batch.position_ids, chunk_size=self.chunk_size,
                               temperature=temperature)
