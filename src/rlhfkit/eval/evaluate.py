"""Measure every model the pipeline produced, the way the literature does (`rlhf eval`).

For each model, on held-out prompts (the demo test split, or a file):

  * gold exact-match accuracy on the checkable tasks (`eval.accuracy.exact_match`, greedy);
    with `pass_k` also pass@k and majority-vote accuracy over samples_per_prompt samples per
    checkable task (`eval.pass_at_k`);
  * gold win rate against the reference on the checkable tasks: prompt by prompt, 1 when only
    the model answers correctly, 0 when only the reference does, ½ otherwise (paired bootstrap);
  * win rate against the reference model on the open prompts, judged pairwise in both
    orders (tie = ½), with a bootstrap interval, and the length-controlled win rate
    (`eval.winrate`);
  * the mean reward-model score of its answers, and the reward model's own held-out
    accuracy, when a reward model (and pairs) are given;
  * KL to the reference on the model's own samples (`eval.kl`, temperature 1);
  * response length, and diversity: distinct-n over all samples, self-similarity of the
    samples *for one prompt* (→ 1 when sampling collapses to one answer) and of the greedy
    answers *across prompts* (→ 1 when every prompt gets the same answer);
  * calibration (expected calibration error) of stated confidence ("Confidence: 80%") on the
    checkable tasks, where the model states one.

Everything goes into `<output_dir>/eval.json`, which `rlhf report` reads.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.config import Config, check, param
from rlhfkit.data.readers import looks_like_hub_id, read_preferences
from rlhfkit.data.schemas import prompt_text
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.eval.accuracy import AccuracyResult, exact_match
from rlhfkit.eval.calibration import confidence_calibration
from rlhfkit.eval.diversity import diversity_numbers
from rlhfkit.eval.kl import kl_of_generations
from rlhfkit.eval.pass_at_k import sampled_accuracy
from rlhfkit.eval.prompts import EvalPrompt, load_eval_prompts
from rlhfkit.eval.reward import evaluate_reward_model
from rlhfkit.eval.winrate import length_controlled_win_rate, win_rate
from rlhfkit.io import atomic_write_text
from rlhfkit.judge.cache import open_cache
from rlhfkit.judge.loading import backend_from_spec, load_local_model
from rlhfkit.judge.pairwise import PairwiseJudge, resolve_judge_mode
from rlhfkit.losses.reward import ensemble_reduce
from rlhfkit.models.device import inference_device
from rlhfkit.models.loading import ModelNotFound
from rlhfkit.models.reward import load_trained_reward_model, score_responses
from rlhfkit.rollout.generate import SamplingConfig, generate

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
EVAL_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EvalConfig(Config):
    kind = "eval"
    model: tuple[str, ...] = param((), "models to evaluate, comma-separated: 'embedded', HF ids or run folders")
    reference: str | None = param(None, "reference model for win rates and KL (e.g. the SFT model)")
    names: tuple[str, ...] = param((), "display names, comma-separated (empty: named after the paths)")
    tasks: str = param("demo", "'demo' (the demo test split) or a JSONL of demo task records or of prompts")
    n_per_family: int = param(25, "demo tasks per family (with --tasks demo)")
    judge: str = param("embedded", "judge for win rates: 'embedded', 'local:PATH', an http(s):// "
                                   "OpenAI-compatible base URL, or 'none'")
    judge_model: str | None = param(None, "model name sent to an HTTP judge")
    judge_template: str = param("pairwise", "judge prompt: built-in name or a .txt file")
    judge_mode: str = param("auto", "verdict: parse the judge's generated 'Verdict: X'; logprob: read log P(A) − "
                                    "log P(B) and remove the batch's position offset (local judges); auto: logprob "
                                    "for a local judge, verdict over HTTP", choices=("auto", "verdict", "logprob"))
    judge_cache: str | None = param(None, "judge cache file; 'none' = off; empty = ~/.cache/rlhfkit/judge_cache.sqlite")
    judge_max_new_tokens: int = param(256, "longest judge answer in tokens")
    reward_model: str | None = param(None, "a trained reward model folder: scores every model's answers")
    pairs: str | None = param(None, "held-out preference pairs: the reward model's accuracy on them")
    max_new_tokens: int = param(48, "longest answer in tokens")
    samples_per_prompt: int = param(4, "samples per prompt for diversity and KL (and for pass@k with pass_k)",
                                    old_names=("n_samples",))
    pass_k: tuple[int, ...] = param((), "k values for pass@k, each ≤ samples_per_prompt (e.g. 1,4): samples every "
                                        "checkable task samples_per_prompt times and reports pass@k and "
                                        "majority-vote accuracy (empty = off)")
    sample_prompts: int = param(16, "prompts sampled samples_per_prompt times each")
    temperature: float = param(1.0, "sampling temperature for diversity and KL (KL needs 1.0)")
    batch_size: int = param(16, "sequences generated together")
    keep_samples: int = param(6, "answers per kind (open / checkable) kept for the report")
    n_boot: int = param(2000, "bootstrap resamples for the intervals")
    seed: int = param(0, "seed for the demo tasks and the sampling")
    precision: str = param("auto", "weights for generation: auto (bf16 where the hardware has it) or fp32",
                           choices=("auto", "bf16", "fp32"))
    output_dir: str = param("runs/eval", "folder for eval.json")

    def validate(self) -> None:
        check(len(self.model) >= 1, "give at least one --model (comma-separated for several)")
        check(not self.names or len(self.names) == len(self.model),
              f"--names has {len(self.names)} names for {len(self.model)} models")
        check(self.n_per_family >= 1, "n_per_family must be ≥ 1")
        check(self.max_new_tokens >= 1, "max_new_tokens must be ≥ 1")
        check(self.samples_per_prompt >= 1, "samples_per_prompt must be ≥ 1")
        check(all(1 <= k <= self.samples_per_prompt for k in self.pass_k),
              f"pass_k values must be in [1, samples_per_prompt = {self.samples_per_prompt}], got {self.pass_k}")
        check(self.sample_prompts >= 0, "sample_prompts must be ≥ 0")
        check(self.temperature > 0, "temperature must be > 0 (samples measure diversity)")
        check(self.batch_size >= 1, "batch_size must be ≥ 1")
        check(self.n_boot >= 1, "n_boot must be ≥ 1")
        check(self.keep_samples >= 0, "keep_samples must be ≥ 0")
        check(self.pairs is None or self.reward_model is not None, "--pairs needs --reward-model")


# ----------------------------------------------------------------------------- pieces

def model_label(path: str) -> str:
    """A short name for a model path: 'runs/demo/dpo/final' → 'dpo', 'embedded' → 'embedded'."""
    p = Path(path.rstrip("/"))
    if p.name in ("final", "") and p.parent.name:
        return p.parent.name
    return p.name or path


def unique_labels(paths: Sequence[str], names: Sequence[str] = ()) -> list[str]:
    labels = list(names) if names else [model_label(p) for p in paths]
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _win_rate_block(raw) -> dict[str, Any]:
    return {"mean": raw.mean, "ci_low": raw.ci_low, "ci_high": raw.ci_high, "n": raw.n, "wins": raw.wins,
            "ties": raw.ties, "losses": raw.losses, "confidence": raw.confidence, "method": raw.method}


def gold_win_rate(model_correct: Sequence[bool], reference_correct: Sequence[bool], *, n_boot: int,
                  seed: int) -> dict[str, Any]:
    """Win rate against the reference judged by the exact checkers, prompt by prompt.

    Outcome per checkable prompt: 1 when only the model is right, 0 when only the reference
    is, ½ when both or neither are (outcome = ½ + ½·(correct_model − correct_ref)). Its mean is
    ½ + ½·(accuracy difference), but the interval is paired: prompts both get right or both
    get wrong carry no noise.
    """
    if len(model_correct) != len(reference_correct):
        raise ValueError(f"{len(model_correct)} model answers but {len(reference_correct)} reference answers")
    outcomes = [0.5 + 0.5 * (int(m) - int(r)) for m, r in zip(model_correct, reference_correct)]
    return {**_win_rate_block(win_rate(outcomes, n_boot=n_boot, seed=seed)), "judge": "exact checker"}


def _win_rate_dicts(batch, model_texts: Sequence[str], reference_texts: Sequence[str], *,
                    n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    outcomes = batch.outcomes
    summary = batch.summary()
    wr = {**_win_rate_block(win_rate(outcomes, n_boot=n_boot, seed=seed)),
          "inconsistent": summary["inconsistent"], "invalid_outputs": summary["invalid_outputs"],
          "position_bias": summary["position_bias"], "position_offset": batch.position_offset}
    lc = length_controlled_win_rate(outcomes, [len(t.split()) for t in model_texts],
                                    [len(t.split()) for t in reference_texts], n_boot=n_boot, seed=seed)
    lcd = {"mean": lc.mean, "ci_low": lc.ci_low, "ci_high": lc.ci_high, "n": lc.n, "intercept": lc.intercept,
           "length_coef": lc.length_coef, "length_scale": lc.length_scale, "transform": lc.transform,
           "length_unit": "words"}
    return wr, lcd


def _finite(x: Any) -> Any:
    """JSON has no NaN: NaN and ±inf are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


