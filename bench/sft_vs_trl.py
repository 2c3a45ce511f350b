"""rlhfkit's SFT step against TRL's `SFTTrainer`: same model, batch, precision and optimizer,
in one process, steps interleaved; prints tokens/s of each side and the ratio.

    python bench/sft_vs_trl.py                      # 8 demo examples, bf16, 2 warmup + 8 timed steps
    python bench/sft_vs_trl.py --tasks-per-example 2  # longer examples, ≈900 tokens/step
    python bench/sft_vs_trl.py --precision fp32 --steps 8 --profile 15

What each side runs per optimizer step
- ours (packed): exactly what `rlhf sft` runs. The pieces are the real ones: records read by
  `read_sft` from a JSONL file, tokenized by `recipes.sft.encode_examples`, the task from
  `recipes.sft.sft_task` (`TokenLogprobs` chunked log-probs + `sft_loss` normalized by the
  step's loss tokens), the `Engine` (accelerate, bf16 autocast, AdamW, clipping, metrics).
  Each step is one call of `train.loop.fit` itself, told to run the next single step, so our
  steps can be interleaved with TRL's.
- ours (padded): the same with `packing=False` (length-grouped right padding), to show how
  much of the difference packing makes.
- TRL: `SFTTrainer.train()` with TRL's defaults except what must match (precision, batch
  size, max_length, lr, AdamW betas, constant schedule, no warmup) on a `datasets.Dataset` of
  the same records in the conversational prompt/completion layout, so the same chat template
  applies. A callback times each step and runs our steps between two of TRL's.

Both sides start from fresh fp32 weights of the embedded SmolLM2-135M-Instruct, use fp32
master weights with bf16 autocast (or fp32 throughout with `--precision fp32`), the same
number of torch threads, and see the same batch every step (all `--examples` examples).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from common import (  # bench/common.py, beside this script
    StepTimes,
    format_machine,
    format_table,
    load_average,
    machine_info,
    model_flops_per_token,
    peak_flops,
    ratio_lines,
    stopwatch,
    synchronize,
)

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import SkipReport
from rlhfkit.data.packing import collate_padded
from rlhfkit.data.readers import read_sft
from rlhfkit.data.tokenize import Encoded
from rlhfkit.demo.tasks import make_tasks
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.recipes.sft import SFTConfig as OurSFTConfig
from rlhfkit.recipes.sft import encode_examples, sft_task
from rlhfkit.train.engine import Engine, inner_hf_model
from rlhfkit.train.loop import SupervisedTask, fit

MODEL = "embedded"
OURS, OURS_PADDED, TRL = "ours (packed)", "ours (padded)", "TRL SFTTrainer"


# ------------------------------------------------------------------------------ data

def bench_records(examples: int, tasks_per_example: int) -> list[dict[str, str]]:
    """`examples` prompt/completion records from the demo train split.

    With tasks_per_example K > 1, K consecutive demo tasks are joined into one record (their
    prompts, then their references, separated by blank lines), for longer sequences.
    """
    need = examples * tasks_per_example
    tasks = make_tasks("train", math.ceil(need / 5))[:need]
    out = []
    for i in range(examples):
        group = tasks[i * tasks_per_example:(i + 1) * tasks_per_example]
        out.append({"prompt": "\n\n".join(t.prompt for t in group),
                    "completion": "\n\n".join(t.reference for t in group)})
    return out


def as_conversational(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """TRL's conversational prompt/completion layout of one record."""
    return {"prompt": [{"role": "user", "content": record["prompt"]}],
            "completion": [{"role": "assistant", "content": record["completion"]}]}


# ------------------------------------------------------------------------------ our side

