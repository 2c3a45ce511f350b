"""DeepSpeed ZeRO-2/3 through accelerate (`accelerate launch --config_file
configs/accelerate/deepspeed-zero{2,3}.yaml`): what the engine does differently under it.

accelerate (1.16) prepares DeepSpeed only when the Accelerator is not told `cpu=True`, and on
a machine without a torch accelerator it then finds no process-group backend (every process
would believe it is process 0): on CPU the engine passes `cpu=False` with gloo as the backend
(DeepSpeed's CPU accelerator, `DS_ACCELERATOR=cpu`, uses gloo when oneCCL is absent).

rlhfkit gives `accelerator.prepare` no dataloader, so the DeepSpeed config's batch sizes are
filled here from the run's settings, and so are its gradient clipping and fp16/bf16 blocks
(rlhfkit's --precision and --max-grad-norm win over the accelerate config's). DeepSpeed's
engine then steps, clips and zeroes inside `accelerator.backward` of the last micro-batch of a
step (`accumulate` marks it); rlhfkit's losses are already normalized over the whole step, so
the backward passes `scale_wrt_gas=False`. The lr schedule stays rlhfkit's own.

Checkpoints hold DeepSpeed's own `save_checkpoint` folder (`checkpoints/step-N/deepspeed/`:
every process writes its partition of the optimizer, and under ZeRO-3 of the weights); the
final model is gathered in full (`deepspeed.zero.GatheredParameters`) and written once.
deepspeed is an optional dependency: it is imported only by runs launched under it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.config import ConfigError

FOLDER = "deepspeed"  # a DeepSpeed run's checkpoint part: DeepSpeed's save_checkpoint folder
TAG = "state"         # the one tag written in it


def requested() -> bool:
    """The process was launched with a DeepSpeed accelerate config (ACCELERATE_USE_DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def accelerator_kwargs() -> dict[str, Any]:
    """Arguments for `Accelerator(...)`: `cpu=True` without CUDA, except under DeepSpeed, where
    the processes must stay DeepSpeed's (see the module's docstring)."""
    if torch.cuda.is_available():
        return {"cpu": False}
    # before deepspeed picks its accelerator on import (accelerate imports it wherever it is
    # installed, and its guess warns on every run of a machine without a GPU)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not requested():
        return {"cpu": True}
    try:
        import deepspeed  # noqa: F401, PLC0415 — optional: only DeepSpeed runs need it
    except ImportError as e:
        raise ConfigError("the accelerate config asks for DeepSpeed, which is not installed: "
                          "pip install 'rlhfkit[deepspeed]' (docs/SCALING.md)") from e
    from accelerate.utils import InitProcessGroupKwargs  # noqa: PLC0415 — only DeepSpeed runs need it

    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def configure(accelerator, cfg, precision: str) -> dict[str, Any] | None:
    """Fill the DeepSpeed config accelerate will hand to `deepspeed.initialize` from the run's
    settings; returns it, or None when the run is not under DeepSpeed. cfg: the TrainConfig;
    precision: bf16, fp16 or fp32."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return None
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_batch_size"] = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    accelerator.gradient_accumulation_steps = cfg.grad_accum
    ds["gradient_clipping"] = float(cfg.max_grad_norm)
    for kind in ("bf16", "fp16"):
        block = ds.get(kind) if isinstance(ds.get(kind), dict) else {}
        ds[kind] = {**block, "enabled": precision == kind}
    # Under ZeRO-3 every forward is collective: LoRA's merge, evaluation (the main process alone)
    # and online sampling (the transformers model called directly) would need gathered weights.
    uses = {"LoRA": getattr(cfg, "lora_r", 0), "online sampling": hasattr(cfg, "prompts_per_step"),
            "evaluation": getattr(cfg, "eval_data", "") or getattr(cfg, "test_fraction", 0)}
    unsupported = [what for what, on in uses.items() if on]
    if stage(plugin) == 3 and unsupported:
        raise ConfigError(f"DeepSpeed ZeRO-3 does not support {unsupported[0]} in rlhfkit yet: use ZeRO-2 "
                          "(configs/accelerate/deepspeed-zero2.yaml) or FSDP2 (configs/accelerate/fsdp2.yaml)")
    return ds


def stage(plugin) -> int:
    return int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


def is_engine(module: nn.Module | None) -> bool:
    """`module` is a DeepSpeedEngine (accelerate prepared it under DeepSpeed)."""
    return module is not None and type(module).__name__ == "DeepSpeedEngine"


def full_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The whole weights of `model` (the transformers model a DeepSpeed engine trains) on CPU,
    or None when they are not partitioned (ZeRO-2: every process holds them). Under ZeRO-3
    collective: every process gathers, and every process gets the dict. Tied names are kept
    once, as save_pretrained writes them."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3 marks the parameters it partitions
        return None
    import deepspeed  # noqa: PLC0415 — optional: only DeepSpeed runs get here

    from rlhfkit.train.distributed import tied_names  # noqa: PLC0415 — keeps this module's imports light

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        full = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for name in tied_names(model):
        full.pop(name, None)
    return full


def save_state(engine: nn.Module, optimizer, folder: Path) -> None:
    """Every process writes its partition of the model and optimizer into `folder`; collective.
    optimizer: unused (the engine holds it), for the signature of `distributed.save_shards`."""
    engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False)


def load_state(engine: nn.Module, folder: Path) -> None:
    """Read a `save_state` folder back (same ZeRO stage and process count); collective.
    Raises RuntimeError when it cannot be read."""
    if not (folder / TAG).is_dir():
        raise RuntimeError(f"{folder.name}/{TAG} is missing")
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")


def check_state(folder: Path) -> None:
    """Raise if a `save_state` folder holds no model states (a torn copy)."""
    if not any((folder / TAG).glob("*model_states.pt")):
        raise FileNotFoundError(f"no model states in {folder.name}/{TAG}")
