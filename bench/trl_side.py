"""The harness the `bench/*_vs_trl.py` scripts share: rlhfkit's recipe steps run *inside* a
TRL trainer's loop, so the two sides' steps interleave (the protocol is in `common.py`).

- `OurSide`: one rlhfkit run (the real `Engine` and recipe task) driven a step at a time by
  `train.loop.fit`;
- `Interleaver`: the TrainerCallback that times each TRL step and runs our steps between
  two of TRL's;
- `TrainingStepRecorder`: wraps `trainer.training_step` to keep TRL's loss of every step,
  its first batch and the metrics it logged for each step;
- `our_settings` / `trl_settings`: the settings both sides must share (batch, length,
  precision, AdamW lr/betas/weight decay, clipping, constant schedule, no warmup);
- `preference_records`: the preference pairs of the DPO and reward-model benchmarks;
- `parse_bench_args` / `start`: the command-line options and the report header every script
  shares; `step_loss_lines` and `print_speed`: the loss check and speed sections of the report.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import (  # bench/common.py, beside this script
    StepTimes,
    agreement_lines,
    format_machine,
    format_table,
    load_average,
    machine_info,
    peak_flops,
    ratio_lines,
    stopwatch,
    synchronize,
)

from rlhfkit.tasks.check import check
from rlhfkit.tasks.generate import FAMILIES, Task, make_tasks
from rlhfkit.train.engine import Engine, TrainConfig
from rlhfkit.train.loop import SupervisedTask, fit

MODEL = "embedded"  # the default of --model
PADDED, PACKED = "ours (padded)", "ours (packed)"  # our side with packing off / on


# ------------------------------------------------------------------------------ command line

def protocol_arguments(p: argparse.ArgumentParser, *, lr: float) -> None:
    """The options every benchmark has: steps, warmup, precision, lr, length, threads, TRL's
    gradient checkpointing and profiling."""
    p.add_argument("--model", default=MODEL,
                   help="model of both sides: 'embedded' (SmolLM2-135M-Instruct), an HF id or a local folder "
                        "(e.g. random weights from bench/random_checkpoint.py)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side (after warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast with fp32 master weights, or fp32 throughout")
    p.add_argument("--lr", type=float, default=lr, help="AdamW learning rate, constant, both sides")
    p.add_argument("--max-length", type=int, default=512, help="max sequence length of both sides")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every usable core)")
    p.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="TRL's gradient checkpointing (its default is on); ours never checkpoints")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one more step of each side and print the top ROWS ops")


def pairs_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per step (the batch size of both sides)")


def parse_bench_args(doc: str, argv, *, lr: float, own: Callable[[argparse.ArgumentParser], object],
                     positive: tuple[str, ...]) -> argparse.Namespace:
    """A script's options (`own`, whose `positive` ones must be ≥ 1) and the protocol's;
    adds `total_steps` and maps TRL's checkpointing to None/True/False."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    own(p)
    protocol_arguments(p, lr=lr)
    args = p.parse_args(argv)
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be ≥ 1, --warmup ≥ 0")
    args.trl_gradient_checkpointing = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]
    args.total_steps = args.warmup + args.steps + (1 if args.profile else 0)
    return args