@dataclass
class OurSide:
    """One rlhfkit SFT run driven a step at a time through `fit`."""

    engine: Engine
    task: SupervisedTask
    cfg: OurSFTConfig
    steps_done: int = 0

    def step(self) -> dict[str, float]:
        """Run optimizer step `steps_done + 1` with `fit`; returns its metrics (loss = NLL / loss token)."""
        # fit runs engine.start_step .. cfg.max_steps; pointing both at the next step lets TRL's
        # callback hand control back and forth while every step is still fit's own code.
        self.engine.cfg = self.cfg.replace(max_steps=self.steps_done + 1)
        self.engine.start_step = self.steps_done
        metrics = fit(self.engine, self.task)
        self.steps_done += 1
        return metrics


def build_ours(encoded: list[Encoded], tokenizer, *, packing: bool, args, data_path: Path,
               run_dir: Path) -> OurSide:
    cfg = OurSFTConfig(train_data=str(data_path), output_dir=str(run_dir), model=MODEL,
                       packing=packing, batch_size=len(encoded), grad_accum=1, lr=args.lr, warmup_steps=0,
                       schedule="constant", weight_decay=0.0, max_grad_norm=1.0, precision=args.precision,
                       max_length=args.max_length, max_steps=args.total_steps, progress=False, resume=False)
    engine = Engine(cfg, run_dir, total_steps=args.total_steps, description="sft")
    engine.setup(TokenLogprobs(load_model(MODEL), cfg.logprob_chunk), tokenizer)
    return OurSide(engine, sft_task(tokenizer, encoded, [], packing=packing), cfg)


