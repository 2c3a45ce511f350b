"""Best-of-n sampling and expert iteration (rejection-sampling fine-tuning), top to bottom.

Best-of-n: sample n responses per prompt, score them, keep the best. With rewards r_1..r_n
of one prompt, the kept response scores max_j r_j, against E[r] = mean_j r_j for a response
drawn at random — the gap is what the selection buys.

Expert iteration, K rounds starting from π_0:
1. best-of-n with π_k on the training prompts;
2. keep the best response of each prompt whose reward is ≥ `threshold`;
3. SFT π_k on the kept responses (`recipes.sft`) → π_{k+1}; the next round samples from it.
Each round lives in `run_dir/round-k/` (the kept data, the SFT run); a finished round is
not redone when the command is run again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import Config, check, param
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import conversation_to_dicts
from rlhfkit.io import atomic_write_text
from rlhfkit.judge.reward import JUDGE_REWARD_BUILDERS
from rlhfkit.models.device import inference_device
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.recipes.online import step_seed
from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.rollout.prompts import DEMO_FAMILIES, RLPrompt, named_prompts
from rlhfkit.rollout.reward_spec import build_reward, parse_reward_spec
from rlhfkit.rollout.rewards import WeightedRewards
from rlhfkit.rollout.rollout import score_generations
from rlhfkit.tasks.check import check as check_task
from rlhfkit.train.checkpoint import save_final
from rlhfkit.train.engine import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BestOfN:
    """The n scored responses of one prompt and the best of them (first among ties)."""

    prompt: RLPrompt
    responses: tuple[str, ...]
    rewards: tuple[float, ...]
    gold: tuple[float, ...] | None   # demo checker per response, when the prompt is a demo task

    @property
    def best_index(self) -> int:
        return max(range(len(self.rewards)), key=lambda j: (self.rewards[j], -j))

    @property
    def best(self) -> str:
        return self.responses[self.best_index]

    @property
    def best_reward(self) -> float:
        return self.rewards[self.best_index]

    @property
    def mean_reward(self) -> float:
        return sum(self.rewards) / len(self.rewards)

    def record(self) -> dict:
        """A JSONL row that `rlhf sft` reads (prompt + completion), with the scores."""
        conv = self.prompt.prompt
        prompt = conv[0].content if len(conv) == 1 and conv[0].role == "user" else conversation_to_dicts(conv)
        meta = {k: v for k, v in self.prompt.meta.items() if k not in ("task", "conversation")}
        return {**meta, "prompt": prompt, "completion": self.best, "reward": self.best_reward,
                "mean_reward": self.mean_reward, "n": len(self.rewards)}


@torch.no_grad()
def best_of_n(model, tokenizer, prompts: Sequence[RLPrompt], reward: WeightedRewards,
              sampling: SamplingConfig) -> list[BestOfN]:
    """`sampling.n` responses per prompt, scored; one BestOfN per prompt, in prompt order."""
    generations = generate(model, tokenizer, [p.prompt for p in prompts], sampling)
    scores, _ = score_generations(reward, prompts, generations)
    out = []
    n = sampling.n
    for i, p in enumerate(prompts):
        gens = generations[i * n:(i + 1) * n]
        gold = None
        if "task" in p.meta:
            gold = tuple(float(check_task(p.meta["task"], g.text)) for g in gens)
        out.append(BestOfN(p, tuple(g.text for g in gens), tuple(scores[i * n:(i + 1) * n].tolist()), gold))
    return out


def summarize(results: Sequence[BestOfN]) -> dict[str, float]:
    """Mean reward of the best response vs a random one (the mean over samples), and the
    same for gold accuracy on demo tasks."""
    out = {"reward/best": sum(r.best_reward for r in results) / len(results),
           "reward/random": sum(r.mean_reward for r in results) / len(results),
           "prompts": float(len(results))}
    with_gold = [r for r in results if r.gold is not None]
    if with_gold:
        out["gold_accuracy/best"] = sum(r.gold[r.best_index] for r in with_gold) / len(with_gold)
        out["gold_accuracy/random"] = sum(sum(r.gold) / len(r.gold) for r in with_gold) / len(with_gold)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ============================================================================ best-of-n
@dataclass(frozen=True)
class BestOfNConfig(Config):
    kind = "best-of-n"
    model: str = param("embedded", "model to sample from: 'embedded', a Hugging Face id, a local folder, or 'tiny'")
    prompts: str = param("", "prompts: JSONL with 'prompt' and optional 'answer', 'task_id', 'tests'")
    tasks: str = param("", "'demo' to use the demo tasks instead of a prompts file", choices=("", "demo"))
    demo_split: str = param("test", "demo split to use (with --tasks demo)", choices=("train", "test"))
    demo_per_family: int = param(16, "demo tasks per family (with --tasks demo)")
    demo_families: tuple[str, ...] = param(DEMO_FAMILIES, "demo task families")
    samples_per_prompt: int = param(8, "responses sampled per prompt (the n of best-of-n)", old_names=("n",))
    reward: str = param("gold", "reward spec (see `rlhf grpo --help`)")
    max_new_tokens: int = param(64, "longest response in tokens")
    temperature: float = param(1.0, "sampling temperature")
    top_p: float = param(1.0, "nucleus sampling threshold")
    batch_size: int = param(32, "sequences decoded together")
    seed: int = param(0, "sampling seed")
    out: str = param("best_of_n.jsonl", "where to write the best response per prompt (JSONL)")

    def validate(self) -> None:
        check(bool(self.prompts) != bool(self.tasks), "give exactly one of prompts (a JSONL file) or tasks=demo")
        check(self.samples_per_prompt >= 1, "samples_per_prompt must be ≥ 1")
        check(self.temperature > 0, "temperature must be > 0 (n greedy samples would all be the same)")
        check(self.max_new_tokens >= 1 and self.batch_size >= 1, "max_new_tokens and batch_size must be ≥ 1")
        parse_reward_spec(self.reward)


def run_best_of_n(cfg: BestOfNConfig) -> dict:
    """Write the best response per prompt to cfg.out; returns the summary (also saved as
    <out>.summary.json)."""
    prompts = named_prompts(cfg.prompts, cfg.tasks, split=cfg.demo_split, per_family=cfg.demo_per_family,
                            seed=cfg.seed, families=cfg.demo_families)
    reward = build_reward(cfg.reward, builders=JUDGE_REWARD_BUILDERS)
    tokenizer, model = load_tokenizer(cfg.model), load_model(cfg.model, seed=cfg.seed).to(inference_device())
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                              n=cfg.samples_per_prompt, batch_size=cfg.batch_size, seed=cfg.seed)
    results = best_of_n(model, tokenizer, prompts, reward, sampling)
    out = Path(cfg.out)
    _write_jsonl(out, [r.record() for r in results])
    summary = {**summarize(results), "n": cfg.samples_per_prompt, "out": str(out)}
    atomic_write_text(out.with_name(out.name + ".summary.json"), json.dumps(summary, indent=2))
    return summary


# ============================================================================ expert iteration
@dataclass(frozen=True)
class ExpertIterationConfig(TrainConfig):
    kind = "expert-iter"
    prompts: str = param("", "training prompts: JSONL with 'prompt' and optional 'answer', 'task_id', 'tests'")
    tasks: str = param("", "'demo' to train on the demo tasks instead of a prompts file", choices=("", "demo"))
    demo_per_family: int = param(64, "demo train tasks per family (with --tasks demo)")
    demo_families: tuple[str, ...] = param(DEMO_FAMILIES, "demo task families")
    rounds: int = param(2, "K: rounds of sample → keep best → SFT")
    samples_per_prompt: int = param(8, "responses sampled per prompt each round", old_names=("n",))
    reward: str = param("gold", "reward spec (see `rlhf grpo --help`)")
    threshold: float = param(0.5, "keep a prompt's best response only if its reward is ≥ this")
    max_new_tokens: int = param(64, "longest response in tokens")
    temperature: float = param(1.0, "sampling temperature")
    top_p: float = param(1.0, "nucleus sampling threshold")
    gen_batch_size: int = param(32, "sequences decoded together")
    max_steps: int = param(50, "SFT optimizer steps per round")
    lr: float = param(2e-5, "peak learning rate of each round's SFT")
    packing: bool = param(True, "pack SFT micro-batches into padding-free rows")
    output_dir: str = param("runs/expert-iter", "run folder: round-k/ (kept data, SFT run), metrics.jsonl, final/")

    def validate(self) -> None:
        super().validate()
        check(bool(self.prompts) != bool(self.tasks), "give exactly one of prompts (a JSONL file) or tasks=demo")
        check(self.rounds >= 1 and self.samples_per_prompt >= 1, "rounds and samples_per_prompt must be ≥ 1")
        check(self.temperature > 0, "temperature must be > 0")
        parse_reward_spec(self.reward)


def run_expert_iteration(cfg: ExpertIterationConfig) -> dict:
    """K rounds; returns {"final": path of the last model, "rounds": per-round summaries}."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.save(run_dir / "config.yaml")
    prompts = named_prompts(cfg.prompts, cfg.tasks, split="train", per_family=cfg.demo_per_family, seed=cfg.seed,
                            families=cfg.demo_families)
    reward = build_reward(cfg.reward, builders=JUDGE_REWARD_BUILDERS)
    current = cfg.model
    summaries = []
    for k in range(1, cfg.rounds + 1):
        round_dir = run_dir / f"round-{k}"
        summary_path = round_dir / "summary.json"
        if summary_path.exists() and cfg.resume:  # finished earlier: continue from its model
            summary = json.loads(summary_path.read_text())
            summaries.append(summary)
            current = summary["model"]
            continue
        # 1. best-of-n with the current model
        tokenizer, model = load_tokenizer(current), load_model(current, seed=cfg.seed).to(inference_device())
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                                  n=cfg.samples_per_prompt, batch_size=cfg.gen_batch_size,
                                  seed=step_seed(cfg.seed, k, "expert-iter"))
        results = best_of_n(model, tokenizer, prompts, reward, sampling)
        del model
        # 2. keep the best of each prompt that clears the threshold
        kept = [r for r in results if r.best_reward >= cfg.threshold]
        data = round_dir / "kept.jsonl"
        _write_jsonl(data, [r.record() for r in kept])
        summary = {"round": k, **summarize(results), "kept": len(kept), "sampled_from": current}
        if not kept:
            raise DataError(f"round {k}: no prompt's best response reached threshold {cfg.threshold} "
                            f"(best mean reward {summary['reward/best']:.3f}); lower --threshold", path=str(data))
        # 3. SFT the current model on them → the next round's model
        sft_cfg = SFTConfig(**{f: getattr(cfg, f) for f in TrainConfig.field_names()},
                            train_data=str(data), packing=cfg.packing)
        sft_cfg = sft_cfg.replace(model=current, output_dir=str(round_dir / "sft"))
        result = run_sft(sft_cfg)
        current = result["final"]
        summary.update({"model": current, "sft_loss": result["metrics"].get("loss")})
        atomic_write_text(summary_path, json.dumps(summary, indent=2))
        summaries.append(summary)
        log.info("expert iteration round %d: best %.3f vs random %.3f, kept %d/%d", k, summary["reward/best"],
                 summary["reward/random"], len(kept), len(results))
    _write_jsonl(run_dir / "metrics.jsonl", [{"step": s["round"], **{k: v for k, v in s.items() if k != "round"}}
                                             for s in summaries])
    final = run_dir / "final"
    save_final(load_model(current), load_tokenizer(current), final)
    return {"final": str(final), "rounds": summaries}
