"""Sampled tokens/s of `rollout.generate` with linear weights prepacked (`models.prepacked`) and
without, at the GRPO bench's shape, in one process, calls alternating.

    python bench/generation.py                       # 8 prompts × 4 samples, ≤ 64 new tokens, T = 1
    python bench/generation.py --precision fp32 --rounds 8   # fp32 also where the CPU has bf16
    python bench/generation.py --temperature 0 --samples 1 --prompts 32   # greedy, as evaluation decodes

- model: the embedded SmolLM2-135M-Instruct with weights in `--precision` ("auto": bf16 where
  the CPU has native bf16, else fp32 — what `PolicySampler` and evaluation decode with), SDPA.
  Only fp32 weights are prepacked: with bf16 both sides run the same code;
- prompts: the first `--prompts` demo train tasks of the four checkable families (as
  bench/grpo_vs_trl.py), each sampled `--samples` times, all rows in one batch;
- sides: "prepacked" is today's `generate`; "F.linear" is the same call with packing switched
  off (`prepacked._ops_available` → False), i.e. the generate of session 17.
- 1 warmup round dropped, then `--rounds` rounds, the sides alternating; the sampling seed is
  the same for both sides within a round. Prints each side's sampled tokens/s (median
  [min – max]), the ratio of medians and of the fastest calls, and whether greedy decoding
  gave the same tokens on both sides.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import time
from unittest import mock

from common import format_machine, load_average, machine_info  # bench/common.py, beside this script

from rlhfkit.data.schemas import as_conversation
from rlhfkit.models import prepacked
from rlhfkit.models.device import inference_dtype
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.tasks.generate import make_tasks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    args = p.parse_args()

    print(format_machine(machine_info()), flush=True)
    families = ("arithmetic", "units", "strings", "format")
    tasks = make_tasks("train", math.ceil(args.prompts / len(families)), seed=0, families=families)[:args.prompts]
    prompts = [as_conversation(t.prompt) for t in tasks]
    tok = load_tokenizer()
    dtype = inference_dtype(args.precision)
    model = load_model(dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    rows = args.prompts * args.samples
    print(f"\n{args.prompts} prompts × {args.samples} samples = {rows} rows in one batch, ≤ {args.max_new_tokens} "
          f"new tokens, T = {args.temperature}, weights {dtype}", flush=True)

    def call(side: str, seed: int) -> tuple[int, float]:
        cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, n=args.samples,
                             batch_size=rows, seed=seed)
        switch = mock.patch.object(prepacked, "_ops_available", lambda: False) if side == "F.linear" \
            else contextlib.nullcontext()
        with switch:
            start = time.perf_counter()
            out = generate(model, tok, prompts, cfg)
            seconds = time.perf_counter() - start
        return sum(len(g.response_ids) for g in out), seconds

    sides = ("prepacked", "F.linear")
    rates: dict[str, list[float]] = {s: [] for s in sides}
    for r in range(args.rounds + 1):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            tokens, seconds = call(side, seed=r)
            if r > 0:
                rates[side].append(tokens / seconds)
            print(f"round {r}{' (warmup)' if r == 0 else ''} {side:9s}: {tokens} tokens in {seconds:.2f} s = "
                  f"{tokens / seconds:.1f} tokens/s  (load {load_average()})", flush=True)
    print()
    for side in sides:
        v = rates[side]
        print(f"{side:9s}  {statistics.median(v):7.1f} tokens/s [{min(v):.1f} – {max(v):.1f}]")
    print(f"prepacked / F.linear: {statistics.median(rates['prepacked']) / statistics.median(rates['F.linear']):.2f}× "
          f"(medians), {max(rates['prepacked']) / max(rates['F.linear']):.2f}× (fastest calls)")

    greedy = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.0, batch_size=args.prompts)
    a = generate(model, tok, prompts, greedy)
    with mock.patch.object(prepacked, "_ops_available", lambda: False):
        b = generate(model, tok, prompts, greedy)
    same = sum(x.response_ids == y.response_ids for x, y in zip(a, b, strict=True))
    print(f"greedy decoding, {args.prompts} prompts: {same}/{args.prompts} responses token for token equal")


if __name__ == "__main__":
    main()