def fp32_reference_loss(side: OurSide, encoded: list[Encoded], tokenizer) -> float:
    """Mean NLL of the batch's completion tokens with fresh weights in fp32, forward only.

    Runs the inner transformers model (not the accelerate-prepared module, whose forward
    autocasts), right-padded, with autocast off.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = collate_padded(encoded, pad).to(side.engine.device)
    module = TokenLogprobs(inner_hf_model(side.engine.unwrapped()), side.cfg.logprob_chunk)
    with torch.no_grad(), torch.autocast(side.engine.device.type, enabled=False):
        loss, _ = sft_loss(module(batch), batch.loss_mask)
    return float(loss)


# ------------------------------------------------------------------------------ TRL side

def build_trl(records: list[dict[str, str]], tokenizer, *, args, run_dir: Path, callback):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    trl_args = SFTConfig(
        output_dir=str(run_dir), bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        completion_only_loss=True, per_device_train_batch_size=len(records), gradient_accumulation_steps=1,
        max_length=args.max_length, packing=False, learning_rate=args.lr, adam_beta2=0.95, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, max_steps=args.total_steps,
        report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
        **({} if args.trl_gradient_checkpointing is None
           else {"gradient_checkpointing": args.trl_gradient_checkpointing}))
    dataset = Dataset.from_list([as_conversational(r) for r in records])
    return SFTTrainer(model=load_model(MODEL), args=trl_args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[callback])


def check_same_tokens(trainer, encoded: list[Encoded]) -> list[str]:
    """Compare TRL's prepared examples with ours token by token; returns the differences.

    Ours: labels[t] = ids[t+1] on response tokens (already shifted). TRL: labels[t] = ids[t]
    on completion tokens, shifted inside the model. So TRL's labels[1:] must equal ours[:-1].
    """
    problems = []
    rows = trainer.train_dataset
    if len(rows) != len(encoded):
        return [f"TRL kept {len(rows)} examples, we kept {len(encoded)}"]
    for i, (row, ours) in enumerate(zip(rows, encoded, strict=True)):
        if list(row["input_ids"]) != ours.input_ids:
            problems.append(f"example {i}: input ids differ (TRL {len(row['input_ids'])} tokens, "
                            f"ours {len(ours.input_ids)})")
            continue
        theirs_shifted = list(row["labels"][1:]) + [IGNORE_INDEX]
        if theirs_shifted != ours.labels:
            diff = [t for t, (a, b) in enumerate(zip(theirs_shifted, ours.labels, strict=True)) if a != b]
            problems.append(f"example {i}: loss masks differ at positions {diff}")
    return problems


# ------------------------------------------------------------------------------ interleaving

class Interleaver:
    """TrainerCallback that times TRL's steps and runs our steps in between.

    TRL's step time is measured from the moment control returns to the trainer after our
    steps to the end of its next optimizer step, so it covers what the trainer does per step
    (data loading and collation, forward, backward, clipping, optimizer, its metrics).
    `compute` (on_step_begin → on_step_end) is kept too, for the report.
    """

    def __init__(self, ours: dict[str, OurSide], times: dict[str, StepTimes], *, device, profile_step: int | None,
                 profile_rows: int):
        from transformers import TrainerCallback

        self.ours, self.times, self.device = ours, times, device
        self.first_losses: dict[str, float] = {}
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

    def trl_step_ended(self, step: int) -> None:
        """`step` is the number of optimizer steps TRL has finished (1 after the first)."""
        synchronize(self.device)
        now = time.perf_counter()
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.profiles[TRL] = _top_ops(self._profiler, self.profile_rows)
            self._profiler = None
        else:
            self.times[TRL].add(now - self._resumed)
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
            self.first_losses.setdefault(name, metrics["loss"])
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


class LossRecorder:
    """Wraps `trainer.training_step` to keep the first step's loss and batch (TRL's own call)."""

    def __init__(self, trainer):
        self.inner = trainer.training_step
        self.first_loss: float | None = None
        self.first_batch: dict | None = None
        self.first_num_items: float | None = None
        trainer.training_step = self

    def __call__(self, model, inputs, num_items_in_batch=None):
        if self.first_batch is None:
            self.first_batch = {k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)}
            self.first_num_items = None if num_items_in_batch is None else float(num_items_in_batch)
        loss = self.inner(model, inputs, num_items_in_batch)
        if self.first_loss is None:
            self.first_loss = float(loss)
        return loss


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=8, help="examples per step (the batch size of both sides)")
    p.add_argument("--tasks-per-example", type=int, default=1,
                   help="demo tasks joined into one example (2 gives ≈900 tokens/step with 8 examples)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per side (after warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side before timing")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast with fp32 master weights, or fp32 throughout")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate, constant, both sides")
    p.add_argument("--max-length", type=int, default=512, help="max sequence length of both sides")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every usable core)")
    p.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="TRL's gradient checkpointing (its default is on); ours never checkpoints")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one more step of each side and print the top ROWS ops")
    args = p.parse_args(argv)
    if args.examples < 1 or args.tasks_per_example < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--examples, --tasks-per-example and --steps must be ≥ 1, --warmup ≥ 0")
    args.trl_gradient_checkpointing = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]
    args.total_steps = args.warmup + args.steps + (1 if args.profile else 0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    print("# rlhfkit SFT step vs TRL SFTTrainer\n")
    print(format_machine(machine_info()))
    print(f"command       python {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as folder:
        run(args, threads, Path(folder))
    return 0


def run(args, threads: int, tmp: Path) -> None:
    """Build both sides in `tmp` (data file, run folders), train them interleaved, print the report."""
    tokenizer = load_tokenizer(MODEL)
    records = bench_records(args.examples, args.tasks_per_example)
    data_path = tmp / "train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    skipped = SkipReport()
    encoded = encode_examples(tokenizer, read_sft(str(data_path)), args.max_length, skipped, str(data_path))
    if skipped.total:
        raise SystemExit(f"examples skipped: {skipped.summary()}; raise --max-length")

    ours = {OURS: build_ours(encoded, tokenizer, packing=True, args=args, data_path=data_path,
                              run_dir=tmp / "ours"),
            OURS_PADDED: build_ours(encoded, tokenizer, packing=False, args=args,
                                     data_path=data_path, run_dir=tmp / "ours_padded")}
    device = ours[OURS].engine.device

    real_tokens = sum(len(e) for e in encoded)
    loss_tokens = sum(sum(t != IGNORE_INDEX for t in e.labels) for e in encoded)
    times = {name: StepTimes(name, real_tokens, args.warmup) for name in (TRL, OURS, OURS_PADDED)}
    inter = Interleaver(ours, times, device=device, profile_step=args.warmup + args.steps if args.profile else None,
                        profile_rows=args.profile)
    trainer = build_trl(records, tokenizer, args=args, run_dir=tmp / "trl", callback=inter.callback)
    token_problems = check_same_tokens(trainer, encoded)
    recorder = LossRecorder(trainer)

    print(f"batch         {len(encoded)} examples × {args.tasks_per_example} demo task(s); "
          f"{real_tokens} real tokens, {loss_tokens} loss (completion) tokens; precision {args.precision}; "
          f"lr {args.lr}; threads {threads}")
    print(f"TRL settings  optim {trainer.args.optim.value}, gradient_checkpointing "
          f"{trainer.args.gradient_checkpointing}, padding_free {trainer.args.padding_free}, "
          f"max_length {trainer.args.max_length}")
    print(f"ours          AdamW foreach (betas 0.9/0.95), no gradient checkpointing, "
          f"logprob_chunk {ours[OURS].cfg.logprob_chunk}")
    reference_loss = fp32_reference_loss(ours[OURS_PADDED], encoded, tokenizer)
    print("load average  before the steps: " + load_average())

    trainer.train()

    # ---- same tokens and the same loss at step 0
    batch = recorder.first_batch or {}
    trl_real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else -1
    trl_shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else ()
    trl_loss_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else -1
    trl_rows = sorted(tuple(r[m.bool()].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"],
                                                                   strict=True)) if batch else []
    same_rows = trl_rows == sorted(tuple(e.input_ids) for e in encoded)
    print("\n## Same tokens")
    print(f"ours          {real_tokens} real tokens, {loss_tokens} loss tokens "
          f"(packed: 1 × {real_tokens}; padded: {len(encoded)} × {max(len(e) for e in encoded)})")
    print(f"TRL           {trl_real} real tokens, {trl_loss_tokens} loss tokens, batch {trl_shape[0]} × "
          f"{trl_shape[1]} = {trl_shape[0] * trl_shape[1]} positions, num_items_in_batch {recorder.first_num_items}")
    print(f"identical     rows of input ids: {'yes' if same_rows else 'NO'}; loss masks: "
          f"{'yes' if not token_problems else 'NO: ' + '; '.join(token_problems)}")

    print("\n## Step-0 loss (fresh weights, same batch; mean NLL per completion token)")
    trl_loss = recorder.first_loss
    for name in (OURS, OURS_PADDED):
        diff = abs(inter.first_losses[name] - trl_loss)
        print(f"{name:15} {inter.first_losses[name]:.6f}   |ours − TRL| = {diff:.2e}  "
              f"{'within 1e-3' if diff <= 1e-3 else 'DIFFERS by more than 1e-3'}")
    print(f"{TRL:15} {trl_loss:.6f}")
    print(f"{'fp32 reference':15} {reference_loss:.6f}   (same fresh weights and batch, fp32 forward, no autocast: "
          "the scale of bf16 rounding noise in the lines above)")

    print("\n## Speed (full optimizer steps: forward + backward + clip + AdamW)")
    flops = model_flops_per_token(sum(p.numel() for p in ours[OURS].engine.unwrapped().parameters()))
    print(format_table([times[OURS], times[OURS_PADDED], times[TRL]], baseline=TRL, flops_per_token=flops,
                       peak=peak_flops(device)))
    for row in (times[OURS], times[OURS_PADDED], times[TRL]):
        print(f"{row.name:15} every step (s), warmup first: " + " ".join(f"{x:.3f}" for x in row.seconds))
    print(f"TRL step, on_step_begin → on_step_end only (no data loading): median "
          f"{statistics.median(inter.trl_compute[args.warmup:]):.3f} s")
    print(ratio_lines(times[OURS], times[TRL], target=2))
    print(ratio_lines(times[OURS_PADDED], times[TRL]))
    print("load average  after each round: " + ", ".join(inter.loads))

    for name, table in inter.profiles.items():
        print(f"\n## Profile of one {name} step (top {args.profile} ops by self time)\n{table}")


if __name__ == "__main__":
    sys.exit(main())