# ----------------------------------------------------------------------------- the run

def check_model_paths(paths: Sequence[str]) -> None:
    """Fail before any model runs when a name is neither 'embedded'/'tiny', an existing folder,
    nor shaped like a Hugging Face id ('owner/name')."""
    for path in paths:
        if path not in ("embedded", "tiny") and not Path(path).exists() and not looks_like_hub_id(path):
            raise ModelNotFound(f"no such model folder: {path}")


@dataclass(frozen=True)
class ReferenceAnswers:
    """The reference model and what every model is compared with: its greedy answers to the
    open prompts (judged against) and its correctness on the checkable ones (the gold win rate
    pairs every model with it, prompt by prompt)."""

    path: str
    tokenizer: Any
    model: Any
    accuracy: AccuracyResult | None
    open_texts: list[str]


@dataclass(frozen=True)
class EvalRun:
    """What the measurement of every model shares."""

    cfg: EvalConfig
    checkable: list[EvalPrompt]
    open_prompts: list[EvalPrompt]
    sampled: list[EvalPrompt]
    reference: ReferenceAnswers | None
    judge: PairwiseJudge | None
    reward_model: tuple[Any, Any] | None  # (model, tokenizer)
    side_by_side: dict[str, dict[str, Any]]  # prompt id → the answers the report shows side by side