def quiet_libraries() -> None:
    """No progress bars, info logs or warnings from datasets / transformers / TRL in the report."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute reads it
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def start(args: argparse.Namespace, title: str) -> int:
    """Set the torch threads, quiet the libraries, print the report header; returns the threads."""
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    quiet_libraries()
    print(f"# {title}\n")
    print(format_machine(machine_info()))
    print(f"command       python {' '.join(sys.argv)}\n")
    return threads


# ------------------------------------------------------------------------------ shared settings

def our_settings(args: argparse.Namespace, *, batch_size: int, data_path: Path, run_dir: Path) -> dict:
    """Keyword arguments of a recipe config (SFTConfig, DPOConfig, RewardConfig) for the bench."""
    return dict(train_data=str(data_path), output_dir=str(run_dir), model=args.model, batch_size=batch_size,
                grad_accum=1, lr=args.lr, warmup_steps=0, schedule="constant", weight_decay=0.0, max_grad_norm=1.0,
                precision=args.precision, max_length=args.max_length, max_steps=args.total_steps, progress=False,
                resume=False)


def trl_settings(args: argparse.Namespace, *, batch_size: int, run_dir: Path) -> dict:
    """Keyword arguments of a TRL config (SFTConfig, DPOConfig, RewardConfig) that must match ours.

    Everything else stays at TRL's defaults (gradient checkpointing on unless
    --trl-gradient-checkpointing says otherwise, `adamw_torch_fused`, dropout disabled).
    """
    out = dict(output_dir=str(run_dir), bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
               per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_length=args.max_length,
               learning_rate=args.lr, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant",
               warmup_steps=0, max_grad_norm=1.0, max_steps=args.total_steps, report_to=[], save_strategy="no",
               disable_tqdm=True, seed=0)
    if args.trl_gradient_checkpointing is not None:
        out["gradient_checkpointing"] = args.trl_gradient_checkpointing
    return out


def optimizer_summary(engine: Engine) -> str:
    """'AdamW fused (betas 0.9/0.95, eps 1e-08)': what our engine actually built."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    d = inner.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
    return f"{type(inner).__name__} {kind} (betas {d['betas'][0]}/{d['betas'][1]}, eps {d['eps']:g})"


# ------------------------------------------------------------------------------ data

def _wrong_answer(answer: str) -> str:
    """A plausible wrong value: off by one for integers, the opposite truth value, reversed
    order for lists and phrases, a dropped last letter for words, the next letter for letters."""
    opposite = {"true": "false", "false": "true", "yes": "no", "no": "yes"}
    if answer.lower() in opposite:
        return opposite[answer.lower()]
    if re.fullmatch(r"-?\d+", answer):
        return str(int(answer) + 1)
    sep = ", " if ", " in answer else " " if " " in answer else None
    if sep is not None:
        return sep.join(reversed(answer.split(sep)))
    if len(answer) > 1:
        return answer[:-1]
    return chr(ord("a") + (ord(answer.lower()) - ord("a") + 1) % 26) if answer.isalpha() else answer + answer


def wrong_response(task: Task, open_tasks: list[Task]) -> str:
    """A deterministic bad response to `task`.

    Checkable tasks: the reference with a wrong answer (an integer answer also changes after
    the reasoning's "=", so the reasoning agrees with it; otherwise only the final `Answer:`
    line changes). Open-ended tasks: the reference of the next open-ended task, an answer to
    another prompt.
    """
    if task.answer is None:
        return open_tasks[(open_tasks.index(task) + 1) % len(open_tasks)].reference
    wrong = _wrong_answer(task.answer)
    if re.fullmatch(r"-?\d+", task.answer):
        response = re.sub(rf"(= |Answer: ){re.escape(task.answer)}(?!\.?\d)", lambda m: m.group(1) + wrong,
                          task.reference)
    else:
        response = re.sub(r"Answer: .*$", lambda _: f"Answer: {wrong}", task.reference)
    if check(task, response):
        raise AssertionError(f"{task.id}: the 'wrong' response {response!r} passes the checker")
    return response


