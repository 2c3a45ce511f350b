"""The attention kernels rlhfkit trains with: fp32 scores on CPU, no mask where causality suffices, shared prompts.

On CPU, PyTorch's fused SDPA kernel given a padding mask (transformers' "sdpa") has a slow
backward at the short sequences RLHF trains on (≈ 10 ms per layer for 8 × 72 tokens, 5× its
forward: 0.3 s of a 2.5 s SFT step of the embedded model; its causal kernel without a mask, used
below for packed and right-padded rows, does not). Plain matmul attention is much faster
there, but transformers' "eager" version rounds the scores QKᵀ to bf16 under autocast before
the softmax, which moves the loss by ~1e-3 compared with SDPA (whose kernel accumulates in fp32).

`fp32_matmul_attention` computes, per head, with autocast off and every tensor in fp32:

    A = softmax(Q Kᵀ · scale + M),   O = A V          Q: (B, H, T, d)  K, V: (B, H_kv, S, d)

(M the additive mask transformers builds for "eager": 0 where attention is allowed, −∞/min
elsewhere, so padding and packed-sequence boundaries are respected), and returns O in the
caller's dtype. The attention FLOPs are a small part of a step at these lengths (≈ 2% for
the embedded model at 72 tokens), so doing them in fp32 costs little and matches SDPA's
numerics. Above `MATMUL_MAX_ELEMENTS` score elements per call (B·H·T·S), where the T×S
probabilities it keeps for the backward would cost too much memory, it hands the same
inputs to PyTorch's SDPA instead (which takes the same additive mask).

**Packed rows are padding-free here** (`PACKED_SDPA` is the same for GPUs): for a row whose
position ids restart at 0 at each sequence (the packed batches of `data.packing`),
transformers would build a dense T×T block-causal mask and the kernel would compute all T²
scores, most of them masked. Both kernels here skip that mask (the mask function returns None
when the model gets no 2-D attention mask) and attend within each sequence [s, e) of the row,

    O[s:e] = softmax(Q[s:e] K[s:e]ᵀ · scale + causal) V[s:e],

so a row of sequences of lengths n_i costs Σ n_i² instead of (Σ n_i)², whatever its width.
On CPU each sequence goes through SDPA's fused causal kernel with fp32 Q, K, V (autocast
off): fp32 accumulation as above, but no n×n mask is built, blocks above the diagonal are
skipped (≈ half the FLOPs), only the (H, n) log-sum-exp is kept for the backward instead of
the n×n probabilities, and grouped K/V heads are read in place. Per layer at H = 9, d = 64
(forward + backward, 2 threads) it was 4× faster than the matmul path at n = 1024 and no
slower at n = 32. The sequences are cut with `split` (whose backward is one `cat`), not by
slicing (each slice's backward would fill a zero tensor as large as the whole row).

**Shared prompts are stored once** (`data.packing.collate_shared_prompts`): in a packed
sequence, a token whose position id steps back (…, 48, 49, 45, 46, …) starts a branch that
continues the sequence's first 45 tokens, so the G samples of one prompt (or a preference
pair's two responses) run the prompt's projections, MLPs and norms once. Each branch is
attended as prompt + branch (`_branched`), so every token's output is the one it would have
in its own row; on the GRPO bench's rollouts (8 prompts × 4 samples, ≈ 46 prompt tokens)
the passes compute 42% fewer tokens.

**Right-padded rows need no mask either** (the padded batches of `data.packing` and of the
rollouts): under causal attention a real token never sees the padding after it, so the mask
function builds none for a right-padded 2-D mask over the model's own tokens (`_unless_packed`)
and each row goes to the same causal kernel as one sequence — the whole batch in one SDPA call.
Only the padding positions' outputs differ from the masked computation, and nothing reads them.
The masked paths above remain for left padding, queries after a cache and other masks. Before
this, padded batches at long rows took the masked matmul path (up to 64 M scores per call): a
DPO step of 4 pairs of 30–1,010 tokens ran at 0.79× TRL's, a reward-model step at 0.46×.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

NAME = "rlhfkit_fp32_matmul"
PACKED_SDPA = "rlhfkit_packed_sdpa"
# 64 M fp32 scores = 256 MB kept per layer for the backward (8 × 9 heads × 944²).
MATMUL_MAX_ELEMENTS = 64 * 2**20


class Span(NamedTuple):
    """One sequence [start, end) of a row. A sequence with `branches` shares its beginning:
    its first (end − start − Σ lengths) tokens are the trunk, and each branch (length, at)
    that follows continues the trunk's first `at` tokens (see `sequence_spans`)."""

    start: int
    end: int
    branches: tuple[tuple[int, int], ...] = ()

    @property
    def trunk(self) -> int:
        return self.end - self.start - sum(length for length, _ in self.branches)