def _greedy(cfg: EvalConfig) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)


def _sampling(cfg: EvalConfig) -> SamplingConfig:
    return SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.samples_per_prompt,
                          batch_size=cfg.batch_size, seed=cfg.seed)


def _exact_match(cfg: EvalConfig, model, tokenizer, checkable: Sequence[EvalPrompt]) -> AccuracyResult:
    """Every answer is kept: calibration and the gold win rate read them all."""
    return exact_match(model, tokenizer, [p.task for p in checkable], max_new_tokens=cfg.max_new_tokens,
                       batch_size=cfg.batch_size, keep_samples=len(checkable))


def load_reference(cfg: EvalConfig, checkable: Sequence[EvalPrompt],
                   open_prompts: Sequence[EvalPrompt]) -> ReferenceAnswers | None:
    """The reference model's greedy answers to every prompt (None without `cfg.reference`)."""
    if not cfg.reference:
        return None
    tokenizer, model = load_local_model(cfg.reference, cfg.precision)
    accuracy = _exact_match(cfg, model, tokenizer, checkable) if checkable else None
    open_texts: list[str] = []
    if open_prompts:
        log.info("eval: reference %s answers %d open prompts", cfg.reference, len(open_prompts))
        open_texts = [g.text for g in generate(model, tokenizer, [p.prompt for p in open_prompts], _greedy(cfg))]
    return ReferenceAnswers(cfg.reference, tokenizer, model, accuracy, open_texts)


def load_reward_model(cfg: EvalConfig) -> tuple[tuple[Any, Any] | None, dict[str, Any] | None]:
    """((model, tokenizer), its accuracy on the held-out pairs) of `cfg.reward_model`, each None when not asked."""
    if not cfg.reward_model:
        return None, None
    model, tokenizer = load_trained_reward_model(cfg.reward_model)
    model = model.to(inference_device())
    if not cfg.pairs:
        return (model, tokenizer), None
    full = evaluate_reward_model(model, tokenizer, read_preferences(cfg.pairs), batch_size=cfg.batch_size)
    report = {"path": cfg.reward_model, "pairs": cfg.pairs,
              **{k: full[k] for k in ("num_pairs", "num_non_tie", "num_ties", "accuracy", "ece", "loss",
                                      "mean_margin", "tie_mean_abs_delta")}}
    return (model, tokenizer), report


def side_by_side_rows(cfg: EvalConfig, checkable: Sequence[EvalPrompt], open_prompts: Sequence[EvalPrompt],
                      reference: ReferenceAnswers | None) -> dict[str, dict[str, Any]]:
    """The first `keep_samples` prompts of each kind, to be answered by every model in the report."""
    rows: dict[str, dict[str, Any]] = {}
    for p in open_prompts[:cfg.keep_samples]:
        rows[p.id] = {"id": p.id, "family": p.family, "prompt": prompt_text(p.prompt), "answer": None,
                      "responses": {}}
    for p in checkable[:cfg.keep_samples]:
        rows[p.id] = {"id": p.id, "family": p.family, "prompt": prompt_text(p.prompt),
                      "answer": p.task.answer, "responses": {}}
    for p, text in zip(open_prompts, reference.open_texts if reference is not None else []):
        if p.id in rows:
            rows[p.id]["reference"] = text
    return rows


