"""`rlhf eval`: measure every model the pipeline produced, the way the literature does.

For each model, on held-out prompts (the demo test split, or a file):

  * gold exact-match accuracy on the checkable tasks (`eval.accuracy.exact_match`, greedy);
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
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.config import Config, check, param
from rlhfkit.data.schemas import Conversation, as_conversation, prompt_text
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
    n_samples: int = param(4, "samples per prompt for diversity and KL")
    sample_prompts: int = param(16, "prompts sampled n_samples times each")
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
        check(self.n_samples >= 1, "n_samples must be ≥ 1")
        check(self.sample_prompts >= 0, "sample_prompts must be ≥ 0")
        check(self.temperature > 0, "temperature must be > 0 (samples measure diversity)")
        check(self.batch_size >= 1, "batch_size must be ≥ 1")
        check(self.n_boot >= 1, "n_boot must be ≥ 1")
        check(self.keep_samples >= 0, "keep_samples must be ≥ 0")
        check(self.pairs is None or self.reward_model is not None, "--pairs needs --reward-model")


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class EvalPrompt:
    """One held-out prompt: a checkable demo task (gold answer) or an open prompt."""

    id: str
    family: str
    prompt: Conversation
    task: Any = None  # rlhfkit.demo.tasks.Task when checkable

    @property
    def checkable(self) -> bool:
        return self.task is not None and self.task.checkable


def load_eval_prompts(tasks: str, *, n_per_family: int = 25, seed: int = 0) -> list[EvalPrompt]:
    """'demo' → the demo test split; a file of demo task records (`task_id`, `family`, ...) → those
    tasks; any other JSONL → one open prompt per record's `prompt` (text or messages)."""
    from rlhfkit.data.errors import DataError
    from rlhfkit.data.readers import iter_records
    from rlhfkit.demo.tasks import make_tasks, read_jsonl

    if tasks == "demo":
        found = make_tasks("test", n_per_family, seed=seed)
    else:
        first = next(iter_records(tasks), None)
        if first is None:
            raise DataError("no records", path=str(tasks))
        if "family" in first[0] and "task_id" in first[0]:
            found = read_jsonl(tasks)
        else:
            prompts = []
            for rec, where in iter_records(tasks):
                if "prompt" not in rec:
                    raise where.error("prompt", "missing (an eval prompt needs 'prompt')")
                try:
                    conv = as_conversation(rec["prompt"])
                except (KeyError, TypeError):
                    raise where.error("prompt", "expected text or a list of {role, content} messages") from None
                if not prompt_text(conv).strip():
                    raise where.error("prompt", "empty text")
                prompts.append(EvalPrompt(str(rec.get("id", f"prompt-{where.line:04d}")), "open", conv))
            return prompts
    return [EvalPrompt(t.id, t.family, as_conversation(t.prompt), t) for t in found]


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


_CONFIDENCE = re.compile(r"confidence\s*(?:level)?\s*[:=]?\s*(\d{1,3}(?:\.\d+)?)\s*%", re.IGNORECASE)


def stated_confidence(text: str) -> float | None:
    """The last 'Confidence: NN%' in a response, as a probability; None when none is stated."""
    found = _CONFIDENCE.findall(text)
    if not found:
        return None
    value = float(found[-1]) / 100.0
    return value if 0.0 <= value <= 1.0 else None


def confidence_calibration(responses: Sequence[str], correct: Sequence[bool]) -> dict[str, Any] | None:
    """ECE of stated confidence against exact-match correctness, over the responses that state
    one (None when none does)."""
    import torch

    from rlhfkit.eval.reward import expected_calibration_error

    stated = [(c, float(ok)) for c, ok in ((stated_confidence(r), ok) for r, ok in zip(responses, correct))
              if c is not None]
    if not stated:
        return None
    probs = torch.tensor([s[0] for s in stated], dtype=torch.float64)
    labels = torch.tensor([s[1] for s in stated], dtype=torch.float64)
    return {"n_stated": len(stated), "ece": expected_calibration_error(probs, labels),
            "mean_confidence": float(probs.mean()), "accuracy_when_stated": float(labels.mean())}