def preference_records(pairs: int) -> list[dict]:
    """`pairs` preference pairs in TRL's conversational layout, from the first demo train tasks
    (`make_tasks("train", 2)[:8]` for 8 pairs): chosen = the task's reference response,
    rejected = `wrong_response`. Both sides render them through the same chat template."""
    tasks = make_tasks("train", max(2, math.ceil(pairs / len(FAMILIES))))
    open_tasks = [t for t in tasks if not t.checkable]
    return [{"prompt": [{"role": "user", "content": t.prompt}],
             "chosen": [{"role": "assistant", "content": t.reference}],
             "rejected": [{"role": "assistant", "content": wrong_response(t, open_tasks)}]}
            for t in tasks[:pairs]]


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def both_layouts(tmp: Path, make: Callable[[bool, Path], object]) -> dict[str, object]:
    """{PADDED: make(packing=False, tmp/"ours"), PACKED: make(packing=True, tmp/"ours_packed")}."""
    return {PADDED: make(False, tmp / "ours"), PACKED: make(True, tmp / "ours_packed")}


def preference_setup(args: argparse.Namespace, tmp: Path, make_config: Callable) -> tuple[list[dict], dict]:
    """(the `--pairs` records, written to tmp/pairs.jsonl; {PADDED, PACKED: our config for
    that file, `make_config(args, packing=, data_path=, run_dir=)`})."""
    records = preference_records(args.pairs)
    data_path = write_jsonl(records, tmp / "pairs.jsonl")
    return records, both_layouts(tmp, lambda packing, run_dir: make_config(args, packing=packing, data_path=data_path,
                                                                           run_dir=run_dir))


def batch_rows(batch: dict) -> list[tuple[int, ...]]:
    """The real (attention-mask) tokens of each row of a collated TRL batch, sorted."""
    return sorted(tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"],
                                                               strict=True))


# ------------------------------------------------------------------------------ our side

@dataclass
class OurSide:
    """One rlhfkit run driven a step at a time through `fit` (engine already set up)."""

    engine: Engine
    task: SupervisedTask
    cfg: TrainConfig
    steps_done: int = 0

    def step(self) -> dict[str, float]:
        """Run optimizer step `steps_done + 1` with `fit`; returns its metrics."""
        # fit runs engine.start_step .. cfg.max_steps; pointing both at the next step lets TRL's
        # callback hand control back and forth while every step is still fit's own code.
        self.engine.cfg = self.cfg.replace(max_steps=self.steps_done + 1)
        self.engine.start_step = self.steps_done
        metrics = fit(self.engine, self.task)
        self.steps_done += 1
        return metrics


# ------------------------------------------------------------------------------ interleaving

class Interleaver:
    """TrainerCallback that times TRL's steps and runs our steps in between.

    TRL's step time is measured from the moment control returns to the trainer after our
    steps to the end of its next optimizer step, so it covers what the trainer does per step
    (data loading and collation, forward, backward, clipping, optimizer, its metrics).
    `compute` (on_step_begin → on_step_end) is kept too, for the report. `metrics[name]`
    holds the metrics of each of our sides' steps (the profiled step excluded).
    """

    def __init__(self, ours: dict[str, OurSide], times: dict[str, StepTimes], *, trl_name: str, device,
                 profile_step: int | None, profile_rows: int):
        from transformers import TrainerCallback

        self.ours, self.times, self.trl_name, self.device = ours, times, trl_name, device
        self.metrics: dict[str, list[dict[str, float]]] = {name: [] for name in ours}
        self.trl_compute: list[float] = []
        self.loads: list[str] = []
        self.profile_step, self.profile_rows = profile_step, profile_rows
        self.profiles: dict[str, str] = {}
        self._resumed = self._began = 0.0
        self._profiler = None
        outer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                outer._resumed = time.perf_counter()

            def on_step_begin(self, args, state, control, **kw):
                outer._began = time.perf_counter()
                if state.global_step == outer.profile_step:
                    outer._profiler = torch.profiler.profile(activities=_activities(outer.device))
                    outer._profiler.__enter__()

            def on_step_end(self, args, state, control, **kw):
                outer.trl_step_ended(state.global_step)

        self.callback = _Callback()

    @property
    def first_losses(self) -> dict[str, float]:
        return {name: m[0]["loss"] for name, m in self.metrics.items() if m}

    def trl_step_ended(self, step: int) -> None:
        """`step` is the number of optimizer steps TRL has finished (1 after the first)."""
        synchronize(self.device)
        now = time.perf_counter()
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.profiles[self.trl_name] = _top_ops(self._profiler, self.profile_rows)
            self._profiler = None
        else:
            self.times[self.trl_name].add(now - self._resumed)
            self.trl_compute.append(now - self._began)
        for name, side in self.ours.items():
            if step - 1 == self.profile_step:
                with torch.profiler.profile(activities=_activities(self.device)) as prof:
                    side.step()
                self.profiles[name] = _top_ops(prof, self.profile_rows)
                continue
            with stopwatch(self.device) as t:
                metrics = side.step()
            self.times[name].add(t[0])
            self.metrics[name].append(metrics)
        self.loads.append(load_average())
        self._resumed = time.perf_counter()


