"""Sharded training (FSDP2): whether a run is sharded, the sharding itself, sharded checkpoints
and the one full state dict gathered for the final model. Every call is a documented
torch.distributed / accelerate API; nothing here moves tensors between processes by hand.

accelerate decides *whether* a run is sharded: `accelerate launch --config_file
configs/accelerate/fsdp2.yaml` puts the config's FSDP settings in the environment
(ACCELERATE_USE_FSDP, FSDP_VERSION, FSDP_RESHARD_AFTER_FORWARD, ...), which accelerate's
`FullyShardedDataParallelPlugin` reads; under plain `torchrun` set the same variables. The
engine then shards with torch's `fully_shard`, the call accelerate's own FSDP2 preparation
makes, rather than handing the model to `accelerator.prepare`, for two reasons:

- accelerate (1.16) enables FSDP only on accelerators: on CPU processes its state resolves to
  MULTI_CPU and it silently wraps the model in DDP instead, so neither the CPU tests nor a CPU
  run would ever be sharded;
- recipes train a wrapper around the transformers model (`TokenLogprobs`, `PolicyValueModel`),
  whose transformer blocks accelerate's auto-wrap finds only through the *outer* module's
  `_no_split_modules`, which the wrapper does not have: here the blocks are read from the
  inner model.

Each transformer block is one FSDP unit (all-gathered for its forward and backward, resharded
after), and the wrapper is the root unit holding the rest (embeddings, final norm, output head,
a value head). Parameters stay fp32 (the master weights); bf16 compute comes from the engine's
autocast, as without sharding, so sharded and unsharded runs compute the same thing.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist
from torch import Tensor, nn

from rlhfkit.config import ConfigError

if TYPE_CHECKING:
    from accelerate.utils import FullyShardedDataParallelPlugin

SHARDS = "sharded"  # a sharded checkpoint's DCP folder: model and optimizer, one file per process


def _dcp():
    """torch.distributed.checkpoint and its state-dict helpers. They, like torch.distributed.fsdp
    (which pulls in DTensor), take about a second to import, which every `rlhf` command would pay
    at start (the engine imports this module): only sharded runs import them."""
    import torch.distributed.checkpoint as dcp  # noqa: PLC0415 — see above
    from torch.distributed.checkpoint import state_dict  # noqa: PLC0415 — see above

    return dcp, state_dict


def _fsdp_module_class() -> type | None:
    """FSDP2's module class, or None while torch.distributed.fsdp is not imported: then
    nothing has been sharded in this process (`shard` imports it)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return getattr(fsdp, "FSDPModule", None)


def fsdp_plugin() -> FullyShardedDataParallelPlugin | None:
    """The FSDP settings of the accelerate config this process was launched with, or None when
    the run is not sharded. Only FSDP2 is supported (`fsdp_version: 2`)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("1", "true", "yes"):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: PLC0415 — only multi-process runs ask

    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(f"the accelerate config asks for FSDP version {plugin.fsdp_version}: rlhfkit shards with "
                          "FSDP2 only (set fsdp_version: 2, as configs/accelerate/fsdp2.yaml does)")
    return plugin


def is_sharded(module: nn.Module | None) -> bool:
    cls = _fsdp_module_class()
    return cls is not None and isinstance(module, cls)


def block_names(inner: nn.Module, plugin: FullyShardedDataParallelPlugin) -> set[str]:
    """Class names of the modules that become their own FSDP unit: the config's
    `fsdp_transformer_layer_cls_to_wrap`, else the transformers model's `_no_split_modules`."""
    names = plugin.transformer_cls_names_to_wrap or getattr(inner, "_no_split_modules", None) or []
    if isinstance(names, str):
        names = names.split(",")
    return {n.strip() for n in names if n.strip()}


