"""The harness the `bench/*_vs_trl.py` scripts share: rlhfkit's recipe steps run *inside* a
TRL trainer's loop, so the two sides' steps interleave (the protocol is in `common.py`).

- `OurSide`: one rlhfkit run (the real `Engine` and recipe task) driven a step at a time by
  `train.loop.fit`;
- `Interleaver`: the TrainerCallback that times each TRL step and runs our steps between
  two of TRL's, then one step of every further TRL trainer (`FollowerTRL`, e.g. TRL's best
  settings beside its defaults: `--trl-sides`, `build_trl_sides`);
- `our_settings` / `trl_settings`: the settings both sides must share (batch, length,
  precision, AdamW lr/betas/weight decay, clipping, constant schedule, no warmup);
- `parse_bench_args` / `start`: the command-line options and the report header every script
  shares (`trl_side_arguments` / `parse_trl_sides`: only the --trl-sides options, for a script
  with options of its own); `step_loss_lines` and `print_speed`: the loss check and speed
  sections of the report.

The data the trainers get and give (`preference_records`, `TrainingStepRecorder`, ...) is in
`trl_data.py`.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (  # bench/common.py, beside this script
    PeakMemory,
    StepTimes,
    agreement_line,
    agreement_lines,
    format_machine,
    format_table,
    load_average,
    machine_info,
    measured,
    peak_flops,
    ratio_lines,
    synchronize,
)
from trl_data import TrainingStepRecorder  # bench/trl_data.py, beside this script

from rlhfkit.train.engine import Engine, TrainConfig
from rlhfkit.train.loop import SupervisedTask, fit

MODEL = "embedded"  # the default of --model


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
    p.add_argument("--mix", default=None, metavar="LO,HI",
                   help="examples of mixed lengths: each joins demo tasks up to a token length drawn uniformly "
                        "from LO..HI (seeded; raise --max-length above HI); default: one demo task each")
    trl_side_arguments(p)
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one more step of each side and print the top ROWS ops")


def trl_side_arguments(p: argparse.ArgumentParser) -> None:
    """--trl-sides and --trl-gradient-checkpointing (read them back with `parse_trl_sides`)."""
    p.add_argument("--trl-sides", default="default,best",
                   help="TRL columns, in run order, comma-separated: 'default' (TRL's defaults) and/or 'best' "
                        "(TRL's fastest settings on this hardware: no gradient checkpointing, plus what each "
                        "script's TRL_BEST lists); the first one's trainer drives the loop")
    p.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="gradient checkpointing of the 'default' TRL column (TRL's default is on); "
                        "'best' never checkpoints, nor do we")


def parse_trl_sides(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Turn `trl_side_arguments`' options into args.trl_sides (['default', 'best'], in run order)
    and args.trl_gradient_checkpointing (None = TRL's default, True, False); errors through `p`."""
    args.trl_gradient_checkpointing = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]
    args.trl_sides = [side.strip() for side in args.trl_sides.split(",") if side.strip()]
    if not args.trl_sides or len(set(args.trl_sides)) < len(args.trl_sides) or \
            not set(args.trl_sides) <= {"default", "best"}:
        p.error("--trl-sides takes 'default', 'best' or both, comma-separated, each once")


def parse_mix(p: argparse.ArgumentParser, mix: str | None, max_length: int) -> tuple[int, int] | None:
    """--mix "LO,HI" → (LO, HI), 1 ≤ LO ≤ HI ≤ --max-length; errors through `p`."""
    if mix is None:
        return None
    try:
        lo, hi = (int(x) for x in mix.split(","))
    except ValueError:
        p.error(f"--mix takes two integers LO,HI, got '{mix}'")
    if not 1 <= lo <= hi <= max_length:
        p.error(f"--mix needs 1 ≤ LO ≤ HI ≤ --max-length ({max_length}), got {lo},{hi}")
    return lo, hi


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
    parse_trl_sides(p, args)
    args.mix = parse_mix(p, args.mix, args.max_length)
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


def trl_settings(args: argparse.Namespace, *, batch_size: int, run_dir: Path, best: bool = False) -> dict:
    """Keyword arguments of a TRL config (SFTConfig, DPOConfig, RewardConfig) that must match ours.

    Everything else stays at TRL's defaults (`adamw_torch_fused`, dropout disabled, gradient
    checkpointing on unless --trl-gradient-checkpointing says otherwise), except that `best`
    turns gradient checkpointing off (it trades time for memory: never faster).
    """
    out = dict(output_dir=str(run_dir), bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
               per_device_train_batch_size=batch_size, gradient_accumulation_steps=1, max_length=args.max_length,
               learning_rate=args.lr, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant",
               warmup_steps=0, max_grad_norm=1.0, max_steps=args.total_steps, report_to=[], save_strategy="no",
               disable_tqdm=True, seed=0)
    if best:
        out["gradient_checkpointing"] = False
    elif args.trl_gradient_checkpointing is not None:
        out["gradient_checkpointing"] = args.trl_gradient_checkpointing
    return out


