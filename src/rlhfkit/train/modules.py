"""The transformers model inside a recipe's module, and the attention kernel it trains with.

Recipes train wrappers (`TokenLogprobs`, `PolicyValueModel`) around a transformers or PEFT
model; the engine switches that inner model's attention, finds its transformer blocks to shard
(FSDP) and saves it (`save_pretrained`).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit.models import attention as fp32_attention


def resolve_attention(attention: str, device: torch.device) -> str | None:
    """The transformers attn_implementation to train with; None keeps the model's own.

    On CPU, "auto" is rlhfkit's fp32 matmul attention: PyTorch's SDPA backward is several
    times slower at RLHF's short sequences; on GPUs it is transformers' SDPA with packed rows
    attended one sequence at a time (see `rlhfkit.models.attention`).
    """
    if attention == "auto":
        attention = "fp32-matmul" if device.type == "cpu" else "packed-sdpa"
    if attention == "model":
        return None
    if attention == "fp32-matmul":
        return fp32_attention.register()
    if attention == "packed-sdpa":
        fp32_attention.register()
        return fp32_attention.PACKED_SDPA
    return attention


def set_training_attention(module: nn.Module, cfg, device: torch.device) -> None:  # cfg: a TrainConfig
    """Switch the transformers model inside `module` to the attention kernel training uses.

    `Engine.setup` does it for the trained module; a recipe that runs the same weights before
    setup or beside it (DPO's reference pass, a frozen reference copy) calls it too, so both
    passes use one kernel (in bf16, two kernels' log-probs differ by up to ~0.4 nats per sequence).
    """
    attention = resolve_attention(cfg.attention, device)
    inner = inner_hf_model(module)
    if attention is not None and hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(attention)


def inner_hf_model(module: nn.Module) -> nn.Module:
    """The transformers (or PEFT) model inside recipe wrappers such as TokenLogprobs."""
    # transformers' modeling base pulls in its whole model-loading stack (~2 s): imported on
    # first use so that `rlhf --help` and config-only imports stay fast.
    from transformers import PreTrainedModel  # noqa: PLC0415 — see above

    try:
        from peft import PeftModel  # noqa: PLC0415 — peft is heavy to import and only LoRA runs need it
        kinds: tuple = (PreTrainedModel, PeftModel)
    except ImportError:
        kinds = (PreTrainedModel,)
    while not isinstance(module, kinds) and isinstance(getattr(module, "model", None), nn.Module):
        module = module.model
    return module