def sequence_spans(position_ids: torch.Tensor | None, batch: int, length: int) -> list[list[Span]]:
    """Per row, each sequence as a `Span`: a new one wherever the position id is 0 (packed
    rows; the padding after them is a sequence of its own). Without position ids, or with
    plain ones (0, 1, …), each row is one sequence. Cached for the last tensor seen: every
    layer of one forward pass gets the same `position_ids`.

    Inside a sequence, a token whose position id is not its predecessor's + 1 starts a
    **branch** (the shared-prefix rows of `data.packing.collate_shared_prompts`): a branch
    starting at position `at` continues the sequence's first `at` tokens (its trunk, the
    tokens before the first branch), so positions 0 1 2 3 4 2 3 4 2 3 hold the sequences
    0 1 2 3 4, 0 1 2 3 4 and 0 1 2 3 with the first two tokens stored once.
    """
    if position_ids is None:
        return [[Span(0, length)]] * batch
    cached = _last_spans[0]  # one read: another thread may swap the entry (never half of it)
    if cached is not None and cached[0] is position_ids and cached[1] == (batch, length):
        return cached[2]
    spans = [_row_spans(row, length) for row in position_ids.expand(batch, -1).cpu().tolist()]
    _last_spans[0] = (position_ids, (batch, length), spans)
    return spans


_last_spans: list[tuple[torch.Tensor, tuple[int, int], list[list[Span]]] | None] = [None]


def _row_spans(positions: list[int], length: int) -> list[Span]:
    starts = [i for i, p in enumerate(positions) if p == 0 or i == 0]
    spans = []
    for s, e in zip(starts, starts[1:] + [length], strict=True):
        cuts = [i for i in range(s + 1, e) if positions[i] != positions[i - 1] + 1]
        if not cuts:
            spans.append(Span(s, e))
            continue
        trunk = cuts[0] - s
        branches = []
        for b, b_end in zip(cuts, cuts[1:] + [e], strict=True):
            at = positions[b]
            if not 0 < at <= trunk:
                raise ValueError(f"position ids: a branch at index {b} starts at position {at}, but its "
                                 f"sequence's trunk has {trunk} tokens (a branch continues the trunk's first "
                                 f"1..{trunk} tokens)")
            branches.append((b_end - b, at))
        spans.append(Span(s, e, tuple(branches)))
    return spans


def _causal(t: int, s: int, device: torch.device) -> torch.Tensor:
    """(t, s) additive mask: query i (the last t of s positions) sees keys ≤ its own position."""
    allowed = torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)
    return torch.zeros(t, s, device=device).masked_fill(~allowed, float("-inf"))


def _matmul(query, key, value, mask, scaling: float, p: float, training: bool):
    """fp32 A = softmax(Q Kᵀ · scale + M), O = A V with autocast off; (O, A)."""
    with torch.autocast(query.device.type, enabled=False):
        scores = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
        if mask is not None:
            scores = scores + mask.float()
        weights = nn.functional.softmax(scores, dim=-1)
        weights = nn.functional.dropout(weights, p=p, training=training)
        return torch.matmul(weights, value.float()), weights


def _per_sequence(kernel, query, key, value, spans: list[list[Span]]) -> torch.Tensor:
    """(B, H, T, d): `kernel(q, k, v)` on each sequence of each row (`_branched` for one with
    branches), joined back.

    Rows and sequences are cut with `split` and joined with `cat`, so the backward is one
    `cat` per split tensor (no zero-filled row-sized gradient per piece)."""
    if all(len(row_spans) == 1 and not row_spans[0].branches for row_spans in spans):  # one call
        return kernel(query, key, value)
    rows = []
    for q, k, v, row_spans in zip(query.split(1), key.split(1), value.split(1), spans, strict=True):
        if len(row_spans) == 1 and not row_spans[0].branches:
            rows.append(kernel(q, k, v))
            continue
        sizes = [span.end - span.start for span in row_spans]
        parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2), row_spans, strict=True)
        rows.append(torch.cat([_branched(kernel, *part) for part in parts], dim=2))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _branched(kernel, query, key, value, span: Span) -> torch.Tensor:
    """(1, H, n, d): causal attention over one sequence whose branches share its trunk.

    The trunk attends to itself; a branch (length L, at) is attended as the sequence
    trunk[:at] + branch, whose last L outputs are the branch's:

        O_branch = (softmax(Q Kᵀ · scale + causal) V)[at:],   Q, K, V = trunk[:at] ⧺ branch

    so each branch gets the outputs it would have as a sequence of its own, while everything
    outside attention (projections, MLP, LM head) ran once for the shared tokens. The kernel
    recomputes the trunk[:at] queries' scores per branch (at² of the branch's (at + L)² —
    the causal kernel has no offset form on CPU); their outputs are dropped, so no gradient
    flows from them, and the shared keys and values collect every branch's gradient.
    """
    if not span.branches:
        return kernel(query, key, value)
    sizes = [span.trunk, *(length for length, _ in span.branches)]
    qs, ks, vs = query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2)
    outs = [kernel(qs[0], ks[0], vs[0])]
    for (length, at), q, k, v in zip(span.branches, qs[1:], ks[1:], vs[1:], strict=True):
        out = kernel(_after(qs[0], at, q), _after(ks[0], at, k), _after(vs[0], at, v))
        outs.append(out.narrow(2, at, length))
    return torch.cat(outs, dim=2)