def trl_names(base: str, args: argparse.Namespace) -> dict[str, str]:
    """{'default' | 'best': the column name} of the --trl-sides columns, in run order; the default
    column's name says when --trl-gradient-checkpointing overrode TRL's default."""
    default = base + {None: "", True: " (checkpointing)", False: " (no checkpointing)"}[args.trl_gradient_checkpointing]
    return {side: default if side == "default" else f"{base} (best)" for side in args.trl_sides}


def liger_note() -> str:
    """Why TRL's `use_liger_kernel` is not part of its best settings here."""
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        return "use_liger_kernel off (liger-kernel is not installed; its kernels are Triton, GPU only)"
    return "use_liger_kernel off (liger-kernel is installed, but its Triton kernels do not run on CPU)" if \
        not torch.cuda.is_available() else "use_liger_kernel off (not tried by this benchmark)"


def optimizer_summary(engine: Engine) -> str:
    """'AdamW fused (betas 0.9/0.95, eps 1e-08)': what our engine actually built."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    d = inner.defaults
    kind = "fused" if d.get("fused") else "foreach" if d.get("foreach") else "for-loop"
    return f"{type(inner).__name__} {kind} (betas {d['betas'][0]}/{d['betas'][1]}, eps {d['eps']:g})"


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
    """TrainerCallback that times TRL's steps and runs our steps in between, then one step of
    each follower (a further TRL trainer, `follower()`).

    TRL's step time is measured from the moment control returns to the trainer after the other
    sides' steps to the end of its next optimizer step, so it covers what the trainer does per
    step (data loading and collation, forward, backward, clipping, optimizer, its metrics); the
    peak memory (`PeakMemory`) over the same span. `compute[name]` (on_step_begin →
    on_step_end) is kept too, for the report. `metrics[name]` holds the metrics of each of our
    sides' steps (the profiled step excluded).
    """

    def __init__(self, ours: dict[str, OurSide], times: dict[str, StepTimes], *, trl_name: str, device,
                 profile_step: int | None, profile_rows: int, meter: PeakMemory | None = None):
        self.ours, self.times, self.trl_name, self.device = ours, times, trl_name, device
        self.meter = meter or PeakMemory(device)
        self.metrics: dict[str, list[dict[str, float]]] = {name: [] for name in ours}
        self.compute: dict[str, list[float]] = {trl_name: []}  # per TRL side: on_step_begin → on_step_end
        self.followers: list[FollowerTRL] = []
        self.loads: list[str] = []
        self.profile_step, self.profile_rows = profile_step, profile_rows
        self.profiles: dict[str, str] = {}
        self.callback = _timing_callback(self, trl_name, self._trl_step_ended, self.compute[trl_name])

    @property
    def trl_names(self) -> list[str]:
        return [self.trl_name, *(f.name for f in self.followers)]

    @property
    def first_losses(self) -> dict[str, float]:
        return {name: m[0]["loss"] for name, m in self.metrics.items() if m}

    def follower(self, name: str) -> FollowerTRL:
        """A further TRL side; build its trainer with `.callback`, then set `.trainer`."""
        self.followers.append(FollowerTRL(self, name))
        self.compute[name] = self.followers[-1].compute
        return self.followers[-1]

    def train(self, trainer) -> None:
        """`trainer.train()` (the driver's loop), the followers' loops interleaved with it."""
        for f in self.followers:
            f.begin()
        trainer.train()
        for f in self.followers:
            f.finish()

    def _trl_step_ended(self, step: int) -> None:
        """`step` is the number of optimizer steps the driver has finished (1 after the first)."""
        for name, side in self.ours.items():
            if step - 1 == self.profile_step:
                with torch.profiler.profile(activities=_activities(self.device)) as prof:
                    side.step()
                self.profiles[name] = _top_ops(prof, self.profile_rows)
                continue
            with measured(self.times[name], self.meter, self.device):
                metrics = side.step()
            self.metrics[name].append(metrics)
        for f in self.followers:
            f.step()
        self.loads.append(load_average())


def _timing_callback(inter: Interleaver, name: str, then: Callable[[int], None], compute: list[float],
                     at_begin: Callable[[int], None] | None = None):
    """A TrainerCallback timing a TRL trainer's steps into `inter.times[name]`: from `resume`
    (train begin, or control coming back) to on_step_end, and on_step_begin → on_step_end into
    `compute`; the profile step is profiled instead. At on_step_end it calls `then(step)` and
    resumes; at train begin `at_begin(0)` first, when given."""
    from transformers import TrainerCallback

    class _Callback(TrainerCallback):
        profiler, resumed, began = None, 0.0, 0.0

        def resume(self):
            inter.meter.start()
            self.resumed = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            if at_begin is not None:
                at_begin(0)
            self.resume()

        def on_step_begin(self, args, state, control, **kw):
            self.began = time.perf_counter()
            if state.global_step == inter.profile_step:
                self.profiler = torch.profiler.profile(activities=_activities(inter.device))
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kw):
            synchronize(inter.device)
            now = time.perf_counter()
            memory = inter.meter.stop()
            if self.profiler is not None:
                self.profiler.__exit__(None, None, None)
                inter.profiles[name] = _top_ops(self.profiler, inter.profile_rows)
                self.profiler = None
            else:
                inter.times[name].add(now - self.resumed, memory)
                compute.append(now - self.began)
            then(state.global_step)
            if state.global_step < state.max_steps:  # after the last step nothing more is timed
                self.resume()

    return _Callback()


class FollowerTRL:
    """A further TRL trainer interleaved with the driver's: its `train()` runs in a worker
    thread that hands control back to the main thread at train begin and after each optimizer
    step and waits there, so exactly one thread computes at any time. The driver's callback
    calls `step()` after our steps: the follower runs one optimizer step, timed as the driver's
    are (from the hand-off to on_step_end). Torch's thread count is set in the worker too."""

    def __init__(self, inter: Interleaver, name: str):
        self.name, self.trainer, self.error = name, None, None
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._threads = torch.get_num_threads()
        self.compute: list[float] = []
        self.callback = _timing_callback(inter, name, self._hand_back, self.compute, at_begin=self._hand_back)

    def _hand_back(self, step: int) -> None:
        self._done.release()
        self._go.acquire()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        try:
            self.trainer.train()
        except BaseException as e:  # re-raised in the main thread
            self.error = e
        finally:
            self._done.release()

    def _wait(self) -> None:
        self._done.acquire()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.error

    def begin(self) -> None:
        """Start the worker; returns once its trainer is set up and waits at train begin."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        self._wait()

    def step(self) -> None:
        self._go.release()
        self._wait()

    def finish(self) -> None:
        """Let the worker's loop end (after its last step) and wait for it."""
        self._go.release()
        self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"{self.name} failed") from self.error


