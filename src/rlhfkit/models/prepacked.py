"""Decoding on a CPU in fp32 with every linear layer's weight reordered once per call.

A decoding step multiplies a few rows (one new token per sequence) by every weight matrix of
the model. PyTorch's CPU `F.linear` in fp32 calls MKL's sgemm, which lays the weight out for
its kernel again at every call; oneDNN can do that once (`mkldnn._reorder_linear_weight`) and
then multiply from the reordered copy (`mkldnn._linear_pointwise`) — the two ops inductor's
CPU freezing pass emits for frozen linears, here called without compiling anything:

    y = x Wᵀ + b,   W reordered once per `prepacked_linears` block, x: (..., in) → y: (..., out)

On a 2-core AMD EPYC (AVX2, no native bf16, so `precision=auto` decodes in fp32) the linear
layers of SmolLM2-135M decode 1.3–2.1× faster at 1–64 rows, and sampling 32 rows ≈ 1.35×
(bench/RESULTS.md, session 18). The result equals F.linear's to fp32 rounding (a different
summation order: ≈ 1e-4 absolute on logits of size 10).

Only fp32 weights on the CPU, with autograd off, are packed: the ops have no backward, and
oneDNN's bf16 reorder needs AVX512-BF16/AVX-NE-CONVERT (unmeasured where it runs: bf16 keeps
`F.linear`). Packing costs about one copy of the weights (≈ 0.5 s and 540 MB for 135M
parameters), held only inside the block, so a block always reads the weights as they are
when it starts: no cache to invalidate after an optimizer step.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


def _ops_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


def packable(layer: nn.Module) -> bool:
    """An nn.Linear whose weight is a plain fp32 tensor on the CPU (not a shard: FSDP's are
    DTensors) and whose forward nothing has replaced (accelerate's offload hooks set one)."""
    return (isinstance(layer, nn.Linear) and type(layer.weight.data) is torch.Tensor
            and layer.weight.device.type == "cpu" and layer.weight.dtype == torch.float32
            and "forward" not in layer.__dict__)


def _packed_forward(packed: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _check(layer: nn.Linear, packed: torch.Tensor) -> None:
    """Raise unless the packed op reproduces F.linear on one row (the ops are private to torch:
    a build that changed them must not decode silently wrong)."""
    x = torch.linspace(-1, 1, layer.in_features).unsqueeze(0)
    bias = None if layer.bias is None else layer.bias.detach()
    want = torch.nn.functional.linear(x, layer.weight.detach(), bias)
    got = _packed_forward(packed, bias, x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise RuntimeError("mkldnn._linear_pointwise disagrees with F.linear")


@contextmanager
def prepacked_linears(model: nn.Module, rows: int | None = None) -> Iterator[bool]:
    """Within the block, the model's fp32 CPU linear layers compute from reordered weights.

    rows: the typical number of rows a call multiplies (decoding: the batch size), a hint for
    the layout. Yields whether packing applied; it does not when autograd is on, nothing is
    packable, the ops are missing, or the reorder fails (logged; the layers stay as they are).
    Weights shared by several layers are packed once. On exit every layer's own `forward` is
    back and the reordered copies are freed.
    """
    layers = [m for m in model.modules() if packable(m)]
    if torch.is_grad_enabled() or not layers or not _ops_available():
        yield False
        return
    packed: dict[int, torch.Tensor] = {}
    try:
        for layer in layers:
            if id(layer.weight) not in packed:
                packed[id(layer.weight)] = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), rows)
        _check(layers[0], packed[id(layers[0].weight)])
    except Exception as e:  # noqa: BLE001 - private ops: whatever this build or CPU refuses, decode as before
        log.info("linear layers not prepacked (%s)", (str(e).splitlines() or [type(e).__name__])[0])
        packed.clear()
    if not packed:  # outside the handler: an error in the caller's block must not chain to this one
        yield False
        return
    try:
        for layer in layers:
            bias = None if layer.bias is None else layer.bias.detach()
            layer.forward = functools.partial(_packed_forward, packed[id(layer.weight)], bias)
        yield True
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        packed.clear()
