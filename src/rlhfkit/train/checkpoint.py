"""Checkpoints that resume exactly.

A checkpoint is a folder `checkpoints/step-000120/` holding the model (loadable with plain
`transformers.AutoModelForCausalLM.from_pretrained`, or a PEFT adapter), the optimizer,
scheduler and RNG states, and `trainer_state.json`. A sharded (FSDP) run's checkpoint holds
`sharded/` instead of the model and optimizer: every process's shard of both, written by
torch.distributed.checkpoint (`train.distributed`); a DeepSpeed run's holds `deepspeed/`,
DeepSpeed's own checkpoint of every process's partition (`train.deepspeed`). Either run's
full model is gathered once, into `final/`. It is written under a temporary name
and renamed into place, so a run killed mid-save never leaves a half checkpoint that
resume would pick up; `latest` names the newest complete one. A checkpoint torn some other
way (a full disk, a copy cut short) is caught when it is read: `read_checkpoint` names the
file and the reason, and the engine falls back to the previous one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from rlhfkit.io import atomic_dir, atomic_write_text
from rlhfkit.train import deepspeed as zero
from rlhfkit.train.distributed import SHARDS, check_shards, plain_class

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def shards_staging(run_dir: Path, step: int) -> Path:
    """Where the processes of a sharded run write step-N's shards before `save_checkpoint`
    moves them into the checkpoint (hidden, so neither resume nor pruning sees them)."""
    return Path(run_dir) / "checkpoints" / f".{checkpoint_name(step)}.shards"


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    state: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 2,
                    base_model: str | None = None, shards: Path | None = None, shards_name: str = SHARDS) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, keep the newest `keep`.
    base_model: what a LoRA adapter's config names as its base (see `save_model`).
    shards: a sharded run's model and optimizer shards (`shards_staging`), moved in whole
    instead of writing `model` and `optimizer` (both ignored then), as `shards_name` (FSDP's
    `sharded`, or DeepSpeed's `deepspeed`)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        if shards is not None:
            os.replace(shards, tmp / shards_name)
        else:
            save_model(model, tokenizer, tmp / "model", base_model=base_model)
        torch.save({"optimizer": optimizer.state_dict() if shards is None else None,
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(), "extra": extra or {}}, tmp / "training.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    existing = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, newest first. Each was renamed into place whole (a save
    killed midway leaves only a hidden temporary folder), so the newest by step is the latest
    even when the `latest` pointer was not yet rewritten."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.is_dir() and (p / STATE_FILE).exists()), reverse=True)


def set_aside(unreadable: list[Path], *, latest: Path) -> None:
    """Rename unreadable checkpoints to corrupt-step-N (kept to look at, out of resume's and
    pruning's way) and point `latest` at the one resumed."""
    for path in unreadable:
        aside = path.with_name(f"corrupt-{path.name}")
        path.rename(aside)
        log.warning("moved the unreadable checkpoint %s to %s", path, aside)
    if unreadable:
        atomic_write_text(latest.parent / "latest", latest.name + "\n")


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read into memory, nothing applied yet."""

    path: Path
    state: dict[str, Any]            # trainer_state.json
    training: dict[str, Any]         # training.pt: optimizer, scheduler, rng, extra
    weights: dict[str, torch.Tensor]  # the model's tensors, or the adapter's when `adapter`
    adapter: bool
    sharded: bool = False             # model and optimizer are in `path/sharded` (DCP), not read yet
    deepspeed: bool = False           # model and optimizer are in `path/deepspeed` (DeepSpeed's), not read yet


def short_reason(e: BaseException) -> str:
    """An error's message on one line, its first sentence when long (torch appends a paragraph)."""
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > 120 and ". " in text:
        text = text.split(". ")[0]
    return text if len(text) <= 160 else text[:157] + "..."


def read_checkpoint(path: Path) -> Checkpoint:
    """Every file of a checkpoint, read and checked before any of it touches the model:
    raises CorruptCheckpoint("step-000004/training.pt: <why>") for the first that fails."""
    path = Path(path)

    def read(name: str, reader):
        try:
            return reader(path / name)
        except Exception as e:  # torn zip, torn safetensors header, bad JSON: all mean "cannot use"
            raise CorruptCheckpoint(f"{path.name}/{name}: {short_reason(e)}") from e

    state = read(STATE_FILE, lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CorruptCheckpoint(f"{path.name}/{STATE_FILE}: no step number in it")
    training = read("training.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False))
    if (path / SHARDS).is_dir():
        read(f"{SHARDS}/.metadata", lambda metadata: check_shards(metadata.parent))
        return Checkpoint(path, state, training, {}, adapter=False, sharded=True)
    if (path / zero.FOLDER).is_dir():
        read(zero.FOLDER, zero.check_state)
        return Checkpoint(path, state, training, {}, adapter=False, deepspeed=True)
    if not isinstance(training, dict) or training.get("optimizer") is None:
        raise CorruptCheckpoint(f"{path.name}/training.pt: no optimizer state in it")
    model_dir = path / "model"
    if (model_dir / ADAPTER_WEIGHTS).exists():
        weights = read(f"model/{ADAPTER_WEIGHTS}", load_file)
        return Checkpoint(path, state, training, weights, adapter=True)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CorruptCheckpoint(f"{path.name}/model: no weights in it")
    weights = {}
    for f in files:
        weights.update(read(f"model/{f.name}", load_file))
    return Checkpoint(path, state, training, weights, adapter=False)


def save_model(model, tokenizer, out: Path, *, base_model: str | None = None,
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """save_pretrained of the unwrapped model (safetensors) and its tokenizer into `out`.

    A PEFT model writes its adapter; `base_model` then replaces the base named in
    adapter_config.json (peft records whatever string the base was loaded from, often a
    relative path or nothing), so `PeftModel.from_pretrained(base, out)` finds it.
    state_dict: the weights to write instead of the model's own (a sharded model's, gathered)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if state_dict else {}))
    fix_architecture(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    adapter_config = out / ADAPTER_CONFIG
    if base_model is not None and adapter_config.exists():
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))


def is_adapter_model(model) -> bool:
    """A PEFT model: its save_pretrained writes only the adapter."""
    return hasattr(model, "merge_and_unload")


def fix_architecture(model, out: Path) -> None:
    """FSDP2 swaps a sharded module's class for a subclass named FSDP<Name>, and
    save_pretrained records that name as the architecture: write the model's own class name."""
    config = out / "config.json"
    if not config.exists() or plain_class(model) is type(model):
        return
    data = json.loads(config.read_text())
    data["architectures"] = [plain_class(model).__name__]
    config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_final(model, tokenizer, out: Path, *, merge_lora: bool = True,
               state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """The run's final model, atomically; LoRA adapters merged so it loads as a plain model.
    state_dict: a sharded model's weights gathered in full (`distributed.full_state_dict`)."""
    to_save = model
    if merge_lora and is_adapter_model(model):
        to_save = copy.deepcopy(model).merge_and_unload()
    with atomic_dir(Path(out)) as tmp:
        save_model(to_save, tokenizer, tmp, state_dict=state_dict)
    return Path(out)


def save_adapter(model, tokenizer, out: Path, *, base_model: str) -> Path:
    """A LoRA run's adapter (unmerged), atomically, naming `base_model` as its base."""
    with atomic_dir(Path(out)) as tmp:
        save_model(model, tokenizer, tmp, base_model=base_model)
    return Path(out)


def apply_weights(model, state: dict[str, torch.Tensor], *, adapter: bool) -> None:
    """Load a checkpoint's weights (full model, or a PEFT adapter when `adapter`) into `model`."""
    if adapter:
        from peft import set_peft_model_state_dict  # noqa: PLC0415 — peft is heavy; only LoRA checkpoints need it

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
