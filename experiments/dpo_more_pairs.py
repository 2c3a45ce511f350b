"""The DPO-family experiment of bench/RESULTS.md ("5× the decided pairs"): more preference
samples from a finished `rlhf demo --full` run's SFT model, DPO / RPO / IPO / KTO on the decided
pairs, and a larger paired held-out evaluation.

    python experiments/dpo_more_pairs.py sample --demo runs/demo --prompts 320 --samples 8
    python experiments/dpo_more_pairs.py train --demo runs/demo --name rpo --loss dpo --nll-weight 1
    python experiments/dpo_more_pairs.py eval --per-family 100 sft=runs/demo/sft/final rpo=runs/demo/x/rpo/final

Everything lands under DEMO/x/. The pieces are the demo's own: the SFT model's sampler and the
simulated annotator (`rlhfkit.demo.preferences`), `run_dpo`, greedy decoding and the exact checkers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rlhfkit.data.schemas import as_conversation
from rlhfkit.demo.pipeline import DemoSettings
from rlhfkit.demo.preferences import pair_to_record, simulate_preferences
from rlhfkit.eval.accuracy import exact_match
from rlhfkit.eval.winrate import sign_test
from rlhfkit.judge.loading import load_local_model
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.tasks.check import check
from rlhfkit.tasks.generate import make_tasks


def _train_tasks(settings: DemoSettings):
    """The checkable train prompts the demo's preference stage draws from, in its order."""
    return [t for t in make_tasks("train", settings.train_per_family * 2, seed=settings.seed + 1) if t.checkable]


def sample(args) -> None:
    s = DemoSettings.full(args.demo)
    tasks = _train_tasks(s)[:args.prompts]
    t0 = time.time()
    tok, model = load_local_model(str(args.demo / "sft" / "final"), "auto")
    gens = generate(model, tok, [as_conversation(t.prompt) for t in tasks],
                    SamplingConfig(max_new_tokens=s.max_new_tokens, temperature=1.0, n=args.samples, seed=args.seed),
                    progress=True)
    n = args.samples
    out = [{"task_id": t.id, "responses": [g.text for g in gens[i * n:(i + 1) * n]]} for i, t in enumerate(tasks)]
    path = args.demo / "x" / "samples.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    correct = sum(check(t, r) for t, x in zip(tasks, out) for r in x["responses"])
    print(f"{len(tasks)} prompts × {n} samples in {time.time() - t0:.0f} s; {correct / (len(tasks) * n):.1%} correct "
          f"→ {path}")


def train(args) -> None:
    s = DemoSettings.full(args.demo)
    by_id = {t.id: t for t in _train_tasks(s)}
    samples = json.loads((args.demo / "x" / "samples.json").read_text())
    pairs, stats = simulate_preferences([by_id[x["task_id"]] for x in samples], [x["responses"] for x in samples],
                                        noise=args.noise, seed=0, model_version="sft",
                                        max_pairs_per_prompt=args.pairs_per_prompt)
    out = args.demo / "x" / args.name
    out.mkdir(parents=True, exist_ok=True)
    data = out / "pairs.jsonl"
    data.write_text("".join(json.dumps(pair_to_record(p)) + "\n" for p in pairs))
    print(f"{stats.pairs} pairs, {stats.pairs - stats.ties} decided ({stats.flipped} flipped), {stats.ties} ties")
    cfg = DPOConfig(model=str(args.demo / "sft" / "final"), loss=args.loss, beta=args.beta, train_data=str(data),
                    eval_data=str(args.demo / "data" / "prefs_test.jsonl"), output_dir=str(out), max_steps=args.steps,
                    batch_size=args.batch, lr=args.lr, warmup_steps=max(1, args.steps // 10), seed=0,
                    save_every=1000, ties="drop", nll_weight=args.nll_weight)
    t0 = time.time()
    result = run_dpo(cfg)
    print(json.dumps({"final": result["final"], "train_s": round(time.time() - t0),
                      **{k: v for k, v in result["metrics"].items() if k.startswith("eval/")}}))


def evaluate(args) -> None:
    tasks = [t for t in make_tasks("test", args.per_family, seed=0) if t.checkable]
    outcomes: dict[str, list[int]] = {}
    for spec in args.models:
        name, path = spec.split("=", 1)
        tok, model = load_local_model(path, "auto")
        result = exact_match(model, tok, tasks, max_new_tokens=40, keep_samples=len(tasks))
        outcomes[name] = [int(sample["correct"]) for sample in result.samples]
    base_name, base = next(iter(outcomes.items()))
    for name, o in outcomes.items():
        wins = sum(a > b for a, b in zip(o, base))
        losses = sum(a < b for a, b in zip(o, base))
        print(f"{name:10s} {sum(o) / len(o):7.2%} ({sum(o)}/{len(o)})   vs {base_name}: +{wins} −{losses}   "
              f"sign test p = {sign_test(wins, losses):.4f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("sample", help="sample the SFT model on the demo's train prompts")
    a.add_argument("--demo", type=Path, required=True, help="a finished `rlhf demo --full` folder")
    a.add_argument("--prompts", type=int, default=320)
    a.add_argument("--samples", type=int, default=8)
    a.add_argument("--seed", type=int, default=7)
    a.set_defaults(fn=sample)
    b = sub.add_parser("train", help="label the samples and train one DPO-family loss on the decided pairs")
    b.add_argument("--demo", type=Path, required=True)
    b.add_argument("--name", required=True)
    b.add_argument("--loss", default="dpo")
    b.add_argument("--nll-weight", type=float, default=0.0)
    b.add_argument("--beta", type=float, default=0.1)
    b.add_argument("--lr", type=float, default=5e-6)
    b.add_argument("--steps", type=int, default=60)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--pairs-per-prompt", type=int, default=8)
    b.add_argument("--noise", type=float, default=0.1)
    b.set_defaults(fn=train)
    c = sub.add_parser("eval", help="greedy exact match on the first N test tasks per family, paired vs the first")
    c.add_argument("--per-family", type=int, default=100)
    c.add_argument("models", nargs="+", help="NAME=PATH; the first is the baseline")
    c.set_defaults(fn=evaluate)
    args = p.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