def diversity_numbers(samples_per_prompt: Sequence[Sequence[str]], greedy: Sequence[str], tokenizer=None,
                      *, seed: int = 0) -> dict[str, Any]:
    """distinct-n over all samples, mean within-prompt self-similarity of the samples, and the
    self-similarity of the greedy answers across prompts."""
    from rlhfkit.eval.diversity import diversity_report, self_similarity

    pooled = [s for group in samples_per_prompt for s in group]
    out: dict[str, Any] = {"n_prompts": len(samples_per_prompt), "n_samples": len(pooled)}
    if pooled:
        report = diversity_report(pooled, tokenizer=tokenizer, seed=seed).to_dict()
        out.update({k: v for k, v in report.items() if k.startswith("distinct_")})
        out["sample_mean_tokens"] = report["mean_tokens"]
        groups = [g for g in samples_per_prompt if len(g) >= 2]
        out["within_prompt_self_similarity"] = (statistics.fmean(self_similarity(g, seed=seed) for g in groups)
                                                if groups else None)
    if len(greedy) >= 2:
        out["across_prompt_self_similarity"] = self_similarity(list(greedy), seed=seed)
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
    from rlhfkit.eval.winrate import win_rate

    if len(model_correct) != len(reference_correct):
        raise ValueError(f"{len(model_correct)} model answers but {len(reference_correct)} reference answers")
    outcomes = [0.5 + 0.5 * (int(m) - int(r)) for m, r in zip(model_correct, reference_correct)]
    return {**_win_rate_block(win_rate(outcomes, n_boot=n_boot, seed=seed)), "judge": "exact checker"}


