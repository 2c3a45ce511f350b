"""Padded vs packed training steps of our own SFT pieces, and how a packed step scales.

    python bench/packing_sweep.py                         # CPU: bf16 autocast, the embedded model
    python bench/packing_sweep.py --mix 32,1024 --examples 16 --steps 15
    python bench/packing_sweep.py --sweep                 # tokens/s vs batch and sequence length
    python bench/packing_sweep.py --masked --examples 8   # + padded rows with their T×T mask (the old kernel path)

One optimizer-free step = forward (chunked log-probs, `TokenLogprobs`) + SFT loss + backward,
with the attention kernel training uses on this device (`Engine`'s "auto": fp32 matmul on
CPU, packed SDPA on GPUs). Both layouts see the same examples every step and are interleaved
(padded, packed, padded, ...), so a neighbour's load hits both alike; the first 2 steps of
each are dropped and the median of the rest is printed, with min and max, and the fastest-step
ratio beside the median one.

- padded: `collate_padded`, right-padded to the longest example of the step;
- packed: `collate_packed`, rows of at most 2048 tokens balanced to the narrowest width that
  keeps their number (`pack_rows`), attention confined to each example;
- with `--masked`, also "masked": the padded batch with its padding mask built (what every
  padded batch did before right-padded rows skipped the mask, `models.attention._unless_packed`):
  the fp32 matmul path up to `MATMUL_MAX_ELEMENTS` scores per call, masked SDPA above.

Tokens/s counts real tokens only. `--sweep` prints the packed step's tokens/s for growing
batches of one length and for one batch of growing lengths: with attention per example the
cost stays about linear in real tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time

import torch

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.packing import collate_packed, collate_padded
from rlhfkit.data.tokenize import Encoded
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models import attention
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


@contextlib.contextmanager
def mask_kept():
    """Padded rows keep their padding mask (no right padding is recognized) inside the block."""
    recognize = attention.right_padded
    attention.right_padded = lambda mask: False
    try:
        yield
    finally:
        attention.right_padded = recognize


def compare(policy, exs, device, autocast, steps: int, masked: bool = False) -> dict:
    layouts = {"padded": (collate_padded(exs, 0), contextlib.nullcontext),
               "packed": (collate_packed(exs, 0), contextlib.nullcontext)}
    if masked:
        layouts["masked"] = (layouts["padded"][0], mask_kept)
    times = {name: [] for name in layouts}
    for _ in range(steps + 2):
        for name, (batch, context) in layouts.items():
            with context():
                times[name].append(step(policy, batch, device, autocast))
    real = sum(len(e) for e in exs)
    row = {"real_tokens": real}
    for name, (batch, _) in layouts.items():
        t = times[name][2:]
        row[name] = {"shape": tuple(batch.input_ids.shape), "median_s": statistics.median(t), "min_s": min(t),
                     "max_s": max(t), "tokens_per_s": real / statistics.median(t)}
    row["ratio_median"] = row["padded"]["median_s"] / row["packed"]["median_s"]
    row["ratio_fastest"] = row["padded"]["min_s"] / row["packed"]["min_s"]
    return row


def print_row(label: str, row: dict) -> None:
    pad, pack = row["padded"], row["packed"]
    masked = row.get("masked")
    print(f"{label}: {row['real_tokens']} real tokens | padded {pad['shape']} {pad['median_s']:.3f} s "
          f"[{pad['min_s']:.3f}, {pad['max_s']:.3f}] {pad['tokens_per_s']:,.0f} tok/s | packed {pack['shape']} "
          f"{pack['median_s']:.3f} s [{pack['min_s']:.3f}, {pack['max_s']:.3f}] {pack['tokens_per_s']:,.0f} tok/s | "
          f"packed/padded speed {row['ratio_median']:.2f}× (fastest steps {row['ratio_fastest']:.2f}×)"
          + (f" | padded with its mask {masked['median_s']:.3f} s [{masked['min_s']:.3f}, {masked['max_s']:.3f}]: "
             f"padded/masked speed {masked['median_s'] / pad['median_s']:.2f}× "
             f"(fastest {masked['min_s'] / pad['min_s']:.2f}×)" if masked else ""), flush=True)


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
    p.add_argument("--no-mix", action="store_true", help="skip the mixed-length batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--masked", action="store_true", help="also time the padded batch with its padding mask built")
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
        print_row("demo batch", compare(policy, examples(demo, vocab, args.seed), device, autocast, args.steps,
                                                     args.masked))
    lo, hi = map(int, args.mix.split(","))
    rng = random.Random(args.seed)
    mix = [rng.randint(lo, hi) for _ in range(args.examples)]
    if not args.no_mix:
        print_row(f"mix {lo}–{hi} × {args.examples}", compare(policy, examples(mix, vocab, args.seed), device,
                                                               autocast, args.steps, args.masked))
    if args.sweep:
        for n in (4, 8, 16, 32):
            print_row(f"sweep batch {n} × 256", compare(policy, examples([256] * n, vocab, n), device, autocast,
                                                          max(5, args.steps // 3)))
        for length in (128, 256, 512, 1024):
            print_row(f"sweep 8 × {length}", compare(policy, examples([length] * 8, vocab, length), device,
                                                     autocast, max(5, args.steps // 3)))


if __name__ == "__main__":
    main()
