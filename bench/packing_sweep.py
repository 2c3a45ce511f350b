"""Padded vs packed training steps of our own SFT pieces, and how a packed step scales.

    python bench/packing_sweep.py                         # CPU: bf16 autocast, the embedded model
    python bench/packing_sweep.py --mix 32,1024 --examples 16 --steps 15
    python bench/packing_sweep.py --sweep                 # tokens/s vs batch and sequence length

One optimizer-free step = forward (chunked log-probs, `TokenLogprobs`) + SFT loss + backward,
with the attention kernel training uses on this device (`Engine`'s "auto": fp32 matmul on
CPU, packed SDPA on GPUs). Both layouts see the same examples every step and are interleaved
(padded, packed, padded, ...), so a neighbour's load hits both alike; the first 2 steps of
each are dropped and the median of the rest is printed, with min and max, and the fastest-step
ratio beside the median one.

- padded: `collate_padded`, right-padded to the longest example of the step;
- packed: `collate_packed`, rows of at most 2048 tokens balanced to the narrowest width that
  keeps their number (`pack_rows`), attention confined to each example.

Tokens/s counts real tokens only. `--sweep` prints the packed step's tokens/s for growing
batches of one length and for one batch of growing lengths: with attention per example the
cost stays about linear in real tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.packing import collate_packed, collate_padded
from rlhfkit.data.tokenize import Encoded
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.loading import load_model
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.train.engine import resolve_attention


def examples(lengths: list[int], vocab: int, seed: int) -> list[Encoded]:
    """Synthetic examples of the given lengths: a prompt of a quarter, the rest the response."""
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(100, vocab) for _ in range(n)]
        prompt = max(1, n // 4)
        labels = [IGNORE_INDEX] * (prompt - 1) + ids[prompt:] + [IGNORE_INDEX]
        out.append(Encoded(ids, labels, prompt))
    return out


def step(policy: TokenLogprobs, batch, device, autocast: bool) -> float:
    batch = batch.to(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        logps = policy(batch)
        loss, _ = sft_loss(logps, batch.labels != IGNORE_INDEX)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def compare(policy, exs, device, autocast, steps: int) -> dict:
    layouts = {"padded": collate_padded(exs, 0), "packed": collate_packed(exs, 0)}
    times = {name: [] for name in layouts}
    for _ in range(steps + 2):
        for name, batch in layouts.items():
            times[name].append(step(policy, batch, device, autocast))
    real = sum(len(e) for e in exs)
    row = {"real_tokens": real}
    for name, batch in layouts.items():
        t = times[name][2:]
        row[name] = {"shape": tuple(batch.input_ids.shape), "median_s": statistics.median(t), "min_s": min(t),
                     "max_s": max(t), "tokens_per_s": real / statistics.median(t)}
    row["ratio_median"] = row["padded"]["median_s"] / row["packed"]["median_s"]
    row["ratio_fastest"] = row["padded"]["min_s"] / row["packed"]["min_s"]
    return row


def print_row(label: str, row: dict) -> None:
    pad, pack = row["padded"], row["packed"]
    print(f"{label}: {row['real_tokens']} real tokens | padded {pad['shape']} {pad['median_s']:.3f} s "
          f"[{pad['min_s']:.3f}, {pad['max_s']:.3f}] {pad['tokens_per_s']:,.0f} tok/s | packed {pack['shape']} "
          f"{pack['median_s']:.3f} s [{pack['min_s']:.3f}, {pack['max_s']:.3f}] {pack['tokens_per_s']:,.0f} tok/s | "
          f"packed/padded speed {row['ratio_median']:.2f}× (fastest steps {row['ratio_fastest']:.2f}×)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--examples", type=int, default=16)
    p.add_argument("--mix", default="32,1024", help="lengths drawn uniformly from LO,HI")
    p.add_argument("--demo-lengths", default="62,64,66,70,72,74,78,80",
                   help="the demo batch's lengths (8 SFT examples of the demo tasks)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--no-demo", action="store_true", help="skip the demo batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model).to(device)
    model.set_attn_implementation(resolve_attention("auto", device) or "sdpa")
    model.train()
    policy = TokenLogprobs(model)
    vocab = model.config.vocab_size
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, attention "
          f"{model.config._attn_implementation}, {args.precision}, {args.steps} timed steps per layout", flush=True)
    autocast = args.precision == "bf16"
    demo = [int(n) for n in args.demo_lengths.split(",")]
    if not args.no_demo:
        print_row("demo batch", compare(policy, examples(demo, vocab, args.seed), device, autocast, args.steps))
    lo, hi = map(int, args.mix.split(","))
    rng = random.Random(args.seed)
    mix = [rng.randint(lo, hi) for _ in range(args.examples)]
    print_row(f"mix {lo}–{hi} × {args.examples}", compare(policy, examples(mix, vocab, args.seed), device,
                                                           autocast, args.steps))
    if args.sweep:
        for n in (4, 8, 16, 32):
            print_row(f"sweep batch {n} × 256", compare(policy, examples([256] * n, vocab, n), device, autocast,
                                                          max(5, args.steps // 3)))
        for length in (128, 256, 512, 1024):
            print_row(f"sweep 8 × {length}", compare(policy, examples([length] * 8, vocab, length), device,
                                                     autocast, max(5, args.steps // 3)))


if __name__ == "__main__":
    main()
