"""Online DPO vs offline DPO with the same number of labels, on the demo tasks, the exact checkers
as the labeler (issue #14, item 5; results in bench/RESULTS.md).

    python experiments/online_vs_offline_dpo.py --sft runs/demo/sft/final --out runs/online-vs-offline

online:  `rlhf online-dpo` — each of S steps samples k responses to P prompts from the current
         policy, the checkers score them, the best and worst of each prompt form a pair when they
         differ, one DPO(+NLL) step on those pairs.
offline: the same prompts sampled once from the SFT model, paired the same way, the first N pairs
         (N = the number the online run labeled) trained for the same S steps of DPO(+NLL).
Both, and the SFT model, are scored greedily on the same held-out prompts, paired with SFT.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhfkit.judge.loading import load_local_model
from rlhfkit.loop.evaluate import gold_accuracy, paired
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.recipes.online import prompts_for_step
from rlhfkit.recipes.online_dpo import OnlineDPOConfig, run_online_dpo
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.rollout.prompts import demo_prompts
from rlhfkit.rollout.reward_spec import GoldReward
from rlhfkit.rollout.rewards import Sample
from rlhfkit.train.metrics import read_metrics


def offline_pairs(sft: str, prompts, k: int, seed: int) -> list[dict]:
    """k samples per prompt from the SFT model; the best and worst by the checkers when they differ."""
    tokenizer, model = load_local_model(sft)
    gens = generate(model, tokenizer, [p.prompt for p in prompts],
                    SamplingConfig(max_new_tokens=40, temperature=1.0, n=k, seed=seed, batch_size=128))
    gold = GoldReward()
    pairs = []
    for i, p in enumerate(prompts):
        texts = [g.text for g in gens[i * k:(i + 1) * k]]
        scores = gold.score([Sample(p.prompt[-1].content, t, p.meta) for t in texts])
        best, worst = max(range(k), key=lambda j: scores[j]), min(range(k), key=lambda j: scores[j])
        if scores[best] > scores[worst]:
            pairs.append({"prompt": [m.to_dict() for m in p.prompt], "chosen": texts[best],
                          "rejected": texts[worst]})
    return pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eval-per-family", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = dict(max_steps=args.steps, lr=args.lr, nll_weight=1.0, precision="auto", seed=args.seed,
                  warmup_steps=max(1, args.steps // 10), save_every=max(2, args.steps // 4))

    t0 = time.time()
    online = OnlineDPOConfig(model=args.sft, tasks="demo", demo_per_family=120, reward="gold",
                             prompts_per_step=args.prompts, samples_per_prompt=args.k, max_new_tokens=40,
                             batch_size=16, gen_batch_size=128, output_dir=str(args.out / "online"), **common)
    run_online_dpo(online)
    labels = int(sum(m.get("pairs", 0) for m in read_metrics(online.output_dir)))
    online_s = time.time() - t0

    t0 = time.time()
    pool = demo_prompts("train", 120, seed=args.seed)
    prompts = [p for step in range(args.steps)
               for p in prompts_for_step(pool, args.prompts, seed=args.seed, step=step)]
    pairs = offline_pairs(args.sft, prompts, args.k, args.seed)[:labels]
    if not pairs:
        raise SystemExit(f"no decided pair to train on (online labeled {labels}): every sample scored the same")
    data = args.out / "offline_pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run_dpo(DPOConfig(model=args.sft, loss="dpo", beta=0.1, train_data=str(data),
                      output_dir=str(args.out / "offline"),
                      batch_size=max(1, round(len(pairs) / args.steps)), **common))
    offline_s = time.time() - t0

    evals = demo_prompts("test", args.eval_per_family, seed=args.seed)
    outcomes = {}
    for name, path in (("sft", args.sft), ("online", str(args.out / "online" / "final")),
                       ("offline", str(args.out / "offline" / "final"))):
        tokenizer, model = load_local_model(path)
        outcomes[name] = gold_accuracy(model, tokenizer, evals, max_new_tokens=40, batch_size=128)
    report = {"labels": labels, "offline_pairs": len(pairs), "online_s": online_s, "offline_s": offline_s}
    for name in ("sft", "online", "offline"):
        r = outcomes[name]
        report[name] = {k: r[k] for k in ("accuracy", "ci_low", "ci_high", "n")}
        if name != "sft":
            report[name]["vs_sft"] = paired(r["outcomes"], outcomes["sft"]["outcomes"])
    report["online_vs_offline"] = paired(outcomes["online"]["outcomes"], outcomes["offline"]["outcomes"])
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
