"""A rollout's log-prob passes with each prompt stored once per group vs once per row.

    python bench/shared_prompts.py                          # the GRPO bench's shape: 8 prompts × 4, P ≈ 46, R ≤ 64
    python bench/shared_prompts.py --prompt 200,400 --response 32,256 --prompts 4 --samples 8

The online recipes' passes over a rollout (`Rollout.lm_batch`): per micro-batch of
`--micro-batch` rows, the update's forward (log-probs, entropy without a gradient, as GRPO
runs it) + backward, and the reference pass (no gradient), laid out

- plain: one right-padded row per sample, prompt + response (`micro_batches` sorted by length);
- shared: the rows of one prompt in packed rows with the prompt stored once
  (`micro_batches(by_prompt=True)`, `Rollout.lm_batch(share_prompts=True)`).

Synthetic token ids (random, seeded), prompt and response lengths drawn uniformly from the
given ranges; bf16 autocast on CPU with fp32 weights, the training attention kernel
(`Engine`'s "auto"). The two layouts alternate, 2 warmup rounds dropped; medians with
[min – max] and the fastest-round ratio. Tokens/s counts positions the model computes
(real tokens, prompts counted once per row for plain and once per group for shared).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from rlhfkit.models.loading import load_model
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.models.value import PolicyValueModel
from rlhfkit.rollout.rollout import Rollout, micro_batches, policy_outputs
from rlhfkit.train.engine import resolve_attention


def synthetic_rollout(prompts: int, samples: int, prompt_range: tuple[int, int], response_range: tuple[int, int],
                      vocab: int, seed: int) -> Rollout:
    rng = random.Random(seed)
    rows_p, rows_r, index = [], [], []
    for g in range(prompts):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))]
        for _ in range(samples):
            rows_p.append(prompt)
            rows_r.append([rng.randrange(100, vocab) for _ in range(rng.randint(*response_range))])
            index.append(g)

    def padded(rows):
        out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
        mask = torch.zeros_like(out)
        for i, r in enumerate(rows):
            out[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return out, mask

    (p_ids, p_mask), (r_ids, r_mask) = padded(rows_p), padded(rows_r)
    n = len(rows_p)
    return Rollout(prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids, response_mask=r_mask.float(),
                   scores=torch.zeros(n), source_scores={}, prompt_index=torch.tensor(index), group_size=samples,
                   finished=torch.ones(n, dtype=torch.bool), texts=("",) * n)


def update_pass(policy: PolicyValueModel, parts: list[Rollout], share: bool, autocast: bool) -> float:
    start = time.perf_counter()
    for part in parts:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = policy_outputs(policy, part, 0, temperature=1.0, with_entropy=True, entropy_grad=False,
                                 share_prompts=share)
            loss = -(out.logprobs * part.response_mask).sum() / part.response_mask.sum()
        loss.backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def reference_pass(reference: ReferencePolicy, parts: list[Rollout], share: bool, autocast: bool) -> float:
    start = time.perf_counter()
    for part in parts:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            reference.logprobs(part.lm_batch(0, share_prompts=share))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--prompt", default="40,52", help="prompt tokens LO,HI (the demo prompts: 40–52)")
    p.add_argument("--response", default="10,64", help="response tokens LO,HI")
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward (GRPO's batch_size default: 8)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    lo_hi = lambda s: tuple(int(x) for x in s.split(","))  # noqa: E731

    model = load_model(args.model)
    model.set_attn_implementation(resolve_attention("auto", torch.device("cpu")))
    reference = ReferencePolicy(model)
    policy = PolicyValueModel(model)
    policy.train()
    rollout = synthetic_rollout(args.prompts, args.samples, lo_hi(args.prompt), lo_hi(args.response),
                                model.config.vocab_size, args.seed)
    autocast = args.precision == "bf16"
    layouts = {}
    for name, share in (("plain", False), ("shared", True)):
        rows = micro_batches(rollout, range(rollout.num_rows), args.micro_batch, by_prompt=share)
        parts = [rollout.select(r) for r in rows]
        batches = [part.lm_batch(0, share_prompts=share) for part in parts]
        layouts[name] = (share, parts, sum(b.num_tokens for b in batches), sum(b.input_ids.numel() for b in batches))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, attention "
          f"{model.config._attn_implementation}, {args.precision}; {args.prompts} prompts × {args.samples} "
          f"samples, prompt {args.prompt} tokens, response {args.response}, micro-batches of {args.micro_batch} "
          f"rows; {args.rounds} timed rounds after 2", flush=True)
    for name, (_, parts, real, positions) in layouts.items():
        print(f"{name:7s} {len(parts)} micro-batches, {real} tokens computed ({positions} positions with padding)")
    times = {(name, kind): [] for name in layouts for kind in ("update", "reference")}
    for _ in range(args.rounds + 2):
        for name, (share, parts, _, _) in layouts.items():
            times[name, "update"].append(update_pass(policy, parts, share, autocast))
            times[name, "reference"].append(reference_pass(reference, parts, share, autocast))
    for kind in ("update", "reference"):
        stats = {}
        for name in layouts:
            t = times[name, kind][2:]
            stats[name] = (statistics.median(t), min(t), max(t))
            print(f"{kind:9s} {name:7s} {stats[name][0]:.3f} s [{stats[name][1]:.3f} – {stats[name][2]:.3f}]")
        print(f"{kind:9s} shared/plain speed {stats['plain'][0] / stats['shared'][0]:.2f}× "
              f"(fastest rounds {stats['plain'][1] / stats['shared'][1]:.2f}×)", flush=True)


if __name__ == "__main__":
    main()
