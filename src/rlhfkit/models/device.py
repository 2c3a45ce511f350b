"""Where models run and in what precision, for training and for everything else.

Training resolves `precision="auto"` here (`resolve_precision`); generation, evaluation and
frozen scorers (reward models, judges) ask for their device and weight dtype here, so every
layer above `models` agrees on both.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str) -> str:
    """'auto' → bf16 on GPUs and CPUs with native bf16 (AVX512-BF16/AMX), fp32 elsewhere."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def inference_device() -> torch.device:
    """Where generation, evaluation and frozen scorers (reward models, judges) run: this
    process's accelerator (its own GPU under `accelerate launch`), else the CPU."""
    return PartialState().device


def inference_dtype(precision: str = "auto") -> torch.dtype:
    """The weight dtype for generation and evaluation: bf16 where training would use bf16
    (decoding with bf16 weights is ≈ 2× faster on CPU than fp32, and casting fp32 weights under
    autocast at every decoding step is slower still), fp32 otherwise."""
    return torch.bfloat16 if resolve_precision(precision) == "bf16" else torch.float32
