"""The policy as the online recipes train it: log-probs, entropy and (for PPO) values.

One backbone pass gives the hidden states of every position whose label counts; from
them the module computes

    log π(y_t)   chunked through the LM head (`rlhfkit.ops.logprobs`), never holding (B, T, V)
    H(π(·|s_t))  the next-token entropy, chunked the same way (checkpointed when it needs a gradient)
    V(s_t)       a scalar value head: on the policy's own hidden states ("shared"), or on a
                 separate critic backbone initialized from the same weights ("separate")

All outputs are in the label layout of the `LMBatch`: (B, L), nonzero only where
`labels != IGNORE_INDEX`, so position t holds the quantities for the token labels[t]
predicted from the state ending at t.

The wrapper keeps the causal LM at `.model`, which is where the engine looks for the
weights it saves; the value head (and a separate critic) are not part of that checkpoint,
so recipes carry them through `value_state_dict` in the engine's `extra_state`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rlhfkit.data.batches import IGNORE_INDEX, LMBatch
from rlhfkit.ops.logprobs import DEFAULT_CHUNK, hidden_states, split_causal_lm, target_logprobs

CRITICS = ("none", "shared", "separate")


@dataclass(frozen=True)
class PolicyOutputs:
    """Per-position outputs, (B, L) fp32, 0 where labels = IGNORE_INDEX."""

    logprobs: Tensor
    entropy: Tensor | None = None
    values: Tensor | None = None


class ValueHead(nn.Module):
    """V(s) = w·h + b on a hidden state h (H,). Zero-initialized: V ≡ 0 before training,
    so the first advantages are the plain returns rather than the noise of a random head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (N, H) → values (N,) fp32."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def _entropy_chunk(hidden: Tensor, weight: Tensor, bias: Tensor | None, temperature: float) -> Tensor:
    logits = hidden @ weight.to(hidden.dtype).T
    if bias is not None:
        logits = logits + bias.to(hidden.dtype)
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def chunked_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                    chunk_size: int = DEFAULT_CHUNK, temperature: float = 1.0) -> Tensor:
    """H = −Σ_v p_v log p_v of softmax(hidden @ weightᵀ / temperature), per row, chunked.

    hidden: (N, H); weight: (V, H). Returns (N,) fp32. With a gradient, each chunk is
    checkpointed: only its input is kept and its (chunk, V) logits are recomputed backward.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for s in range(0, hidden.shape[0], chunk_size):
        h = hidden[s:s + chunk_size]
        if grad:
            parts.append(checkpoint(_entropy_chunk, h, weight, bias, temperature, use_reentrant=False))
        else:
            parts.append(_entropy_chunk(h, weight, bias, temperature))
    return torch.cat(parts)


class PolicyValueModel(nn.Module):
    """A causal LM policy, optionally with a critic, as one module (what DDP wraps).

    critic: "none" (GRPO, RLOO, ReMax, REINFORCE), "shared" (value head on the policy's
    hidden states: one backbone, the value loss also shapes the policy's features) or
    "separate" (a copy of the initial model's backbone with its own head: twice the
    memory, no interference between the two losses).
    """

    def __init__(self, model: nn.Module, *, critic: str = "none", chunk_size: int = DEFAULT_CHUNK):
        super().__init__()
        if critic not in CRITICS:
            raise ValueError(f"critic must be one of {CRITICS}, got {critic!r}")
        self.model = model
        self.critic = critic
        self.chunk_size = chunk_size
        self.value_head: ValueHead | None = None
        self.critic_backbone: nn.Module | None = None
        if critic != "none":
            config = getattr(model, "get_base_model", lambda: model)().config
            self.value_head = ValueHead(config.hidden_size)
        if critic == "separate":
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            backbone = copy.deepcopy(split_causal_lm(base).backbone)
            for p in backbone.parameters():  # a LoRA policy's frozen base must not freeze the critic
                p.requires_grad_(True)
            self.critic_backbone = backbone

    def forward(self, batch: LMBatch, *, temperature: float = 1.0, with_entropy: bool = False,
                with_values: bool = True, entropy_grad: bool = True) -> PolicyOutputs:
        """Outputs for the positions whose label counts; see the module docstring.

        entropy_grad=False computes the entropy as a metric only: from detached hidden states,
        without a gradient (no checkpointed chunks kept for the backward)."""
        attention_mask = None if batch.packed else batch.attention_mask
        parts = split_causal_lm(self.model)
        hidden = hidden_states(self.model, batch.input_ids, attention_mask, batch.position_ids)
        mask = batch.labels != IGNORE_INDEX
        counted = hidden[mask]
        scale = temperature / parts.logit_scale
        flat_logp = target_logprobs(counted, parts.head.weight, batch.labels[mask], bias=parts.head.bias,
                                    chunk_size=self.chunk_size, temperature=scale)
        logprobs = self._place(flat_logp, mask)
        entropy = None
        if with_entropy:
            with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                source = counted if entropy_grad else counted.detach()
                flat_entropy = chunked_entropy(source, parts.head.weight, parts.head.bias,
                                               chunk_size=self.chunk_size, temperature=scale)
            entropy = self._place(flat_entropy, mask)
        values = None
        if with_values and self.value_head is not None:
            if self.critic_backbone is not None:
                out = self.critic_backbone(input_ids=batch.input_ids, attention_mask=attention_mask,
                                           position_ids=batch.position_ids, use_cache=False)
                critic_hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                values = self._place(self.value_head(critic_hidden[mask]), mask)
            else:
                values = self._place(self.value_head(counted), mask)
        return PolicyOutputs(logprobs, entropy, values)

    @staticmethod
    def _place(flat: Tensor, mask: Tensor) -> Tensor:
        out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return out.masked_scatter(mask, flat.float())

    # ------------------------------------------------------------------ state outside the HF checkpoint
    def value_state_dict(self) -> dict[str, Tensor]:
        """The critic's weights (head, and the separate backbone if any); empty without a critic."""
        state: dict[str, Tensor] = {}
        if self.value_head is not None:
            state.update({f"value_head.{k}": v for k, v in self.value_head.state_dict().items()})
        if self.critic_backbone is not None:
            state.update({f"critic_backbone.{k}": v for k, v in self.critic_backbone.state_dict().items()})
        return state

    def load_value_state_dict(self, state: dict[str, Tensor]) -> None:
        expected = set(self.value_state_dict())
        if set(state) != expected:
            missing, unexpected = sorted(expected - set(state))[:5], sorted(set(state) - expected)[:5]
            raise ValueError(f"saved critic does not match this model (critic={self.critic!r}): "
                             f"missing {missing}, unexpected {unexpected}; resume with the same config")
        if self.value_head is not None:
            self.value_head.load_state_dict({k[len("value_head."):]: v for k, v in state.items()
                                             if k.startswith("value_head.")})
        if self.critic_backbone is not None:
            self.critic_backbone.load_state_dict({k[len("critic_backbone."):]: v for k, v in state.items()
                                                  if k.startswith("critic_backbone.")})


def save_value_model(module: PolicyValueModel, folder, state: dict[str, Tensor] | None = None) -> None:
    """Write the critic's weights next to a saved policy (`value_head.safetensors`): `state`
    when given (a sharded critic's weights gathered in full), else the module's own."""
    state = {k: v.detach().contiguous().cpu() for k, v in (module.value_state_dict() if state is None
                                                            else state).items()}
    if state:
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(state, str(Path(folder) / "value_head.safetensors"))
