"""`rlhf sft | grpo | rloo | remax | reinforce | ppo | best-of-n | expert-iter | dpo`: one command
per recipe, its flags generated from the recipe's config (`cli.config.config_command`)."""

from __future__ import annotations

import os

import typer
from rich.console import Console

from rlhfkit.cli.config import config_command
from rlhfkit.cli.errors import friendly
from rlhfkit.config import ConfigError
from rlhfkit.recipes.best_of_n import BestOfNConfig, ExpertIterationConfig, run_best_of_n, run_expert_iteration
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.recipes.online_dpo import OnlineDPOConfig, run_online_dpo
from rlhfkit.recipes.policy_gradient import (
    GRPOConfig,
    ReinforceConfig,
    ReMaxConfig,
    RLOOConfig,
    command_of,
    run_policy_gradient,
)
from rlhfkit.recipes.ppo import PPOConfig, run_ppo
from rlhfkit.recipes.sft import SFTConfig, run_sft

console = Console(quiet=os.environ.get("RANK", "0") != "0")  # a distributed run reports once, from rank 0
DEMO = "--tasks demo --reward gold"
SCALING = ("\n\nMore GPUs or machines: accelerate launch [--config_file configs/accelerate/fsdp2.yaml] "
           "-m rlhfkit.cli {name} ... (configs for DDP, FSDP2, DeepSpeed and 2 nodes: docs/SCALING.md)")
ONLINE = (
    ("grpo", GRPOConfig, "GRPO: k samples per prompt, group-normalized advantages, KL to the reference in the loss."),
    ("rloo", RLOOConfig, "RLOO: k samples per prompt, leave-one-out baseline, KL in the reward (or the loss)."),
    ("remax", ReMaxConfig, "ReMax: REINFORCE with the greedy decode's reward as the baseline."),
    ("reinforce", ReinforceConfig, "REINFORCE with a moving-average baseline (--algorithm reinforce++: "
                                   "batch-whitened returns of per-token KL-penalized rewards)."),
)


