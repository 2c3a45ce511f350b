"""The multi-turn tool-use experiment of bench/RESULTS.md (Session 10): held-out success of
models in a tool environment (`rlhfkit.rollout.environments`), greedy episodes on the demo's
test split, and the paired sign test between two models on the same episodes.

    python experiments/multiturn_tool_use.py eval --env calculator --per-family 100 \\
        --families arithmetic units --out runs/mt/eval sft=runs/demo/sft/final grpo=runs/mt/grpo/final

Writes OUT/<name>.jsonl (one line per episode: task id, success, turns, tool calls, transcript)
and OUT/summary.json (success, mean turns and tool calls per model; wins, losses and the sign
test's p of each model against the first).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rlhfkit.eval.winrate import sign_test
from rlhfkit.io import atomic_write_text
from rlhfkit.models.device import cpu_supports_bf16
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.rollout.environments import EnvConfig, calculator_sft_record
from rlhfkit.rollout.episodes import EpisodeConfig, run_episodes
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.prompts import demo_prompts


def evaluate(path: str, prompts, cfg: EpisodeConfig, max_new_tokens: int, batch_size: int) -> list[dict]:
    tokenizer = load_tokenizer(path)
    model = load_model(path).eval()
    if cpu_supports_bf16():
        model = model.to(torch.bfloat16)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, n=1, batch_size=batch_size)
    episodes = run_episodes(model, tokenizer, prompts, cfg, sampling)
    return [{"task_id": p.id, "success": ep.reward, **ep.counts, "transcript": "\n".join(ep.texts)}
            for p, ep in zip(prompts, episodes)]


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    return {"episodes": n, "success": sum(r["success"] for r in rows) / n,
            **{f"mean_{k}": sum(r[k] for r in rows) / n for k in ("turns", "tool_calls", "errors", "timeouts")},
            "episodes_with_tool_calls": sum(r["tool_calls"] > 0 for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["eval", "warmstart-data"])
    ap.add_argument("models", nargs="*", help="eval: NAME=PATH, the first is the baseline of the paired tests")
    ap.add_argument("--env", default="calculator")
    ap.add_argument("--per-family", type=int, default=100)
    ap.add_argument("--families", nargs="+", default=["arithmetic", "units"])
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_intermixed_args()  # NAME=PATH may follow the options
    out = Path(args.out)
    if args.cmd == "warmstart-data":  # SFT conversations that call the calculator: `rlhf sft --train-data OUT`
        records = [calculator_sft_record(p) for p in demo_prompts("train", args.per_family, seed=0,
                                                                   families=args.families)]
        kept = [r for r in records if r is not None]
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in kept))
        print(f"wrote {len(kept)} conversations ({len(records) - len(kept)} tasks without an equation) → {out}")
        return
    out.mkdir(parents=True, exist_ok=True)
    prompts = demo_prompts("test", args.per_family, seed=0, families=args.families)
    cfg = EpisodeConfig(args.env, EnvConfig(max_turns=args.max_turns), max_length=args.max_length)
    results: dict[str, list[dict]] = {}
    report: dict = {"env": args.env, "families": args.families, "per_family": args.per_family,
                    "max_turns": args.max_turns, "max_new_tokens": args.max_new_tokens, "models": {}}
    for spec in args.models:
        name, path = spec.split("=", 1)
        t0 = time.time()
        rows = evaluate(path, prompts, cfg, args.max_new_tokens, args.batch_size)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        results[name] = rows
        report["models"][name] = {"path": path, **summary(rows), "seconds": round(time.time() - t0, 1)}
        print(name, json.dumps(report["models"][name]), flush=True)
    base = next(iter(results))
    for name, rows in results.items():
        if name == base:
            continue
        wins = sum(a["success"] > b["success"] for a, b in zip(rows, results[base]))
        losses = sum(a["success"] < b["success"] for a, b in zip(rows, results[base]))
        report["models"][name].update({f"vs_{base}": {"wins": wins, "losses": losses, "p": sign_test(wins, losses)}})
        print(f"{name} vs {base}: wins {wins}, losses {losses}, sign test p = {sign_test(wins, losses):.4g}")
    (out / "summary.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
