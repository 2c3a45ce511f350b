"""A round's evaluation: held-out accuracy by the exact checkers, paired against the previous
round and round 0, and KL to round 0 with an interval.

Accuracy is greedy exact match on the checkable evaluation prompts (the same prompts every
round, none of them a training prompt), with a bootstrap 95% interval. Two rounds are
compared prompt by prompt: + = prompts only the newer model gets right, − = the reverse,
p = the exact two-sided sign test on (+, −), and the paired gold win rate (tie = ½).
KL(π_round ‖ π_0) is measured on responses sampled from π_round (k1 per response with a
bootstrap interval, and the k3 per-token estimate, which is never negative).

Evaluation prompts without a checker are judged when `eval_judge` names a judge: the round's
greedy answer against round 0's and the previous round's, each pair in both orders; a verdict
that flips with the order is a tie. + / − / ties, the sign test, the win rate (tie = ½) with a
bootstrap interval, and the share of pairs whose two orders agreed (how far to trust the judge).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.eval.kl import kl_of_generations
from rlhfkit.eval.winrate import sign_test, win_rate
from rlhfkit.judge.loading import load_local_model
from rlhfkit.judge.pairwise import PairwiseJudge
from rlhfkit.loop.candidates import conversation_dicts
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.feedback import judge_of
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.rollout.prompts import RLPrompt
from rlhfkit.rollout.reward_spec import GoldReward
from rlhfkit.rollout.rewards import Sample

KEEP_SAMPLES = 8


def gold_accuracy(model, tokenizer, prompts: Sequence[RLPrompt], *, max_new_tokens: int, batch_size: int = 32
                  ) -> dict[str, Any]:
    """Greedy answers to `prompts`, scored by their checkers: accuracy [95% CI], per family,
    mean length, and the per-prompt outcomes the paired comparisons need."""
    if not prompts:
        return {"accuracy": None, "ci_low": None, "ci_high": None, "n": 0, "per_family": {}, "outcomes": [],
                "samples": []}
    gens = generate(model, tokenizer, [p.prompt for p in prompts],
                    SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size),
                    progress=True)
    samples = [Sample(prompt=p.prompt[-1].content, response=g.text, meta=p.meta) for p, g in zip(prompts, gens)]
    outcomes = [int(v >= 0.5) for v in GoldReward().score(samples)]
    ci = win_rate(outcomes)
    families: dict[str, list[int]] = {}
    for p, o in zip(prompts, outcomes):
        families.setdefault(str(p.meta.get("family", "all")), []).append(o)
    return {"accuracy": sum(outcomes) / len(outcomes), "ci_low": ci.ci_low, "ci_high": ci.ci_high,
            "n": len(outcomes), "per_family": {f: sum(v) / len(v) for f, v in sorted(families.items())},
            "mean_response_tokens": sum(len(g.response_ids) for g in gens) / len(gens),
            "truncated": sum(not g.finished for g in gens),
            "outcomes": outcomes,
            "samples": [{"task_id": p.id, "prompt": conversation_dicts(p.prompt), "response": g.text,
                         "correct": bool(o)} for p, g, o in list(zip(prompts, gens, outcomes))[:KEEP_SAMPLES]]}


def paired(newer: Sequence[int], older: Sequence[int]) -> dict[str, Any]:
    """+ / − prompt counts, the sign test, and the paired gold win rate of `newer` over `older`."""
    if len(newer) != len(older):
        raise ValueError(f"{len(newer)} vs {len(older)} outcomes: not the same evaluation prompts")
    wins = sum(a > b for a, b in zip(newer, older))
    losses = sum(a < b for a, b in zip(newer, older))
    wr = win_rate([0.5 + 0.5 * (a - b) for a, b in zip(newer, older)])
    return {"wins": wins, "losses": losses, "p": sign_test(wins, losses), "win_rate": wr.mean,
            "win_rate_ci": [wr.ci_low, wr.ci_high], "delta": (sum(newer) - sum(older)) / len(newer)}


def greedy_answers(model, tokenizer, prompts: Sequence[RLPrompt], *, max_new_tokens: int, batch_size: int
                   ) -> list[str]:
    if not prompts:
        return []
    gens = generate(model, tokenizer, [p.prompt for p in prompts],
                    SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size))
    return [g.text for g in gens]


def judged(judge: PairwiseJudge, prompts: Sequence[RLPrompt], newer: Sequence[str], older: Sequence[str]
           ) -> dict[str, Any]:
    """`newer` against `older` answers to `prompts`, judged in both orders (identical answers tie
    without asking): + / − / ties, sign test p, win rate of `newer` [95% CI], orders agreeing."""
    if not (len(prompts) == len(newer) == len(older)):
        raise ValueError(f"{len(prompts)} prompts, {len(newer)} and {len(older)} answers: not the same prompts")
    todo = [i for i, (a, b) in enumerate(zip(newer, older)) if a != b]
    batch = judge.judge_many([(prompts[i].prompt, newer[i], older[i]) for i in todo]) if todo else None
    outcome = [0.5] * len(prompts)
    for i, verdict in zip(todo, batch.verdicts if batch else ()):
        outcome[i] = verdict.p_a
    wins, losses = outcome.count(1.0), outcome.count(0.0)
    wr = win_rate(outcome)
    consistent = sum(v.consistent for v in batch.verdicts) if batch else 0
    return {"n": len(prompts), "wins": wins, "losses": losses, "ties": len(prompts) - wins - losses,
            "identical": len(prompts) - len(todo), "p": sign_test(wins, losses), "win_rate": wr.mean,
            "win_rate_ci": [wr.ci_low, wr.ci_high], "judge": judge.backend.name,
            "orders_agree": consistent / len(todo) if todo else None,
            "invalid_outputs": batch.n_invalid if batch else 0}


def kl_to_start(cfg: LoopConfig, model, tokenizer, start_model: str, prompts: Sequence[RLPrompt], round: int
                ) -> dict[str, Any] | None:
    """KL(π ‖ π_0) on cfg.kl_prompts evaluation prompts, one response sampled from π each."""
    if not cfg.kl_prompts:
        return None
    chosen = list(prompts[: cfg.kl_prompts])
    gens = generate(model, tokenizer, [p.prompt for p in chosen],
                    SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=1.0, seed=cfg.seed + 1000 + round,
                                   batch_size=cfg.gen_batch_size))
    _, reference = load_local_model(start_model, cfg.precision)
    est = kl_of_generations(model, reference, gens, pad_id=pad_token_id(tokenizer), seed=cfg.seed)
    return est.to_dict()


def evaluate_round(cfg: LoopConfig, model_path: str, start_model: str, prompts: Sequence[RLPrompt], round: int,
                   earlier: dict[int, list[int]], open_prompts: Sequence[RLPrompt] = (),
                   earlier_open: dict[int, list[str]] | None = None) -> dict[str, Any]:
    """Accuracy of the round's model on the checkable `prompts`, paired against the previous round
    and round 0 (their outcomes in `earlier`); with `cfg.eval_judge`, its answers to `open_prompts`
    judged against theirs (`earlier_open`); and its KL to round 0."""
    tokenizer, model = load_local_model(model_path, cfg.precision)
    result = gold_accuracy(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.gen_batch_size)
    if cfg.eval_judge and open_prompts:
        result["open_responses"] = greedy_answers(model, tokenizer, open_prompts, max_new_tokens=cfg.max_new_tokens,
                                                  batch_size=cfg.gen_batch_size)
    if round > 0:
        if prompts:
            result["vs_previous"] = paired(result["outcomes"], earlier[round - 1])
            result["vs_round0"] = paired(result["outcomes"], earlier[0])
        if "open_responses" in result:
            judge = judge_of(cfg, cfg.eval_judge)
            for key, k in (("judge_vs_previous", round - 1), ("judge_vs_round0", 0)):
                result[key] = judged(judge, open_prompts, result["open_responses"], (earlier_open or {})[k])
        result["kl_to_round0"] = kl_to_start(cfg, model, tokenizer, start_model, [*prompts, *open_prompts], round)
    return result