def shard(module: nn.Module, inner: nn.Module, plugin: FullyShardedDataParallelPlugin) -> nn.Module:
    """`fully_shard` every transformer block of `inner` (the transformers model inside
    `module`), then `module` itself as the root unit, every process starting from the main
    process's weights; in place, returns `module`."""
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415 — slow to import (see `_dcp`)

    names = block_names(inner, plugin)
    kwargs = {"reshard_after_forward": plugin.reshard_after_forward}
    if plugin.cpu_offload is not None:
        kwargs["offload_policy"] = plugin.cpu_offload
    blocks = [m for m in module.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(f"FSDP: no transformer block to shard in {type(inner).__name__} (looked for "
                          f"{sorted(names) or 'its _no_split_modules'}): name the block class in the accelerate "
                          "config's fsdp_transformer_layer_cls_to_wrap")
    # DDP broadcasts the main process's weights when it wraps a model; fully_shard keeps each
    # process's own, so weights initialized at random (a LoRA adapter's) would differ per shard.
    _, sd = _dcp()
    start = module.state_dict() if dist.get_rank() == 0 else {}
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(module, **kwargs)
    sd.set_model_state_dict(module, start, options=sd.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return module


@contextlib.contextmanager
def full_parameters(module: nn.Module) -> Iterator[None]:
    """Inside, every FSDP unit of `module` holds its full (all-gathered) parameters as plain
    tensors, and forwards issue no collective: for sampling, where the transformers model is
    called directly (outside the root's forward) and processes decode different lengths, so
    different numbers of forwards. A no-op when `module` is not sharded; collective otherwise
    (every process enters it): one all-gather per unit on entry, none on exit (reshard frees).

    FSDP2's documented switches: `set_reshard_after_forward(False)` so no unit frees its
    gathered weights after a forward, `unshard()` per unit (it is not recursive), then `reshard()`
    per unit and the config's `reshard_after_forward` back (the value `shard` gave them)."""
    if not is_sharded(module):
        yield
        return
    fsdp = _fsdp_module_class()
    # FSDP2 makes the first unit that runs a forward the root: before the run's first forward,
    # a block called by `generate` would claim it. Initialize the real root first (no public API).
    module._get_fsdp_state()._lazy_init()
    units = [m for m in module.modules() if isinstance(m, fsdp)]
    module.set_reshard_after_forward(False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        plugin = fsdp_plugin()
        module.set_reshard_after_forward(bool(plugin.reshard_after_forward) if plugin is not None else True)


def save_shards(module: nn.Module, optimizer, folder: Path) -> None:
    """Every process writes its shard of the model and optimizer states into `folder`
    (torch.distributed.checkpoint); collective: all processes call it."""
    dcp, sd = _dcp()
    model_state, optim_state = sd.get_state_dict(module, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(folder))


def load_shards(module: nn.Module, optimizer, folder: Path) -> None:
    """Read a `save_shards` folder back into the (identically sharded) module and optimizer;
    collective. The processes may be fewer or more than wrote it: DCP reshards on load.
    Raises RuntimeError when the shards do not fit (or cannot be read)."""
    dcp, sd = _dcp()
    model_state, optim_state = sd.get_state_dict(module, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except dcp.CheckpointException as e:  # a BaseException: one per failing process, wrapped
        raise RuntimeError(str(e)) from e
    sd.set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def check_shards(folder: Path) -> None:
    """Raise if the shards' index (DCP's .metadata) is missing or unreadable."""
    _dcp()[0].FileSystemReader(str(folder)).read_metadata()


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on CPU in the main process (an empty dict elsewhere), for
    `save_pretrained`; collective: every process all-gathers its shards. A tied weight (the
    output head sharing the embeddings) is kept under its first name only, as save_pretrained
    writes it: gathered, the two names hold separate copies it would both write."""
    _, sd = _dcp()
    full = sd.get_model_state_dict(model, options=sd.StateDictOptions(full_state_dict=True, cpu_offload=True))
    for name in tied_names(model):
        full.pop(name, None)
    return full


def tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another name's parameter (tied weights)."""
    seen: set[int] = set()
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def plain_class(module: nn.Module) -> type:
    """The module's own class: `fully_shard` swaps it for a subclass named FSDP<Name>."""
    fsdp = _fsdp_module_class()
    return next(cls for cls in type(module).__mro__ if fsdp is None or not issubclass(cls, fsdp))


def unsharded_adapter_model(model: nn.Module, full: dict[str, Tensor]) -> nn.Module:
    """A plain CPU copy of a sharded PEFT (LoRA) model holding its gathered weights `full`, on
    the main process: merging the adapter and saving it need the model object, and a sharded
    one cannot be copied (FSDP refuses deepcopy) nor saved by one process alone."""
    from peft import get_peft_model  # noqa: PLC0415 — peft is heavy; only LoRA runs need it

    base = model.get_base_model()
    copy = get_peft_model(plain_class(base)(base.config), model.peft_config[model.active_adapter])
    missing, unexpected = copy.load_state_dict(full, strict=False)
    if unexpected or set(missing) - tied_names(copy):
        raise RuntimeError(f"the gathered weights do not match the model: missing {missing}, unexpected {unexpected}")
    return copy
