"""The training step of a round: the configured trainer on the round's labels.

init "previous": start from the previous round's policy and train on this round's labels
(iterative / on-policy preference learning). init "start": start from the round-0 policy and
train on every round's labels so far. Ties (label 0.5) carry no preference and are left out;
a round without a decided pair keeps its parent policy (and says so).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhfkit.data.readers import iter_records
from rlhfkit.io import atomic_write_text
from rlhfkit.loop.config import RL_TRAINERS, LoopConfig
from rlhfkit.losses.preference_registry import get_preference_loss
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.recipes.policy_gradient import PolicyGradientConfig, run_policy_gradient
from rlhfkit.recipes.ppo import PPOConfig, run_ppo
from rlhfkit.recipes.reward import RewardConfig, run_reward
from rlhfkit.recipes.sft import SFTConfig, run_sft

Record = dict[str, Any]


def decided_pairs(label_files: Sequence[Path]) -> list[Record]:
    """The decided label records (label ≠ 0.5) of these files, as preference pairs."""
    out = []
    for path in label_files:
        for r, _where in iter_records(path):
            if r["label"] != 0.5:
                out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                            "label": r["label"]})
    return out


def _write_jsonl(path: Path, rows: Sequence[Record]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _common(cfg: LoopConfig, model: str, out_dir: Path, round: int) -> dict[str, Any]:
    return dict(model=model, output_dir=str(out_dir), max_steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                warmup_steps=max(1, cfg.steps // 10), seed=cfg.seed + round, precision=cfg.precision,
                save_every=max(2, cfg.steps // 4))


def train_dpo_family(cfg: LoopConfig, model: str, data: Path, out_dir: Path, round: int) -> dict[str, Any]:
    spec = get_preference_loss(cfg.trainer)
    extra: dict[str, Any] = {}
    if "beta" in spec.hyperparameters:
        extra["beta"] = cfg.beta
    if spec.paired:
        extra["nll_weight"] = cfg.nll_weight
    out = run_dpo(DPOConfig(loss=cfg.trainer, train_data=str(data), ties="drop", **extra,
                            **_common(cfg, model, out_dir, round)))
    return {"final": out["final"], "train_loss": out["metrics"].get("loss")}


def train_expert_iteration(cfg: LoopConfig, model: str, pairs: Sequence[Record], out_dir: Path,
                           round: int) -> dict[str, Any]:
    """SFT on the preferred responses (each distinct one once): rejection-sampling fine-tuning."""
    rows = list({(json.dumps(p["prompt"]), p["chosen"]): {"prompt": p["prompt"], "completion": p["chosen"]}
                 for p in pairs}.values())
    data = out_dir.parent / "sft_data.jsonl"
    _write_jsonl(data, rows)
    out = run_sft(SFTConfig(train_data=str(data), **_common(cfg, model, out_dir, round)))
    return {"final": out["final"], "train_loss": out["metrics"].get("loss"), "sft_examples": len(rows)}


def train_rm_then_rl(cfg: LoopConfig, model: str, start_model: str, data: Path, prompts: Path, out_dir: Path,
                     round: int) -> dict[str, Any]:
    """A reward model on the labels (from the round-0 policy), then online RL against it."""
    rm = run_reward(RewardConfig(train_data=str(data), **{**_common(cfg, start_model, out_dir / "rm", round),
                                                            "max_steps": cfg.rm_steps, "lr": 2e-5}))
    algorithm = cfg.trainer.removeprefix("rm+")
    common = dict(model=model, prompts=str(prompts), reward=f"rm:{rm['final']}", output_dir=str(out_dir / "rl"),
                  max_steps=cfg.steps, prompts_per_step=cfg.rl_prompts_per_step,
                  samples_per_prompt=cfg.rl_samples_per_prompt, max_new_tokens=cfg.max_new_tokens, lr=cfg.lr,
                  kl_coef=cfg.rl_kl_coef, seed=cfg.seed + round,
                  precision=cfg.precision, save_every=max(2, cfg.steps // 4),
                  batch_size=cfg.rl_prompts_per_step * cfg.rl_samples_per_prompt)
    out = (run_ppo(PPOConfig(**common, inner_epochs=2, minibatches=2)) if algorithm == "ppo"
           else run_policy_gradient(PolicyGradientConfig(algorithm=algorithm, **common)))
    return {"final": out["final"], "reward_model": rm["final"], "rm_eval_accuracy": rm.get("eval", {}).get("accuracy"),
            "train_reward": out["metrics"].get("reward/mean"), "final_kl": out["metrics"].get("kl")}


def train_round(cfg: LoopConfig, *, parent: str, start: str, label_files: Sequence[Path], prompts: Path,
                round_dir: Path, round: int) -> dict[str, Any]:
    """Train this round's policy; returns {"final": model path, "pairs": n, …}."""
    pairs = decided_pairs(label_files)
    model = parent if cfg.init == "previous" else start
    if not pairs:
        return {"final": parent, "pairs": 0, "skipped": "no decided pair: the policy is unchanged"}
    data = round_dir / "train_pairs.jsonl"
    _write_jsonl(data, pairs)
    out_dir = round_dir / "model"
    if cfg.trainer == "expert_iteration":
        result = train_expert_iteration(cfg, model, pairs, out_dir, round)
    elif cfg.trainer in RL_TRAINERS:
        result = train_rm_then_rl(cfg, model, start, data, prompts, out_dir, round)
    else:
        result = train_dpo_family(cfg, model, data, out_dir, round)
    return {**result, "pairs": len(pairs), "init": model}
