"""The longer online-RL runs of bench/RESULTS.md ("Online RL, longer runs"): GRPO, RLOO, ReMax or
PPO from a finished `rlhf demo --full` run's SFT model with the gold (exact-checker) reward, more
steps and more prompts per step than the demo's stage.

    python experiments/online_rl.py --demo runs/demo --algorithm grpo --steps 32 --prompts 16 --lr 1e-5
    python experiments/online_rl.py --demo runs/demo --name gspo --set ratio_level=sequence \
        --set clip_low=3e-4 --set clip_high=4e-4
    python experiments/dpo_more_pairs.py eval --per-family 100 sft=runs/demo/sft/final \\
        grpo=runs/demo/x/rl-grpo/final

The run is the demo's own online stage (`_online_config`: demo train tasks, gold reward, KL
coefficient and sampling of `DemoSettings.full`) with the step count, prompts per step and
learning rate changed; it lands under DEMO/x/rl-ALGORITHM and resumes if interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from rlhfkit.demo.pipeline import DemoContext, DemoSettings, _online_config, _run_online


def _typed(cfg, items: list[str]) -> dict:
    """FIELD=VALUE strings as values of the field's type (bool: true/false)."""
    out = {}
    for item in items:
        key, _, text = item.partition("=")
        current = getattr(cfg, key)  # AttributeError names an unknown field
        if isinstance(current, bool):
            out[key] = text.lower() in ("1", "true", "yes")
        else:
            out[key] = type(current)(text)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="a finished `rlhf demo --full` folder")
    p.add_argument("--algorithm", choices=("grpo", "rloo", "remax", "ppo"), default="grpo")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="samples per prompt")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--micro-batch", type=int, default=8, help="rows per forward (length-sorted)")
    p.add_argument("--name", default="", help="run folder under DEMO/x (default rl-ALGORITHM)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="any other field of the recipe's config (e.g. ratio_level=sequence); repeatable")
    args = p.parse_args(argv)
    settings = DemoSettings.full(args.demo)
    ctx = DemoContext(settings)
    name = f"x/{args.name or 'rl-' + args.algorithm}"
    cfg = _online_config(ctx, args.algorithm, reward="gold", steps=args.steps, lr=args.lr,
                         kl_coef=settings.rl_kl_coef, out=name)
    cfg = dataclasses.replace(cfg, prompts_per_step=args.prompts, samples_per_prompt=args.group,
                              batch_size=args.micro_batch, gen_batch_size=args.prompts * args.group)
    cfg = cfg.replace(**_typed(cfg, args.set)) if args.set else cfg
    t0 = time.time()
    out = _run_online(cfg)
    metrics = out["metrics"]
    print(json.dumps({"final": out["final"], "wall_s": round(time.time() - t0), "final_kl": metrics.get("kl"),
                      "train_reward": metrics.get("reward/mean")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
