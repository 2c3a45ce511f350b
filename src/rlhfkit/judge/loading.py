"""A judge from a `--judge` value, and the local model loading behind it.

`--judge` is 'embedded', 'tiny', 'local:PATH' (a model folder or Hugging Face id) or the
base URL of an OpenAI-compatible endpoint (with a model name). `load_local_model` is also
how the evaluation and the demo load the models whose answers they sample.
"""

from __future__ import annotations

from rlhfkit.config import ConfigError
from rlhfkit.judge.backends import LocalModelBackend, OpenAICompatibleBackend
from rlhfkit.models.device import inference_device, inference_dtype
from rlhfkit.models.loading import ModelNotFound, load_model, load_tokenizer


def load_local_model(path: str, precision: str = "auto"):
    """(tokenizer, model) of 'embedded', 'tiny', a folder or an HF id, on the GPU when there is
    one, in `models.device.inference_dtype(precision)` (bf16 where the hardware has it); a path
    that is none of these is a `ModelNotFound`, not a traceback."""
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot load model '{path}': not 'embedded', a model folder or a Hugging Face id "
                            f"({str(e).splitlines()[0]})") from None
    model = load_model(path, dtype=inference_dtype(precision))
    return tokenizer, model.to(inference_device()).eval()


def backend_from_spec(spec: str, *, judge_model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                      max_new_tokens: int = 256, batch_size: int = 8, max_concurrency: int = 4,
                      max_requests_per_s: float | None = None, timeout_s: float = 60.0):
    """A judge backend from a `--judge` value.

    'embedded' / 'tiny' / 'local:PATH' → `LocalModelBackend` (greedy, on the GPU when there
    is one); 'http(s)://…' → `OpenAICompatibleBackend` with model `judge_model` and the API key
    from `$api_key_env` (none needed for a local server).
    """
    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        if not judge_model:
            raise ConfigError(f"--judge {spec} is an HTTP endpoint: name the model it serves with "
                              "--judge-model (e.g. --judge-model gpt-4o-mini)")
        return OpenAICompatibleBackend(spec, judge_model, api_key_env=api_key_env or None,
                                       timeout_s=timeout_s, max_concurrency=max_concurrency,
                                       max_requests_per_s=max_requests_per_s, max_tokens=max_new_tokens)
    if spec in ("embedded", "tiny") or spec.startswith("local:"):
        path = spec.removeprefix("local:")
        if not path:
            raise ConfigError("--judge local: needs a model folder or id, e.g. local:runs/sft/final")
        tokenizer, model = load_local_model(path)
        return LocalModelBackend(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 name=f"local:{path}")
    raise ConfigError(f"unknown --judge {spec!r}: use 'embedded', 'local:PATH' or an http(s):// URL")
