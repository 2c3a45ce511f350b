"""A checkpoint with a model's architecture and tokenizer but freshly initialized weights,
for throughput benchmarks on machines that cannot get the real weights (the GPU machine has
no network and the embedded GGUF is larger than what travels to it). Speed depends on shapes,
not on weight values, so tokens/s and MFU measured on it hold for the real model; losses and
sampled lengths do not (use `--fixed-length` in grpo_vs_trl.py).

    python bench/random_checkpoint.py export --like embedded --out .devcarry/smollm2   # config + tokenizer, ~3 MB
    python bench/random_checkpoint.py init --like .devcarry/smollm2 --out /tmp/smollm2-random
    python bench/sft_vs_trl.py --model /tmp/smollm2-random
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rlhfkit.models.loading import resolve_model_path


def export(like: str, out: Path) -> None:
    """Write `like`'s config.json and tokenizer files (no weights) to `out`."""
    path = resolve_model_path(like)
    AutoConfig.from_pretrained(path).save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)


def init(like: str, out: Path, seed: int) -> None:
    """Write a model built from `like`'s config, with transformers' own initialization (seeded),
    and `like`'s tokenizer, to `out` as a safetensors checkpoint."""
    path = resolve_model_path(like)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(path).save_pretrained(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("export", "init"),
                   help="export: config and tokenizer only; init: a full checkpoint with random weights")
    p.add_argument("--like", default="embedded", help="model whose config and tokenizer to use")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.action == "export":
        export(args.like, args.out)
    else:
        init(args.like, args.out, args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
