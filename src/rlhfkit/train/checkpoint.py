"""Checkpoints that resume exactly.

A checkpoint is a folder `checkpoints/step-000120/` holding the model (loadable with plain
`transformers.AutoModelForCausalLM.from_pretrained`, or a PEFT adapter), the optimizer,
scheduler and RNG states, and `trainer_state.json`. It is written under a temporary name
and renamed into place, so a run killed mid-save never leaves a half checkpoint that
resume would pick up; `latest` names the newest complete one.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhfkit.io import atomic_dir, atomic_write_text

STATE_FILE = "trainer_state.json"


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


def save_checkpoint(run_dir: Path, step: int, *, model, tokenizer, optimizer, scheduler,
                    state: dict[str, Any], extra: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, keep the newest `keep`."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        save_model(model, tokenizer, tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": rng_state(), "extra": extra or {}}, tmp / "training.pt")
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    existing = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpt_root = Path(run_dir) / "checkpoints"
    pointer = ckpt_root / "latest"
    if pointer.exists():
        p = ckpt_root / pointer.read_text().strip()
        if (p / STATE_FILE).exists():
            return p
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / STATE_FILE).exists())
    return done[-1] if done else None


def load_training_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer_state.json, training.pt contents) of a checkpoint folder."""
    state = json.loads((ckpt / STATE_FILE).read_text())
    blob = torch.load(ckpt / "training.pt", map_location="cpu", weights_only=False)
    return state, blob


def save_model(model, tokenizer, out: Path) -> None:
    """save_pretrained of the unwrapped model (safetensors) and its tokenizer into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def save_final(model, tokenizer, out: Path, *, merge_lora: bool = True) -> Path:
    """The run's final model, atomically; LoRA adapters merged so it loads as a plain model."""
    to_save = model
    if merge_lora and hasattr(model, "merge_and_unload"):
        to_save = copy.deepcopy(model).merge_and_unload()
    with atomic_dir(Path(out)) as tmp:
        save_model(to_save, tokenizer, tmp)
    return Path(out)