def _checkable_answers(run: EvalRun, model, tokenizer, label: str,
                       is_reference: bool) -> tuple[dict[str, Any], list[str]]:
    """Gold exact match on the checkable tasks, the gold win rate against the reference and
    the calibration of stated confidence; and the greedy answers."""
    ref_accuracy = run.reference.accuracy if run.reference is not None else None
    accuracy = (ref_accuracy if is_reference and ref_accuracy is not None
                else _exact_match(run.cfg, model, tokenizer, run.checkable))
    out: dict[str, Any] = {"exact_match": accuracy.to_dict()}
    texts = [s["response"] for s in accuracy.samples]
    correct = [s["correct"] for s in accuracy.samples]
    if ref_accuracy is not None and not is_reference:
        out["gold_win_rate"] = gold_win_rate(correct, [s["correct"] for s in ref_accuracy.samples],
                                             n_boot=run.cfg.n_boot, seed=run.cfg.seed)
    out["calibration"] = confidence_calibration(texts, correct)
    for p, text, ok in zip(run.checkable, texts, correct):
        if p.id in run.side_by_side:
            run.side_by_side[p.id]["responses"][label] = {"text": text, "correct": ok}
    return out, texts


def _open_answers(run: EvalRun, model, tokenizer, label: str,
                  is_reference: bool) -> tuple[dict[str, Any], list[str], int]:
    """Greedy answers to the open prompts and their win rates against the reference's; and the
    answers and how many of them hit the length limit."""
    gens = generate(model, tokenizer, [p.prompt for p in run.open_prompts], _greedy(run.cfg))
    texts = [g.text for g in gens]
    for p, text in zip(run.open_prompts, texts):
        if p.id in run.side_by_side:
            run.side_by_side[p.id]["responses"][label] = {"text": text, "correct": None}
    out: dict[str, Any] = {}
    if run.judge is not None and not is_reference:
        reference_texts = run.reference.open_texts
        batch = run.judge.judge_many([(p.prompt, a, b) for p, a, b in zip(run.open_prompts, texts, reference_texts)])
        out["win_rate"], out["lc_win_rate"] = _win_rate_dicts(batch, texts, reference_texts, n_boot=run.cfg.n_boot,
                                                              seed=run.cfg.seed)
    return out, texts, sum(not g.finished for g in gens)


def _reward_scores(run: EvalRun, answers: Sequence[str]) -> dict[str, Any]:
    """The reward model's mean score of the greedy answers (checkable prompts first, as answered)."""
    model, tokenizer = run.reward_model
    prompts = [p.prompt for p in run.checkable + run.open_prompts]
    scores = ensemble_reduce(score_responses(model, tokenizer, prompts, list(answers), batch_size=run.cfg.batch_size),
                             "mean")
    return {"mean": float(scores.mean()), "std": float(scores.std()) if scores.numel() > 1 else 0.0,
            "n": scores.numel()}


def _kl(run: EvalRun, model, tokenizer, samples) -> dict[str, Any] | None:
    """KL to the reference on the model's own samples; None when they were not sampled at temperature 1."""
    if run.cfg.temperature != 1.0:
        log.warning("eval: KL skipped: samples at temperature %s are not from the policy itself",
                    run.cfg.temperature)
        return None
    return kl_of_generations(model, run.reference.model, samples, pad_id=pad_token_id(tokenizer),
                             batch_size=run.cfg.batch_size, seed=run.cfg.seed).to_dict()


def length_numbers(tokenizer, answers: Sequence[str], *, truncated: int, n_open: int) -> dict[str, Any]:
    """Mean words and tokens of the greedy answers, and the share of open answers cut by the length limit."""
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in answers]
    return {"mean_words": statistics.fmean(len(t.split()) for t in answers) if answers else 0.0,
            "mean_tokens": statistics.fmean(tokens) if tokens else 0.0,
            "median_tokens": float(statistics.median(tokens)) if tokens else 0.0,
            "open_truncated": truncated / n_open if n_open else None}