def _activities(device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _top_ops(prof, rows: int) -> str:
    key = "self_cuda_time_total" if any(e.device_type.name == "CUDA" for e in prof.events()) else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


@dataclass
class TrainingStepRecorder:
    """Wraps `trainer.training_step` (TRL's own call stays inside) to keep, per step, the loss
    it returned and the last value of each metric TRL's trainer logged for it (its
    `_metrics["train"]`), plus the first step's batch."""

    trainer: object
    losses: list[float] = field(default_factory=list)
    logged: list[dict[str, float]] = field(default_factory=list)
    first_batch: dict | None = None
    first_num_items: float | None = None

    def __post_init__(self):
        self.inner = self.trainer.training_step
        self.trainer.training_step = self

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    def __call__(self, model, inputs, num_items_in_batch=None):
        if self.first_batch is None:
            self.first_batch = {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
            self.first_num_items = None if num_items_in_batch is None else float(num_items_in_batch)
        loss = self.inner(model, inputs, num_items_in_batch)
        self.losses.append(float(loss))
        logged = getattr(self.trainer, "_metrics", {}).get("train", {})
        self.logged.append({k: float(v[-1]) for k, v in logged.items() if v})
        return loss


# ------------------------------------------------------------------------------ report

def step_loss_lines(inter: Interleaver, recorder: TrainingStepRecorder, step: int, *,
                    width: int | None = None) -> str | None:
    """Each side's loss of optimizer step `step` (0 = the first) against TRL's, or None when
    not every side ran it."""
    ours = {name: m[step]["loss"] for name, m in inter.metrics.items() if len(m) > step}
    if len(ours) < len(inter.metrics) or len(recorder.losses) <= step:
        return None
    return agreement_lines(ours, inter.trl_name, recorder.losses[step], width=width)


def print_speed(times: dict[str, StepTimes], inter: Interleaver, *, ours: str, others: list[str], flops: float,
                device, warmup: int) -> None:
    """The speed section: the table, every step, TRL's compute-only median, the ratios
    (`ours` against the target of 2×, each of `others` without one), loads and profiles."""
    trl = inter.trl_name
    rows = [times[name] for name in (ours, *others, trl)]
    print("\n## Speed (full optimizer steps: forward + backward + clip + AdamW)")
    print(format_table(rows, baseline=trl, flops_per_token=flops, peak=peak_flops(device)))
    width = max(len(r.name) for r in rows)
    for row in rows:
        print(f"{row.name:{width}} every step (s), warmup first: " + " ".join(f"{x:.3f}" for x in row.seconds))
    print(f"TRL step, on_step_begin → on_step_end only (no data loading): median "
          f"{statistics.median(inter.trl_compute[warmup:]):.3f} s")
    print(ratio_lines(times[ours], times[trl], target=2))
    for name in others:
        print(ratio_lines(times[name], times[trl]))
    print("load average  after each round: " + ", ".join(inter.loads))
    for name, table in inter.profiles.items():
        print(f"\n## Profile of one {name} step (top {inter.profile_rows} ops by self time)\n{table}")