def format_metrics(metrics: dict) -> str:
    """The headline numbers of a finished run: "loss 0.1234, kl 0.0100"."""
    keys = [k for k in ("loss", "eval_loss", "reward", "kl") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _sft(cfg):
    result = run_sft(cfg)
    console.print(f"[green]SFT done[/] → {result['final']}  ({format_metrics(result['metrics'])})")


def _policy_gradient(cfg):
    command = command_of(cfg.algorithm)
    if command != cfg.kind:  # the command names the algorithm (family); another --algorithm is a mistake
        option = f" --algorithm {cfg.algorithm}" if command != cfg.algorithm else ""
        raise ConfigError(f"'rlhf {cfg.kind}' runs {cfg.kind}; for {cfg.algorithm} use 'rlhf {command}{option}'")
    result = run_policy_gradient(cfg)
    console.print(f"[green]{cfg.kind} done[/] → {result['final']}  ({format_metrics(result['metrics'])})")


def _ppo(cfg):
    result = run_ppo(cfg)
    console.print(f"[green]PPO done[/] → {result['final']}  ({format_metrics(result['metrics'])})")


def _best_of_n(cfg):
    s = run_best_of_n(cfg)
    gold = (f"; gold accuracy best {s['gold_accuracy/best']:.3f} vs random {s['gold_accuracy/random']:.3f}"
            if "gold_accuracy/best" in s else "")
    console.print(f"[green]best-of-{s['n']}[/] → {s['out']}: mean reward best {s['reward/best']:.4f} "
                  f"vs random sample {s['reward/random']:.4f}{gold}")


def _expert_iteration(cfg):
    result = run_expert_iteration(cfg)
    for r in result["rounds"]:
        console.print(f"round {r['round']}: best {r['reward/best']:.4f} vs random {r['reward/random']:.4f}, "
                      f"kept {r['kept']}")
    console.print(f"[green]expert iteration done[/] → {result['final']}")


def _dpo(cfg):
    result = run_dpo(cfg)
    shown = [k for k in ("loss", "rewards/accuracy", "eval/rewards/accuracy", "eval/rewards/margin")
             if k in result["metrics"]]
    console.print(f"[green]{cfg.loss.upper()} done[/] → {result['final']}  ("
                  + ", ".join(f"{k} {result['metrics'][k]:.4f}" for k in shown) + ")")


def _online_dpo(cfg):
    result = run_online_dpo(cfg)
    console.print(f"[green]online {cfg.loss.upper()} done[/] → {result['final']}  "
                  f"({format_metrics(result['metrics'])})")


def register(app: typer.Typer) -> None:
    config_command(app, "sft", SFTConfig, friendly(_sft),
                   help="Supervised fine-tuning: completion-only loss on chat-formatted examples.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf sft --train-data data/sft.jsonl --max-steps 200\n\n"
                            "  rlhf sft --config sft.yaml --lr 1e-5 --output-dir runs/sft2\n\n"
                            "  rlhf sft --model HuggingFaceTB/SmolLM2-360M-Instruct --lora-r 16 "
                            "--train-data sft.parquet" + SCALING.format(name="sft"))
    for name, cls, text in ONLINE:
        config_command(app, name, cls, friendly(_policy_gradient), help=text,
                       examples="[bold]Examples[/]\n\n"
                                f"  rlhf {name} --model runs/sft/final {DEMO} --max-steps 50\n\n"
                                f"  rlhf {name} --prompts prompts.jsonl --reward 'gold:1.0,length:0.1' --lora-r 16\n\n"
                                f"  rlhf {name} --model runs/sft/final --prompts prompts.jsonl "
                                "--reward rm:runs/rm/final")
    config_command(app, "ppo", PPOConfig, friendly(_ppo),
                   help="PPO (InstructGPT): value head, per-token KL penalty, GAE, clipped losses, adaptive KL, "
                        "PPO-ptx.",
                   examples="[bold]Examples[/]\n\n"
                            f"  rlhf ppo --model runs/sft/final {DEMO} --max-steps 50\n\n"
                            "  rlhf ppo --prompts prompts.jsonl --reward rm:runs/rm/final --target-kl 6 "
                            "--ptx-coef 0.5 --ptx-data sft.jsonl")
    config_command(app, "best-of-n", BestOfNConfig, friendly(_best_of_n),
                   help="Best-of-n sampling: n responses per prompt, keep the best by reward, write JSONL.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf best-of-n --model runs/sft/final --prompts prompts.jsonl --samples-per-prompt 8 "
                            "--reward gold\n\n"
                            "  rlhf best-of-n --tasks demo --samples-per-prompt 16 --reward rm:runs/rm/final "
                            "--out best.jsonl")
    config_command(app, "expert-iter", ExpertIterationConfig, friendly(_expert_iteration),
                   help="Expert iteration: rounds of best-of-n on train prompts → SFT on the kept best → repeat.",
                   examples="[bold]Examples[/]\n\n"
                            f"  rlhf expert-iter --model runs/sft/final {DEMO} --rounds 3 --samples-per-prompt 8\n\n"
                            "  rlhf expert-iter --prompts prompts.jsonl --reward gold --threshold 1.0 --max-steps 100")
    config_command(app, "dpo", DPOConfig, friendly(_dpo),
                   help="Direct preference optimization: DPO, cDPO, IPO, hinge, robust DPO, SimPO, ORPO, KTO.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf dpo --model runs/sft/final --train-data pairs.jsonl --max-steps 200\n\n"
                            "  rlhf dpo --loss ipo --beta 0.5 --train-data pairs.jsonl --eval-data test.jsonl\n\n"
                            "  rlhf dpo --loss kto --train-data thumbs.jsonl --lora-r 16" + SCALING.format(name="dpo"))
    config_command(app, "online-dpo", OnlineDPOConfig, friendly(_online_dpo),
                   help="Online DPO (OAIF): each step pairs the best and worst of k fresh samples per prompt, "
                        "labeled by the reward (checkers, a reward model), and takes a DPO-family step.",
                   examples="[bold]Examples[/]\n\n"
                            f"  rlhf online-dpo --model runs/sft/final {DEMO} --max-steps 32 --nll-weight 1\n\n"
                            "  rlhf online-dpo --prompts prompts.jsonl --reward rm:runs/rm/final --loss ipo")
