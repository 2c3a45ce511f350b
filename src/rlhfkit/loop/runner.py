"""`rlhf loop`: rounds of sample → compare → feedback → train → evaluate → register.

Round 0 evaluates (and registers) the starting policy. Round r ≥ 1 samples from round r−1's
policy. Each step writes its files atomically, then records itself in the registry with
their hashes; a rerun (or `rlhf loop resume`) skips every recorded step, so a killed loop
resumes at the step it was in. A human round stops at "waiting for labels" and resumes once
the labeling app holds the votes it needs.

    rounds/rN/prompts.jsonl      the round's prompts (pool index, task id, prompt, answer)
    rounds/rN/samples.jsonl      k responses per prompt from the parent policy
    rounds/rN/comparisons.jsonl  the pairs shown
    rounds/rN/labels.jsonl       one label per pair (per vote for humans)
    rounds/rN/model/final        the trained policy
    rounds/rN/eval.json          accuracy, per-prompt outcomes, paired tests, KL
    rounds/rN/round.json         the round's lineage row, as registered
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit import __version__
from rlhfkit.config import ConfigError, RenamedSetting
from rlhfkit.data.readers import iter_records
from rlhfkit.eval.rounds_report import write_rounds_report
from rlhfkit.io import atomic_write_text
from rlhfkit.judge.loading import load_local_model
from rlhfkit.loop.candidates import ensemble_disagreement, prompt_window, sample_candidates, select_pairs
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.evaluate import evaluate_round, paired
from rlhfkit.loop.feedback import (
    LabelStatus,
    checkable,
    gold_of,
    gold_scores,
    human_labels,
    machine_labels,
    send_to_labeling_app,
)
from rlhfkit.loop.registry import DONE, WAITING, Artifact, Registry
from rlhfkit.loop.trainers import train_round
from rlhfkit.models.reward import load_trained_reward_model, score_responses
from rlhfkit.rollout.prompts import RLPrompt, demo_prompts, read_prompts

log = logging.getLogger(__name__)

STEPS = ("sample", "compare", "feedback", "train", "evaluate", "register")
Record = dict[str, Any]
Event = Callable[[int, str, dict[str, Any]], None]


class WaitingForLabels(Exception):
    """A human round needs more votes; `rlhf loop resume` continues once they are in."""

    def __init__(self, status: LabelStatus, round: int, run_dir: Path) -> None:
        self.status = status
        super().__init__(
            f"round {round} is waiting for labels: {status.votes} of {status.needed} votes are in "
            f"({status.items} pairs × overlap {status.needed // max(1, status.items)}) in project "
            f"'{status.project}' of the labeling app ({status.db}). Annotators vote with `rlhf label serve "
            f"--db {status.db}`; then run `rlhf loop resume {run_dir}`.")


def write_jsonl(path: Path, rows: list[Record]) -> Artifact:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return Artifact(path.stem, path, len(rows))


def read_jsonl(path: Path) -> list[Record]:
    return [r for r, _where in iter_records(path)]


def _load_pool(spec: str, split: str, per_family: int, seed: int) -> list[RLPrompt]:
    return demo_prompts(split, per_family, seed=seed) if spec == "demo" else read_prompts(spec)


def config_changes(saved: dict[str, Any], cfg: LoopConfig, started: int = 0) -> list[str]:
    """Fields that differ from the run folder's saved config. `rounds` may grow (more rounds), and
    the `per_round` settings of rounds after `started` (the last round begun) may change."""
    now = cfg.to_dict()
    changed = [k for k in sorted(set(saved) | set(now))
               if k not in ("rounds", "per_round") and saved.get(k) != now.get(k)]
    before, after = saved.get("per_round") or {}, now.get("per_round") or {}
    changed += [f"per_round {r}" for r in sorted(set(before) | set(after), key=int)
                if int(r) <= started and before.get(r) != after.get(r)]
    return changed


@dataclass
class LoopRun:
    cfg: LoopConfig
    root: Path
    registry: Registry
    pools: dict[str, list[RLPrompt]]
    eval_prompts: list[RLPrompt]
    on_event: Event | None = None
    open_prompts: list[RLPrompt] = field(default_factory=list)   # judged, with cfg.eval_judge

    def cfg_of(self, round: int) -> LoopConfig:
        """The settings of `round`: the loop's, with the round's own `per_round` ones on top."""
        return self.cfg.for_round(round)

    def pool_of(self, round: int) -> list[RLPrompt]:
        """The prompt pool `round` samples from (its `prompts`); `index` fields point into it."""
        return self.pools[self.cfg_of(round).prompts]

    def prompt_start(self, round: int) -> int:
        """How many prompts earlier rounds drew from `round`'s pool: where its fresh prompts begin."""
        spec = self.cfg_of(round).prompts
        return sum(c.prompts_per_round for c in map(self.cfg_of, range(1, round)) if c.prompts == spec)

    def round_dir(self, round: int) -> Path:
        return self.root / "rounds" / f"r{round}"

    def emit(self, round: int, step: str, info: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(round, step, info)

    def model_of(self, round: int) -> str:
        return str(self.registry.model_of(round))

    def evaluation(self, round: int) -> dict[str, Any]:
        return json.loads(self.registry.artifact_path(round, "evaluate", "eval").read_text())


def open_run(cfg: LoopConfig, *, on_event: Event | None = None) -> LoopRun:
    """The run folder of `cfg.output_dir`, created with the config, or reopened if it holds this loop."""
    root = Path(cfg.output_dir).resolve()
    registry = Registry(root)
    saved = registry.get_meta("config")
    if saved is not None:
        begun = [s.round for s in registry.steps()]
        saved_config = LoopConfig.current_names(json.loads(saved), warn=False)  # written before a rename
        changed = config_changes(saved_config, cfg, max(begun, default=0))
        if changed:
            registry.close()
            raise ConfigError(f"{root} holds a loop with another config (changed: {', '.join(changed)}); resume it "
                              "with `rlhf loop resume` or start a new one with another --output-dir")
    registry.set_meta("config", json.dumps(cfg.to_dict(), sort_keys=True))
    registry.set_meta("package_version", __version__)
    cfg.save(root / "config.yaml")
    # the eval split never overlaps the prompt pool: the demo tasks' train/test split is by content
    specs = dict.fromkeys([cfg.prompts, *(cfg.for_round(int(r)).prompts for r in cfg.per_round)])
    pools = {spec: _load_pool(spec, "train", cfg.demo_per_family, cfg.seed + 1) for spec in specs}
    everything = _load_pool(cfg.eval_tasks, "test", cfg.eval_per_family, cfg.seed)
    eval_prompts = [p for p in everything if checkable(p)]
    open_prompts = [p for p in everything if not checkable(p)] if cfg.eval_judge else []
    if not eval_prompts and not open_prompts:
        registry.close()
        raise ConfigError(f"eval_tasks {cfg.eval_tasks!r} has no checkable prompt (each needs an 'answer' or "
                          "'tests'); to evaluate open prompts, name a judge with --eval-judge")
    return LoopRun(cfg, root, registry, pools, eval_prompts, on_event, open_prompts)


# ------------------------------------------------------------------------------------ steps
def step_sample(run: LoopRun, r: int) -> tuple[dict[str, Any], list[Artifact]]:
    cfg, out, pool = run.cfg_of(r), run.round_dir(r), run.pool_of(r)
    indices = prompt_window(pool, run.prompt_start(r), cfg.prompts_per_round, cfg.seed)
    prompts = [{"index": i, "task_id": pool[i].id, "prompt": [m.to_dict() for m in pool[i].prompt],
                **({"answer": pool[i].meta["answer"]} if pool[i].meta.get("answer") is not None else {})}
               for i in indices]
    parent = run.model_of(r - 1)
    tokenizer, model = load_local_model(parent, cfg.precision)
    samples = sample_candidates(model, tokenizer, pool, indices, k=cfg.samples_per_prompt,
                                temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed + r,
                                batch_size=cfg.gen_batch_size)
    arts = [write_jsonl(out / "prompts.jsonl", prompts), write_jsonl(out / "samples.jsonl", samples)]
    return {"prompts": len(prompts), "samples": len(samples) * cfg.samples_per_prompt,
            "sample_gold_accuracy": sample_gold_accuracy(pool, samples),
            "parent": run.registry.relative(parent) if Path(parent).exists() else parent}, arts


def sample_gold_accuracy(pool: list[RLPrompt], samples: list[Record]) -> float | None:
    """The share of the round's sampled responses the exact checkers accept (checkable prompts only):
    the gold reward of the policy's samples, round by round."""
    rows = [(s["index"], r) for s in samples if checkable(pool[s["index"]]) for r in s["responses"]]
    return sum(gold_of(pool, rows)) / len(rows) if rows else None


def step_compare(run: LoopRun, r: int) -> tuple[dict[str, Any], list[Artifact]]:
    cfg, out, pool = run.cfg_of(r), run.round_dir(r), run.pool_of(r)
    samples = read_jsonl(out / "samples.jsonl")

    def decided(s: Record, a: str, b: str) -> bool:
        if not checkable(pool[s["index"]]):
            return False
        (sa, sb), = gold_scores(pool, [{"index": s["index"], "a": a, "b": b}])
        return sa != sb

    def uncertainty(triples: list[tuple[Record, str, str]]) -> list[float]:
        model, tokenizer = load_trained_reward_model(cfg.uncertainty_model)
        prompts = [pool[s["index"]].prompt for s, _a, _b in triples]
        sa = score_responses(model, tokenizer, prompts, [a for _s, a, _b in triples])
        sb = score_responses(model, tokenizer, prompts, [b for _s, _a, b in triples])
        return ensemble_disagreement(sa, sb)

    comparisons = select_pairs(samples, per_prompt=cfg.pairs_per_prompt, selection=cfg.pair_selection, round=r,
                               seed=cfg.seed, decided=decided, uncertainty=uncertainty)
    return {"pairs": len(comparisons), "selection": cfg.pair_selection}, [
        write_jsonl(out / "comparisons.jsonl", comparisons)]


def _gold_agreement(pool: list[RLPrompt], labels: list[Record]) -> dict[str, Any]:
    """How often the decided labels agree with the exact checkers, on pairs the checkers decide:
    where a proxy (reward model, judge) and the gold part ways."""
    rows = [lab for lab in labels if lab["label"] != 0.5 and lab.get("index") is not None
            and checkable(pool[lab["index"]])]
    scores = gold_scores(pool, [{"index": lab["index"], "a": lab["chosen"], "b": lab["rejected"]}
                                    for lab in rows])
    decided = [(sa > sb) for sa, sb in scores if sa != sb]
    return {"checked": len(decided), "agree": sum(decided),
            "rate": sum(decided) / len(decided) if decided else None}


def step_feedback(run: LoopRun, r: int) -> tuple[dict[str, Any], list[Artifact]]:
    cfg, out, pool = run.cfg_of(r), run.round_dir(r), run.pool_of(r)
    comparisons = read_jsonl(out / "comparisons.jsonl")
    index_of = {c["id"]: c["index"] for c in comparisons}
    if cfg.feedback == ("human",):
        status = send_to_labeling_app(cfg, run.root, r, comparisons)
        if not status.complete:
            run.registry.record_step(r, "feedback", {"waiting": True, **status.__dict__}, status=WAITING)
            raise WaitingForLabels(status, r, run.root)
        labels, agreement = human_labels(status, comparisons)
        info: dict[str, Any] = {"labeling_round": status.labeling_round, "project": status.project,
                                "vote_ids": sorted(lab["vote_id"] for lab in labels), "agreement": agreement}
    else:
        labels, counts = machine_labels(cfg, pool, comparisons, r)
        info = {"decided_by": counts}
    for lab in labels:
        lab["index"] = index_of[lab["comparison"]]
    info.update(labels=len(labels), decided=sum(lab["label"] != 0.5 for lab in labels),
                gold_agreement=_gold_agreement(pool, labels))
    return info, [write_jsonl(out / "labels.jsonl", labels)]


def step_train(run: LoopRun, r: int) -> tuple[dict[str, Any], list[Artifact]]:
    cfg, out = run.cfg_of(r), run.round_dir(r)
    rounds = [r] if cfg.init == "previous" else list(range(1, r + 1))
    label_files = [run.round_dir(k) / "labels.jsonl" for k in rounds]
    result = train_round(cfg, parent=run.model_of(r - 1), start=run.model_of(0), label_files=label_files,
                         prompts=out / "prompts.jsonl", round_dir=out, round=r)
    final = Path(result["final"])
    arts = [Artifact("model", final)] if final.is_relative_to(out) else []
    for key in ("final", "init", "reward_model"):
        if key in result and Path(str(result[key])).exists():
            result[key] = run.registry.relative(result[key])
    return result, arts


def step_evaluate(run: LoopRun, r: int, model: str) -> tuple[dict[str, Any], list[Artifact]]:
    earlier = {k: run.evaluation(k) for k in {0, r - 1} if 0 <= k < r}
    result = evaluate_round(run.cfg, model, run.model_of(0) if r else model, run.eval_prompts, r,
                            {k: e["outcomes"] for k, e in earlier.items()}, run.open_prompts,
                            {k: e.get("open_responses", []) for k, e in earlier.items()})
    path = run.round_dir(r) / "eval.json"
    atomic_write_text(path, json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("outcomes", "samples", "open_responses")}
    return summary, [Artifact("eval", path, result["n"])]


def _round_metrics(run: LoopRun, r: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {"eval": run.registry.step(r, "evaluate").outputs}
    if r:
        metrics["sample"] = run.registry.step(r, "sample").outputs
        metrics["feedback"] = run.registry.step(r, "feedback").outputs
        metrics["train"] = run.registry.step(r, "train").outputs
    return metrics


def step_register(run: LoopRun, r: int, model: str, parent: str | None) -> tuple[dict[str, Any], list[Artifact]]:
    metrics = _round_metrics(run, r)
    # the round's own settings, without `output_dir`: lineage is relative to the run folder, which may move
    config = {k: v for k, v in run.cfg_of(r).to_dict().items() if k not in ("output_dir", "per_round")}
    run.registry.register_round(r, parent_model=parent, model=model, config=config,
                                package_version=__version__, metrics=metrics)
    row = next(x for x in run.registry.rounds() if x["round"] == r)
    path = run.round_dir(r) / "round.json"
    atomic_write_text(path, json.dumps({**row, "artifacts": run.registry.artifacts(r)}, indent=1))
    return {"model": row["model"], "model_sha256": row["model_sha256"]}, [Artifact("round", path, 1)]


def _run_step(run: LoopRun, r: int, step: str, fn: Callable[[], tuple[dict[str, Any], list[Artifact]]]) -> None:
    row = run.registry.step(r, step)
    if row is not None and row.status == DONE:
        return
    run.emit(r, step, {"state": "start"})
    t0 = time.time()
    outputs, artifacts = fn()
    run.registry.record_step(r, step, outputs, artifacts, started=t0)
    run.emit(r, step, {"state": "done", "wall_s": time.time() - t0, **outputs})


def _drop_checkpoints(run: LoopRun, r: int) -> None:
    """A registered round's resume checkpoints (weights + optimizer state) are no longer needed."""
    for folder in run.round_dir(r).rglob("checkpoints"):
        if folder.is_dir():
            shutil.rmtree(folder)


def write_loop_report(run_dir: str | Path, path: str | Path | None = None, *, title: str | None = None,
                      notes: Sequence[str] = ()) -> Path:
    """The report across the registered rounds of `run_dir` (derived from its registry) at `path`
    (default: run_dir/report.html)."""
    run_dir = Path(run_dir)
    with Registry(run_dir) as registry:
        times: dict[int, dict[str, float]] = {}
        for s in registry.steps():
            if s.wall_s is not None and s.status == DONE:
                times.setdefault(s.round, {})[s.step] = s.wall_s
        rounds = registry.rounds()
        outcomes = {r["round"]: json.loads(registry.artifact_path(r["round"], "evaluate", "eval").read_text())
                    ["outcomes"] for r in rounds}
    # every later round against every earlier one, prompt by prompt
    pairwise = {(i, j): paired(outcomes[j], outcomes[i]) for i in outcomes for j in outcomes
                if i < j and outcomes[i]}
    return write_rounds_report(rounds, times, path or run_dir / "report.html",
                               title=title or f"rlhfkit loop: {run_dir.resolve().name}", notes=notes,
                               step_order=STEPS, pairwise=pairwise)


def run_rounds(run: LoopRun) -> None:
    """Every step of every round not yet recorded, in order."""
    start = run.cfg.policy
    _run_step(run, 0, "evaluate", lambda: step_evaluate(run, 0, start))
    _run_step(run, 0, "register", lambda: step_register(run, 0, start, None))
    write_loop_report(run.root)
    for r in range(1, run.cfg.rounds + 1):
        _run_step(run, r, "sample", lambda r=r: step_sample(run, r))
        _run_step(run, r, "compare", lambda r=r: step_compare(run, r))
        _run_step(run, r, "feedback", lambda r=r: step_feedback(run, r))
        _run_step(run, r, "train", lambda r=r: step_train(run, r))
        model = str(run.registry.resolve_model(run.registry.step(r, "train").outputs["final"]))
        _run_step(run, r, "evaluate", lambda r=r, m=model: step_evaluate(run, r, m))
        _run_step(run, r, "register", lambda r=r, m=model: step_register(run, r, m, run.model_of(r - 1)))
        _drop_checkpoints(run, r)
        write_loop_report(run.root)


def run_loop(cfg: LoopConfig, *, on_event: Event | None = None) -> LoopRun:
    """Run (or resume) the loop of `cfg`; raises WaitingForLabels when a human round needs votes."""
    run = open_run(cfg, on_event=on_event)
    try:
        run_rounds(run)
    finally:
        run.registry.close()
    return run


def load_config(run_dir: str | Path) -> LoopConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{run_dir} is not a loop folder (no config.yaml); start one with `rlhf loop run`")
    with warnings.catch_warnings():  # the folder's own record: a key renamed since it was written is no news
        warnings.simplefilter("ignore", RenamedSetting)
        return LoopConfig.load(path)