def _after(trunk: torch.Tensor, at: int, own: torch.Tensor) -> torch.Tensor:
    """trunk[:, :, :at] ⧺ own along the sequence dimension."""
    return torch.cat([trunk.narrow(2, 0, at), own], dim=2)


def _fp32_causal_sdpa(query, key, value, scaling: float, p: float) -> torch.Tensor:
    """SDPA's causal kernel on fp32 Q (1|B, H, n, d), K, V (.., H_kv, n, d), autocast off."""
    with torch.autocast(query.device.type, enabled=False):
        return nn.functional.scaled_dot_product_attention(
            query.float(), key.float(), value.float(), dropout_p=p, is_causal=True, scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1])


def fp32_matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention-interface signature; returns ((B, T, H, d) output, weights or None)."""
    p = dropout if module.training else 0.0
    b, h, t, _ = query.shape
    if attention_mask is None and t == key.shape[-2]:  # packed rows or no padding: causal per sequence
        spans = sequence_spans(kwargs.get("position_ids"), b, t)
        kernel = lambda q, k, v: _fp32_causal_sdpa(q, k, v, scaling, p)  # noqa: E731
        out = _per_sequence(kernel, query.float(), key.float(), value.float(), spans)  # one cast per tensor
        return out.transpose(1, 2).contiguous().to(query.dtype), None
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each K/V head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    if attention_mask is None:  # queries after cached keys
        out = _matmul(query, key, value, _causal(t, key.shape[-2], query.device), scaling, p, module.training)[0]
        return out.transpose(1, 2).contiguous().to(query.dtype), None
    mask = attention_mask[:, :, :, :key.shape[-2]]
    if b * h * t * key.shape[-2] > MATMUL_MAX_ELEMENTS:
        # SDPA wants the mask in the query's dtype; a finite minimum keeps fully masked
        # (padding) rows uniform rather than NaN, as in the matmul path
        mask = mask.clamp(min=torch.finfo(query.dtype).min).to(query.dtype)
        out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=p,
                                                         scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    out, weights = _matmul(query, key, value, mask, scaling, p, module.training)
    return out.transpose(1, 2).contiguous().to(query.dtype), weights


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, with packed rows attended one sequence at a time through
    SDPA's causal kernel (no T×T mask); padded rows go to transformers' own SDPA function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415 — see register

    b, _, t, _ = query.shape
    if attention_mask is not None or t != key.shape[-2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    p = dropout if module.training else 0.0
    kernel = lambda q, k, v: nn.functional.scaled_dot_product_attention(  # noqa: E731
        q, k, v, dropout_p=p, is_causal=True, scale=scaling, enable_gqa=groups > 1)
    spans = sequence_spans(kwargs.get("position_ids"), b, t)
    return _per_sequence(kernel, query, key, value, spans).transpose(1, 2).contiguous(), None


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether each row of a 2-D mask is ones, then zeros (right padding, or none)."""
    m = attention_mask.bool()
    return attention_mask.dim() == 2 and not bool((m[:, 1:] & ~m[:, :-1]).any())


def _unless_packed(mask_function):
    """transformers' mask function, except that no mask is built when the model gets no 2-D
    attention mask (packed rows) or a right-padded one over its own tokens (no cache): the
    kernels then attend causally within each row (each sequence of a packed row).

    Right padding needs no mask under causal attention: a real token at position i < len
    attends to keys ≤ i, all real, so its output is the same with or without the mask; only
    the padding positions' outputs change (they see the row's real tokens), and no loss,
    pooled reward or value reads them. Without the mask the padded batch goes through SDPA's
    causal kernel in one call (no T×S mask built, upper blocks skipped, only the log-sum-exp
    kept) instead of the masked matmul path, whose T×S probabilities cost time and memory at
    long rows. Other masks (left padding, offsets after a cache, sliding windows or any mask
    function other than the causal one) are built as transformers builds them.
    """
    def build(*args, attention_mask=None, **kwargs):
        if attention_mask is None:
            return None
        from transformers.masking_utils import causal_mask_function  # noqa: PLC0415 — see register

        own_tokens = kwargs.get("q_offset", 0) == 0 and kwargs.get("kv_offset", 0) == 0 and \
            kwargs.get("q_length") == kwargs.get("kv_length")
        if own_tokens and kwargs.get("mask_function") is causal_mask_function and right_padded(attention_mask):
            return None
        return mask_function(*args, attention_mask=attention_mask, **kwargs)
    return build


def register() -> str:
    """Make NAME (and PACKED_SDPA) valid `attn_implementation`s (idempotent); returns NAME."""
    # Both registries live in transformers' modeling stack (~2 s to import): imported when a
    # model is built, not when the CLI starts.
    from transformers import AttentionInterface  # noqa: PLC0415 — see above
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask  # noqa: PLC0415

    AttentionInterface.register(NAME, fp32_matmul_attention)
    AttentionMaskInterface.register(NAME, _unless_packed(eager_mask))
    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _unless_packed(sdpa_mask))
    return NAME
