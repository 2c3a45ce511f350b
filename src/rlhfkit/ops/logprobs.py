"""Log-probabilities of target tokens, computed without holding full-vocabulary logits.

Every recipe needs log π(y_t | x, y_<t) for some tokens: SFT (the response tokens), DPO
(chosen and rejected), PPO/GRPO (the sampled tokens). A causal LM usually returns logits
for *every* position over the whole vocabulary — (B, T, V) floats, 49152 wide for SmolLM2 —
most of which the loss never reads (prompt tokens, padding) and which dominate memory.

Here the backbone runs once to get hidden states (B, T, H); only the positions that count
are gathered (N, H); and the output projection + log-softmax run over chunks of those N
positions. The custom autograd function keeps just the (N,) log-sum-exp per token and
recomputes each chunk's logits in the backward pass, so at most `chunk_size × V` logits
exist at any time, in forward and backward alike.

    log π(y_t) = h_t·w_{y_t} − log Σ_v exp(h_t·w_v)
    ∂/∂h_t  = g_t (w_{y_t} − Σ_v p_v w_v),   ∂/∂W = Σ_t g_t (e_{y_t} − p_t) h_tᵀ
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

# Label value that no loss counts (the one ignore index of the package; data/ builds labels with it).
IGNORE_INDEX = -100
# Positions per chunk of the vocabulary projection: at most DEFAULT_CHUNK × V logits exist at once.
DEFAULT_CHUNK = 512


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matmul dtype autocast would use for x's device, else x's own dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _ChunkedTargetLogprob(torch.autograd.Function):
    """log_softmax(h Wᵀ + b)[target] over row chunks; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                chunk_size: int, dtype: torch.dtype, temperature: float):
        n = hidden.shape[0]
        acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 in gradient checks
        out = hidden.new_empty(n, dtype=acc)
        lse = hidden.new_empty(n, dtype=acc)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for s in range(0, n, chunk_size):
            h = hidden[s:s + chunk_size].to(dtype)
            logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(acc)
            if temperature != 1.0:
                logits.div_(temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[s:s + chunk_size] = chunk_lse
            out[s:s + chunk_size] = logits.gather(1, targets[s:s + chunk_size, None]).squeeze(1) - chunk_lse
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype, ctx.temperature = chunk_size, dtype, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, chunk_size, temp = ctx.dtype, ctx.chunk_size, ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = lse.dtype
        grad_w = None  # (V, H) in `acc`: the first chunk's product, then += (no zero-fill of V × H)
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b and bias is not None else None
        for s in range(0, hidden.shape[0], chunk_size):
            h = hidden[s:s + chunk_size].to(dtype)
            logits = (h @ w.T if b is None else torch.addmm(b, h, w.T)).to(lse.dtype)
            if temp != 1.0:
                logits.div_(temp)
            # d logp / d logits = onehot(target) − softmax, scaled by the upstream gradient.
            g = grad_out[s:s + chunk_size].to(lse.dtype)
            dlogits = torch.exp_(logits.sub_(lse[s:s + chunk_size, None])).mul_(-g[:, None])
            dlogits.scatter_add_(1, targets[s:s + chunk_size, None], g[:, None])
            if temp != 1.0:
                dlogits.div_(temp)
            d = dlogits.to(dtype)
            if need_h:
                grad_h[s:s + chunk_size] = (d @ w).to(hidden.dtype)
            if need_w:
                part = (d.T @ h).to(acc)
                grad_w = part if grad_w is None else grad_w.add_(part)
            if grad_b is not None:
                grad_b.add_(dlogits.sum(0))
        return (grad_h,
                grad_w.to(weight.dtype) if grad_w is not None else None,
                grad_b.to(bias.dtype) if grad_b is not None else None,
                None, None, None, None)


def target_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Tensor | None = None,
                    chunk_size: int = DEFAULT_CHUNK, temperature: float = 1.0) -> Tensor:
    """log softmax(hidden @ weightᵀ / temperature)[targets], chunked.

    hidden: (N, H); weight: (V, H); targets: (N,) long in [0, V). Returns (N,) fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0 * hidden.sum()
    return _ChunkedTargetLogprob.apply(hidden, weight, bias, targets, chunk_size,
                                       _compute_dtype(hidden), temperature)


@dataclass(frozen=True)
class ModelParts:
    """A causal LM split into backbone (tokens → hidden states) and output head."""

    backbone: nn.Module
    head: nn.Linear
    logit_scale: float = 1.0


def split_causal_lm(model: nn.Module) -> ModelParts:
    """Find the decoder backbone and the LM head of a transformers causal LM (PEFT-wrapped too)."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    head = inner.get_output_embeddings()
    backbone = getattr(inner, inner.base_model_prefix, None)
    if head is None or backbone is None or not isinstance(head, nn.Linear):
        raise TypeError(f"{type(inner).__name__} is not a causal LM with a linear output head")
    if getattr(inner.config, "final_logit_softcapping", None):
        raise NotImplementedError("models with logit soft-capping are not supported by chunked log-probs")
    scale = float(getattr(inner.config, "logit_scale", 1.0) or 1.0)
    return ModelParts(backbone, head, scale)


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None,
                  position_ids: Tensor | None = None) -> Tensor:
    """Last hidden states (B, T, H) of the backbone. attention_mask None + position_ids = packed rows."""
    parts = split_causal_lm(model)
    out = parts.backbone(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def gather_logprobs(model: nn.Module, input_ids: Tensor, labels: Tensor, *,
                    attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                    chunk_size: int = DEFAULT_CHUNK, temperature: float = 1.0) -> Tensor:
    """Per-token log π(labels) as a (B, T) fp32 tensor, 0 where labels = IGNORE_INDEX.

    The LM head runs only on the N positions whose label counts, chunk by chunk.
    input_ids, labels: (B, T) with labels already shifted (labels[:, t] follows input_ids[:, t]).
    """
    parts = split_causal_lm(model)
    h = hidden_states(model, input_ids, attention_mask, position_ids)
    mask = labels != IGNORE_INDEX
    flat = target_logprobs(h[mask], parts.head.weight, labels[mask], bias=parts.head.bias,
                           chunk_size=chunk_size, temperature=temperature / parts.logit_scale)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    return out.masked_scatter(mask, flat)


def sequence_logprobs(token_logps: Tensor, mask: Tensor, segment_ids: Tensor | None = None,
                      num_segments: int | None = None, average: bool = False) -> Tensor:
    """Sum (or mean) of token log-probs per sequence.

    Plain rows: token_logps, mask (B, T) → (B,). Packed rows: `segment_ids` (B, T) gives
    each token's sequence index in [0, num_segments) (−1 for tokens of no sequence) → (num_segments,).
    """
    m = mask.to(token_logps.dtype)
    if segment_ids is None:
        total = (token_logps * m).sum(-1)
        return total / m.sum(-1).clamp(min=1) if average else total
    keep = (segment_ids >= 0) & mask.bool()
    idx = segment_ids[keep]
    total = torch.zeros(num_segments, dtype=token_logps.dtype, device=token_logps.device)
    total = total.index_add(0, idx, token_logps[keep])
    if average:
        count = torch.zeros(num_segments, dtype=token_logps.dtype, device=token_logps.device)
        count = count.index_add(0, idx, torch.ones_like(idx, dtype=token_logps.dtype))
        return total / count.clamp(min=1)
    return total
