"""The demo pipeline: the whole loop on the embedded model, on a laptop CPU.

Stages run in order; each writes `stages/<name>.json` with its results and wall time, so
a rerun of the same command skips finished stages (and a killed training stage resumes
from its checkpoint). Every number a stage reports is measured on held-out test prompts
that no training stage saw.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhfkit.train.checkpoint import atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; `quick` fits in about 10 minutes on 2 CPU cores."""

    out: Path
    model: str = "embedded"
    train_per_family: int = 120
    test_per_family: int = 25
    sft_steps: int = 60
    sft_batch: int = 8
    sft_lr: float = 1e-4
    max_new_tokens: int = 40
    seed: int = 0
    precision: str = "auto"

    @classmethod
    def quick(cls, out: Path, **kw) -> "DemoSettings":
        return cls(out=out, **kw)

    @classmethod
    def full(cls, out: Path, **kw) -> "DemoSettings":
        return cls(out=out, train_per_family=400, test_per_family=100, sft_steps=200, **kw)


@dataclass
class DemoContext:
    settings: DemoSettings
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.settings.out

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)


Stage = tuple[str, str, Callable[[DemoContext], dict[str, Any]]]


def stage_data(ctx: DemoContext) -> dict[str, Any]:
    from rlhfkit.demo.tasks import make_tasks, to_sft_record, write_jsonl

    s = ctx.settings
    train = make_tasks("train", s.train_per_family, seed=s.seed)
    test = make_tasks("test", s.test_per_family, seed=s.seed)
    rows = "".join(json.dumps(to_sft_record(t)) + "\n" for t in train)
    atomic_write_text(ctx.path("data", "sft_train.jsonl"), rows)
    write_jsonl(test, ctx.path("data", "test_tasks.jsonl"))
    return {"train_examples": len(train), "test_prompts": len(test),
            "test_checkable": sum(t.checkable for t in test)}


def _test_tasks(ctx: DemoContext):
    from rlhfkit.demo.tasks import read_jsonl

    return read_jsonl(ctx.path("data", "test_tasks.jsonl"))


def evaluate_checkpoint(ctx: DemoContext, model_path: str) -> dict[str, Any]:
    import torch

    from rlhfkit.eval.accuracy import exact_match
    from rlhfkit.models.loading import load_model, load_tokenizer
    from rlhfkit.train.engine import resolve_precision

    dtype = torch.bfloat16 if resolve_precision(ctx.settings.precision) == "bf16" else torch.float32
    tok, model = load_tokenizer(model_path), load_model(model_path, dtype=dtype)
    res = exact_match(model, tok, _test_tasks(ctx), max_new_tokens=ctx.settings.max_new_tokens, progress=True)
    return {**res.to_dict(), "samples": res.samples}


def stage_eval_base(ctx: DemoContext) -> dict[str, Any]:
    return evaluate_checkpoint(ctx, ctx.settings.model)


def stage_sft(ctx: DemoContext) -> dict[str, Any]:
    from rlhfkit.recipes.sft import SFTConfig, run_sft

    s = ctx.settings
    cfg = SFTConfig(model=s.model, train_data=str(ctx.path("data", "sft_train.jsonl")),
                    output_dir=str(ctx.path("sft")), max_steps=s.sft_steps, batch_size=s.sft_batch,
                    lr=s.sft_lr, warmup_steps=max(1, s.sft_steps // 10), seed=s.seed, precision=s.precision,
                    save_every=max(10, s.sft_steps // 4))
    out = run_sft(cfg)
    return {"final": out["final"], "train_loss": out["metrics"].get("loss"), "steps": s.sft_steps}


def stage_eval_sft(ctx: DemoContext) -> dict[str, Any]:
    return evaluate_checkpoint(ctx, str(ctx.path("sft", "final")))


STAGES: list[Stage] = [
    ("data", "make demo tasks (train/test split)", stage_data),
    ("eval_base", "exact-match accuracy of the embedded model", stage_eval_base),
    ("sft", "supervised fine-tuning", stage_sft),
    ("eval_sft", "exact-match accuracy after SFT", stage_eval_sft),
]


def run_demo(settings: DemoSettings, *, fresh: bool = False,
             on_stage: Callable[[str, str, dict[str, Any]], None] | None = None) -> DemoContext:
    ctx = DemoContext(settings)
    settings.out.mkdir(parents=True, exist_ok=True)
    for name, desc, fn in STAGES:
        marker = ctx.path("stages", f"{name}.json")
        if marker.exists() and not fresh:
            ctx.results[name] = json.loads(marker.read_text())
            log.info("stage %s: already done (delete %s to redo)", name, marker)
        else:
            log.info("stage %s: %s", name, desc)
            t0 = time.perf_counter()
            result = fn(ctx)
            result["wall_s"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(marker, json.dumps(result, indent=2))
            ctx.results[name] = result
        if on_stage is not None:
            on_stage(name, desc, ctx.results[name])
    from rlhfkit.demo.report import write_demo_report

    ctx.results["report"] = {"path": str(write_demo_report(ctx))}
    return ctx