def measure_model(run: EvalRun, path: str, label: str) -> dict[str, Any]:
    """One model's row of eval.json."""
    t0 = time.perf_counter()
    log.info("eval: %s (%s)", label, path)
    reference = run.reference
    is_reference = reference is not None and path == reference.path
    tokenizer, model = ((reference.tokenizer, reference.model) if is_reference
                        else load_local_model(path, run.cfg.precision))
    row: dict[str, Any] = {"name": label, "path": path, "is_reference": is_reference}
    greedy_texts: list[str] = []
    truncated = 0
    if run.checkable:
        block, texts = _checkable_answers(run, model, tokenizer, label, is_reference)
        row.update(block)
        greedy_texts += texts
    n = run.cfg.samples_per_prompt
    if run.checkable and run.cfg.pass_k:
        row["sampled_accuracy"] = sampled_accuracy(
            model, tokenizer, [p.task for p in run.checkable], n=n, ks=run.cfg.pass_k,
            temperature=run.cfg.temperature, max_new_tokens=run.cfg.max_new_tokens, batch_size=run.cfg.batch_size,
            seed=run.cfg.seed, n_boot=run.cfg.n_boot)
    if run.open_prompts:
        block, texts, truncated = _open_answers(run, model, tokenizer, label, is_reference)
        row.update(block)
        greedy_texts += texts
    if run.reward_model is not None:
        row["reward"] = _reward_scores(run, greedy_texts)
    samples = generate(model, tokenizer, [p.prompt for p in run.sampled], _sampling(run.cfg)) if run.sampled else []
    groups = [[g.text for g in samples[i * n:(i + 1) * n]] for i in range(len(run.sampled))]
    row["diversity"] = {**diversity_numbers(groups, greedy_texts, tokenizer, seed=run.cfg.seed),
                        "temperature": run.cfg.temperature}
    if reference is not None and samples:
        row["kl"] = _kl(run, model, tokenizer, samples)
    row["length"] = length_numbers(tokenizer, greedy_texts, truncated=truncated, n_open=len(run.open_prompts))
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    return row


def _open_judge(cfg: EvalConfig, judge_backend):
    """(backend, PairwiseJudge) from `judge_backend` or `cfg.judge`; (None, None) for 'none'."""
    if judge_backend is None and cfg.judge.lower() == "none":
        return None, None
    backend = judge_backend or backend_from_spec(cfg.judge, judge_model=cfg.judge_model,
                                                 max_new_tokens=cfg.judge_max_new_tokens)
    judge = PairwiseJudge(backend, cfg.judge_template, both_orders=True, cache=open_cache(cfg.judge_cache),
                          mode=resolve_judge_mode(cfg.judge_mode, backend))
    return backend, judge


def evaluate(cfg: EvalConfig, *, judge_backend=None) -> dict[str, Any]:
    """Run every measurement of the module docstring; write and return the eval.json content.

    `judge_backend` overrides `cfg.judge` (any `JudgeBackend`, e.g. a `ScriptedBackend` in tests).
    """
    t_start = time.perf_counter()
    check_model_paths(list(cfg.model) + ([cfg.reference] if cfg.reference else []))
    prompts = load_eval_prompts(cfg.tasks, n_per_family=cfg.n_per_family, seed=cfg.seed)
    checkable = [p for p in prompts if p.checkable]
    open_prompts = [p for p in prompts if not p.checkable]
    reference = load_reference(cfg, checkable, open_prompts)
    # The judge is only needed when there is something to judge.
    backend, judge = _open_judge(cfg, judge_backend) if reference and open_prompts else (None, None)
    reward_model, reward_model_report = load_reward_model(cfg)
    run = EvalRun(cfg, checkable, open_prompts, prompts[:cfg.sample_prompts], reference, judge, reward_model,
                  side_by_side_rows(cfg, checkable, open_prompts, reference))
    try:
        models = [measure_model(run, path, label)
                  for path, label in zip(cfg.model, unique_labels(cfg.model, cfg.names))]
    finally:
        if backend is not None and judge_backend is None and hasattr(backend, "close"):
            backend.close()

    result = _finite({
        "version": EVAL_FORMAT_VERSION,
        "tasks": cfg.tasks,
        "prompts": {"checkable": len(checkable), "open": len(open_prompts), "sampled": len(run.sampled)},
        "reference": ({"name": model_label(cfg.reference), "path": cfg.reference} if cfg.reference else None),
        "judge": ({"name": backend.name, "model": backend.model, "template": cfg.judge_template,
                   "mode": judge.mode if judge is not None else None}
                  if backend is not None else None),
        "reward_model": reward_model_report,
        "models": models,
        "samples": list(run.side_by_side.values()),
        "config": cfg.to_dict(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    })
    out = Path(cfg.output_dir) / EVAL_FILE
    atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
    result["path"] = str(out)
    return result