def _win_rate_dicts(batch, model_texts: Sequence[str], reference_texts: Sequence[str], *,
                    n_boot: int, seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    from rlhfkit.eval.winrate import length_controlled_win_rate, win_rate

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

def _load(path: str, precision: str):
    from rlhfkit.judge.cli import load_local_model

    return load_local_model(path, precision)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def check_model_paths(paths: Sequence[str]) -> None:
    """Fail before any model runs when a name is neither 'embedded'/'tiny', an existing folder,
    nor shaped like a Hugging Face id ('owner/name')."""
    from rlhfkit.models.loading import ModelNotFound

    for path in paths:
        hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
        if path not in ("embedded", "tiny") and not Path(path).exists() and not hub_id:
            raise ModelNotFound(f"no such model folder: {path}")


def evaluate(cfg: EvalConfig, *, judge_backend=None) -> dict[str, Any]:
    """Run every measurement of the module docstring; write and return the eval.json content.

    `judge_backend` overrides `cfg.judge` (any `JudgeBackend`, e.g. a `ScriptedBackend` in tests).
    """
    from rlhfkit.eval.accuracy import exact_match
    from rlhfkit.eval.kl import kl_of_generations
    from rlhfkit.judge.pairwise import PairwiseJudge, resolve_judge_mode
    from rlhfkit.io import atomic_write_text

    t_start = time.perf_counter()
    check_model_paths(list(cfg.model) + ([cfg.reference] if cfg.reference else []))
    prompts = load_eval_prompts(cfg.tasks, n_per_family=cfg.n_per_family, seed=cfg.seed)
    checkable = [p for p in prompts if p.checkable]
    open_prompts = [p for p in prompts if not p.checkable]
    sampled = prompts[:cfg.sample_prompts]
    labels = unique_labels(cfg.model, cfg.names)
    greedy_cfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, batch_size=cfg.batch_size)
    sample_cfg = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, n=cfg.n_samples,
                                batch_size=cfg.batch_size, seed=cfg.seed)

    # ---- 1. the reference: its greedy answers to the open prompts are what every model is judged against
    reference = ref_tok = reference_acc = None
    reference_texts: list[str] = []
    if cfg.reference:
        ref_tok, reference = _load(cfg.reference, cfg.precision)
        if checkable:  # its correctness, prompt by prompt: the gold win rate pairs every model with it
            reference_acc = exact_match(reference, ref_tok, [p.task for p in checkable],
                                        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                                        keep_samples=len(checkable))
        if open_prompts:
            log.info("eval: reference %s answers %d open prompts", cfg.reference, len(open_prompts))
            reference_texts = [g.text for g in generate(reference, ref_tok, [p.prompt for p in open_prompts],
                                                        greedy_cfg)]

    # ---- 2. the judge (only needed when there is something to judge)
    judge = backend = None
    if cfg.reference and open_prompts and (judge_backend is not None or cfg.judge.lower() != "none"):
        from rlhfkit.judge.cli import backend_from_spec, open_cache

        backend = judge_backend or backend_from_spec(cfg.judge, judge_model=cfg.judge_model,
                                                     max_new_tokens=cfg.judge_max_new_tokens)
        judge = PairwiseJudge(backend, cfg.judge_template, both_orders=True, cache=open_cache(cfg.judge_cache),
                              mode=resolve_judge_mode(cfg.judge_mode, backend))

    # ---- 3. the reward model
    rm = rm_tok = None
    reward_model_report = None
    if cfg.reward_model:
        from rlhfkit.eval.reward import evaluate_reward_model, load_trained_reward_model
        from rlhfkit.train.engine import inference_device

        rm, rm_tok = load_trained_reward_model(cfg.reward_model)
        rm = rm.to(inference_device())
        if cfg.pairs:
            from rlhfkit.data.readers import read_preferences

            full = evaluate_reward_model(rm, rm_tok, read_preferences(cfg.pairs), batch_size=cfg.batch_size)
            reward_model_report = {"path": cfg.reward_model, "pairs": cfg.pairs,
                                   **{k: full[k] for k in ("num_pairs", "num_non_tie", "num_ties", "accuracy",
                                                           "ece", "loss", "mean_margin", "tie_mean_abs_delta")}}

    # ---- 4. every model
    models_out: list[dict[str, Any]] = []
    side_by_side: dict[str, dict[str, Any]] = {}
    for p in open_prompts[:cfg.keep_samples]:
        side_by_side[p.id] = {"id": p.id, "family": p.family, "prompt": prompt_text(p.prompt), "answer": None,
                              "responses": {}}
    for p in checkable[:cfg.keep_samples]:
        side_by_side[p.id] = {"id": p.id, "family": p.family, "prompt": prompt_text(p.prompt),
                              "answer": p.task.answer, "responses": {}}
    if cfg.reference and reference_texts:
        for p, text in zip(open_prompts, reference_texts):
            if p.id in side_by_side:
                side_by_side[p.id]["reference"] = text

    try:
        for path, label in zip(cfg.model, labels):
            t0 = time.perf_counter()
            log.info("eval: %s (%s)", label, path)
            is_reference = cfg.reference is not None and path == cfg.reference
            tok, model = (ref_tok, reference) if is_reference else _load(path, cfg.precision)
            row: dict[str, Any] = {"name": label, "path": path, "is_reference": is_reference}

            # gold exact match on the checkable tasks (every answer kept: calibration reads them)
            greedy_texts: list[str] = []
            truncated = 0
            if checkable:
                acc = reference_acc if is_reference and reference_acc is not None else exact_match(
                    model, tok, [p.task for p in checkable], max_new_tokens=cfg.max_new_tokens,
                    batch_size=cfg.batch_size, keep_samples=len(checkable))
                row["exact_match"] = acc.to_dict()
                texts = [s["response"] for s in acc.samples]
                correct = [s["correct"] for s in acc.samples]
                if reference_acc is not None and not is_reference:
                    row["gold_win_rate"] = gold_win_rate(correct, [s["correct"] for s in reference_acc.samples],
                                                         n_boot=cfg.n_boot, seed=cfg.seed)
                row["calibration"] = confidence_calibration(texts, correct)
                greedy_texts += texts
                for p, text, ok in zip(checkable, texts, correct):
                    if p.id in side_by_side:
                        side_by_side[p.id]["responses"][label] = {"text": text, "correct": ok}
            # greedy answers to the open prompts: judged against the reference's
            if open_prompts:
                gens = generate(model, tok, [p.prompt for p in open_prompts], greedy_cfg)
                open_texts = [g.text for g in gens]
                greedy_texts += open_texts
                truncated += sum(not g.finished for g in gens)
                for p, text in zip(open_prompts, open_texts):
                    if p.id in side_by_side:
                        side_by_side[p.id]["responses"][label] = {"text": text, "correct": None}
                if judge is not None and not is_reference:
                    batch = judge.judge_many([(p.prompt, a, b) for p, a, b in
                                              zip(open_prompts, open_texts, reference_texts)])
                    row["win_rate"], row["lc_win_rate"] = _win_rate_dicts(
                        batch, open_texts, reference_texts, n_boot=cfg.n_boot, seed=cfg.seed)
            # reward-model score of the greedy answers
            if rm is not None:
                from rlhfkit.eval.reward import score_responses
                from rlhfkit.losses.reward import ensemble_reduce

                order = checkable + open_prompts
                scores = ensemble_reduce(score_responses(rm, rm_tok, [p.prompt for p in order], greedy_texts,
                                                         batch_size=cfg.batch_size), "mean")
                row["reward"] = {"mean": float(scores.mean()),
                                 "std": float(scores.std()) if scores.numel() > 1 else 0.0, "n": scores.numel()}
            # samples: diversity, and KL to the reference on the model's own samples
            samples = generate(model, tok, [p.prompt for p in sampled], sample_cfg) if sampled else []
            groups = [[g.text for g in samples[i * cfg.n_samples:(i + 1) * cfg.n_samples]]
                      for i in range(len(sampled))]
            row["diversity"] = {**diversity_numbers(groups, greedy_texts, tok, seed=cfg.seed),
                                "temperature": cfg.temperature}
            if reference is not None and samples:
                if cfg.temperature == 1.0:
                    row["kl"] = kl_of_generations(model, reference, samples, pad_id=_pad_id(tok),
                                                  batch_size=cfg.batch_size, seed=cfg.seed).to_dict()
                else:
                    row["kl"] = None
                    log.warning("eval: KL skipped: samples at temperature %s are not from the policy itself",
                                cfg.temperature)
            enc = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in greedy_texts]
            row["length"] = {"mean_words": statistics.fmean(len(t.split()) for t in greedy_texts) if greedy_texts
                             else 0.0,
                             "mean_tokens": statistics.fmean(enc) if enc else 0.0,
                             "median_tokens": float(statistics.median(enc)) if enc else 0.0,
                             "open_truncated": truncated / len(open_prompts) if open_prompts else None}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            models_out.append(row)
            if not is_reference:
                del model
    finally:
        if backend is not None and judge_backend is None and hasattr(backend, "close"):
            backend.close()

    result = {
        "version": EVAL_FORMAT_VERSION,
        "tasks": cfg.tasks,
        "prompts": {"checkable": len(checkable), "open": len(open_prompts), "sampled": len(sampled)},
        "reference": ({"name": model_label(cfg.reference), "path": cfg.reference} if cfg.reference else None),
        "judge": ({"name": backend.name, "model": backend.model, "template": cfg.judge_template,
                   "mode": judge.mode if judge is not None else None}
                  if backend is not None else None),
        "reward_model": reward_model_report,
        "models": models_out,
        "samples": list(side_by_side.values()),
        "config": cfg.to_dict(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    result = _finite(result)
    out = Path(cfg.output_dir) / EVAL_FILE
    atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
    result["path"] = str(out)
    return result


# ----------------------------------------------------------------------------- the command

def _pct(block: dict | None, key: str = "mean") -> str:
    if not block or block.get(key) is None:
        return "–"
    return f"{block[key]:.1%} [{block['ci_low']:.1%}, {block['ci_high']:.1%}]"


def results_table(result: dict[str, Any]):
    """The eval.json numbers as a rich table, one row per model."""
    from rich.table import Table

    ref = result.get("reference")
    table = Table(title=f"held-out evaluation ({result['prompts']['checkable']} checkable, "
                        f"{result['prompts']['open']} open prompts)")
    vs = f" vs {ref['name']}" if ref else ""
    for col in ("model", "exact match [95% CI]", f"gold win rate{vs}", f"judged win rate{vs}", "LC win rate",
                "KL (nats)",
                "mean tokens", "distinct-2", "self-sim (per prompt)"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for m in result["models"]:
        em = m.get("exact_match")
        em_text = f"{em['accuracy']:.1%} [{em['ci_low']:.1%}, {em['ci_high']:.1%}]" if em else "–"
        kl = m.get("kl")
        div = m.get("diversity") or {}
        table.add_row(m["name"] + (" (reference)" if m.get("is_reference") else ""), em_text,
                      _pct(m.get("gold_win_rate")), _pct(m.get("win_rate")), _pct(m.get("lc_win_rate")),
                      f"{kl['mean']:.3f}" if kl else "–", f"{m['length']['mean_tokens']:.1f}",
                      f"{div['distinct_2']:.3f}" if div.get("distinct_2") is not None else "–",
                      f"{div['within_prompt_self_similarity']:.3f}"
                      if div.get("within_prompt_self_similarity") is not None else "–")
    return table


def run_eval_command(cfg: EvalConfig) -> dict[str, Any]:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    result = evaluate(cfg)
    console.print(results_table(result))
    rm = result.get("reward_model")
    if rm:
        console.print(f"reward model {escape(rm['path'])}: accuracy {rm['accuracy']:.1%} on "
                      f"{rm['num_non_tie']} held-out pairs, ECE {rm['ece']:.3f}")
    console.print(f"[green]wrote[/] {escape(result['path'])} · make the HTML report with: "
                  f"rlhf report {escape(str(Path(result['path']).parent))}")
    return result


EVAL_HELP = ("Evaluate models on held-out prompts: exact match, judged win rate vs a reference (CI, "
             "length-controlled), reward, KL, length, diversity.")
EVAL_EXAMPLES = ("[bold]Examples[/]\n\n"
                 "  rlhf eval --model runs/demo/sft/final,runs/demo/dpo/final --reference runs/demo/sft/final\n\n"
                 "  rlhf eval --model runs/ppo/final --reference runs/sft/final --tasks prompts.jsonl "
                 "--judge http://localhost:8000/v1 --judge-model qwen2.5-7b\n\n"
                 "  rlhf eval --model runs/dpo/final --reference runs/sft/final --reward-model runs/rm/final "
                 "--pairs test_pairs.jsonl --output-dir runs/eval")


def register_eval_command(app, friendly) -> None:
    """Add `rlhf eval` (flags from `EvalConfig`, `--config FILE` too) to the `rlhf` app."""
    from rlhfkit.cli_config import config_command

    config_command(app, "eval", EvalConfig, friendly(run_eval_command), help=EVAL_HELP, examples=EVAL_EXAMPLES)