def build_trl_sides(inter: Interleaver, names: dict[str, str], build: Callable[[bool, object], object]) -> dict:
    """{name: TRL trainer} of each `trl_names` column, `build(best, callback)` making one; the
    first drives the loop (the Interleaver's callback), the others follow it."""
    trainers = {}
    for side, name in names.items():
        if not trainers:
            trainers[name] = build(side == "best", inter.callback)
        else:
            follower = inter.follower(name)
            trainers[name] = follower.trainer = build(side == "best", follower.callback)
    return trainers


def _activities(device) -> list:
    acts = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return acts


def _top_ops(prof, rows: int) -> str:
    key = "self_cuda_time_total" if any(e.device_type.name == "CUDA" for e in prof.events()) else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


# ------------------------------------------------------------------------------ report

def step_loss_lines(inter: Interleaver, recorders: dict[str, TrainingStepRecorder], step: int, *,
                    width: int | None = None) -> str | None:
    """Each of our sides' loss of optimizer step `step` (0 = the first) against the first TRL
    side's, then each other TRL side's against it; None when not every side ran it."""
    (trl, first), *rest = recorders.items()
    ours = {name: m[step]["loss"] for name, m in inter.metrics.items() if len(m) > step}
    if len(ours) < len(inter.metrics) or any(len(r.losses) <= step for r in recorders.values()):
        return None
    width = width or max(len(name) for name in (*ours, *recorders))
    lines = [agreement_lines(ours, trl, first.losses[step], width=width)]
    lines += [agreement_line(name, r.losses[step], first.losses[step], width=width, against=f"this − {trl}")
              for name, r in rest]
    return "\n".join(lines)


def print_speed(times: dict[str, StepTimes], inter: Interleaver, *, ours: str, others: list[str],
                flops: float | None, device, warmup: int,
                heading: str = "Speed and memory (full optimizer steps: forward + backward + clip + AdamW)") -> None:
    """The speed section under `heading`: the table (speed, peak memory, MFU when `flops` per
    token is given), every step, each TRL side's compute-only median, the ratios to each TRL
    side (`ours` against the target of 2×, each of `others` without one), loads and profiles."""
    trls = inter.trl_names
    rows = [times[name] for name in (ours, *others, *trls)]
    print(f"\n## {heading}")
    print(format_table(rows, baseline=trls, flops_per_token=flops, peak=peak_flops(device)))
    width = max(len(r.name) for r in rows)
    for row in rows:
        print(f"{row.name:{width}} every step (s), warmup first: " + " ".join(f"{x:.3f}" for x in row.seconds))
    if torch.device(device).type == "cuda":
        print("peak MiB      torch.cuda.max_memory_allocated() during the step − memory_allocated() at its start")
    else:
        print("peak MiB      bytes held from glibc malloc (mallinfo2) at the step's peak − at its start (sampled "
              "every 5 ms, or 100× a sample's duration when longer); process RSS the same way: " + ", ".join(
                  f"{r.name} {r.peak_rss_mib:.0f}" for r in rows if r.peak_rss_mib is not None))
    for name in trls:
        print(f"{name} step, on_step_begin → on_step_end only (no data loading): median "
              f"{statistics.median(inter.compute[name][warmup:]):.3f} s")
    for name in trls:
        print(ratio_lines(times[ours], times[name], target=2))
        for other in others:
            print(ratio_lines(times[other], times[name]))
    print("load average  after each round: " + ", ".join(inter.loads))
    for name, table in inter.profiles.items():
        print(f"\n## Profile of one {name} step (top {inter.profile_rows} ops by self time)\n{table}")
