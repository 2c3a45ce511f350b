"""rlhfkit's GRPO step against TRL's `GRPOTrainer`: same model, prompts, group size, sampling,
loss settings and precision, in one process, steps interleaved; prints seconds per step of
each side, generated tokens per step, seconds per 1k generated tokens, generation speed,
peak memory per step and the ratios, against TRL's defaults and against TRL's best settings.

    python bench/grpo_vs_trl.py                 # 8 prompts × 4 samples, ≤ 64 new tokens, bf16, 1 + 5 steps
    python bench/grpo_vs_trl.py --trl-sides default   # ours against TRL's defaults only
    python bench/grpo_vs_trl.py --beta 0        # TRL's default β: no TRL reference model (ours still runs one)
    python bench/grpo_vs_trl.py --fixed-length  # every response exactly --max-new-tokens long, all sides
    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py --prompts 2 --group 4 --max-new-tokens 16 \\
        --warmup 0 --steps 1 --gen-repeats 1 --threads 1 --micro-batch 4   # smoke test, a few minutes

What each side runs per step (one rollout, then one optimizer step on it)
- ours: exactly what `rlhf grpo` runs per step: `recipes.policy_gradient.train_step` on the
  run `setup_run` builds from a `GRPOConfig` (demo tasks, gold reward), then
  `engine.end_step` (metrics logging). train_step: `PolicySampler` (sync, then HF `model.generate`
  with KV cache, prompts sorted by length and left-padded, `gen_batch_size` = all rows, so
  one batch; each distinct prompt prefilled once and its KV cache shared by its G rows; tokens
  drawn by inverse CDF, `InverseCDFSampler`, instead of `torch.multinomial`) → the
  gold reward (`GoldReward`: the demo task's checker) → `with_logprobs`: no-grad forwards of
  the frozen reference in length-sorted micro-batches of `--micro-batch` rows (reference
  log-probs; run even when β = 0; on policy, no separate policy forward: log π_old comes
  detached from the update's own forward) → group-normalized advantages → forward + backward
  of `grpo_loss` (clipped surrogate + β·k3 in the loss, "token" aggregation) in length-sorted
  micro-batches of `--micro-batch` rows (`rlhf grpo`'s default 8; gradients accumulated, so
  the step's gradient is that of all P × G rows) → clip 1.0 → AdamW (fused).
- TRL (column "TRL GRPOTrainer"): `GRPOTrainer.train()` with TRL's defaults except what must
  match; per optimizer step `_generate_and_score_completions`: HF `model.generate` of all
  rows in one batch (prompts repeated, left-padded, unsorted) → the reward function → a
  no-grad reference forward of all rows only when β ≠ 0 (TRL skips the old-log-prob forward
  when on-policy: num_iterations = 1 and gradient_accumulation_steps a multiple of
  steps_per_generation, and uses the detached current log-probs instead) → one forward of
  all P × G rows (per_device_train_batch_size = P × G, gradient_accumulation_steps 1; fused
  chunked LM head: log-probs and entropy) + backward with gradient checkpointing (TRL's
  default; `--trl-gradient-checkpointing off` turns it off for this column) → clip 1.0 →
  AdamW (`adamw_torch_fused`).
- TRL (best) (column "TRL GRPOTrainer (best)"): the same with TRL's fastest settings on this
  hardware: gradient checkpointing off, and the update in micro-batches of the same size as
  ours: per_device_train_batch_size = `--micro-batch`, gradient_accumulation_steps =
  steps_per_generation = P × G / micro-batch (so generation_batch_size = P × G: TRL generates
  all P × G completions once per optimizer step, at its first micro-step, buffers them and
  runs P × G / micro-batch forward + backward passes of micro-batch rows, the reference
  forward in chunks of micro-batch rows too; P × G must be divisible by --micro-batch). Not
  set: `use_liger_kernel` (see the settings line; TRL 1.16's GRPOTrainer also deprecates it
  in favour of Hub kernels). Its trainer runs in a worker thread that takes turns with the
  main one (`trl_side.FollowerTRL`): TRL, ours, TRL best, TRL, ...
A TrainerCallback times each TRL optimizer step (generation and every micro-batch: from the
hand-back after the other sides' steps to on_step_end, which with gradient accumulation
fires once per optimizer step; the report counts the callbacks, generate calls and
forward/backward passes per step) and runs our steps between two of TRL's (`Interleaver` in
bench/trl_side.py, shared with the other benchmarks); peak memory per step by `PeakMemory`.

Settings made equal (TRL 1.16 defaults in brackets where we set them)
- model: the embedded SmolLM2-135M-Instruct, fresh fp32 weights each side; bf16 autocast
  with fp32 master weights on all sides (`--precision fp32`: fp32 throughout); same torch threads.
- prompts: the first `--prompts` demo train tasks of the four checkable families
  (`make_tasks("train", …)`), the same P prompts every step on all sides (ours: the run's
  prompt list cut to P with prompts_per_step = P; TRL: a dataset of those P prompts with a
  generation batch of P × G rows); the prompt token ids are checked to be identical.
- group size G (num_generations [8]), max new tokens (max_completion_length [512]),
  temperature 1.0, top_p 1, top_k off.
- reward: ours `--reward gold`; TRL a Python reward function that calls the same
  `GoldReward` (the demo task's checker) on the stripped completion text.
- loss: β = `--beta` (default 0.05, our default; TRL's default is 0.0) with the k3 estimator
  in the loss on all sides; TRL's `use_bias_correction_kl` [True] is set False (ours has
  no importance weight on the KL term); clip ε 0.2 (epsilon); one update per rollout
  (num_iterations 1 / inner_epochs 1, minibatches 1); loss averaged over all response
  tokens of the step (loss_type "dapo", TRL's default = our aggregation "token"; with
  gradient accumulation TRL divides each micro-batch's sum by the tokens of the whole
  generation batch, so the step's gradient is the same); advantages (r − mean_g) / std_g
  (scale_rewards "group", TRL's default; ε 1e-4 vs ours 1e-6).
- optimizer: AdamW lr 1e-6 [1e-6] constant [linear decay], no warmup, betas 0.9/0.95
  [0.9/0.999], weight decay 0, clip 1.0.
- TRL best only: the update micro-batch (`--micro-batch` rows) and no gradient checkpointing.

Differences that remain (printed again with the results)
- generation weights: ours samples with `PolicySampler`, a bf16 copy of the policy synced
  from the fp32 master weights before each rollout (≈ 0.04 s); TRL samples with its training
  model, whose forward accelerate patches with bf16 autocast, so every weight is re-cast to
  bf16 at every decoding step (the script checks the dtype of a decoder matmul during
  decoding on each side and prints it). The "our generation engine alone" section times the
  sampler, fp32 decoding and autocast decoding on the same batch.
- extra forwards: ours runs a reference forward even at β = 0 (the KL is logged); TRL skips
  it at β = 0.
- TRL computes entropy in the training forward; ours does not. TRL's default column
  checkpoints activations and updates all P × G rows in one pass; ours neither.
- micro-batches: ours sorts the rows by length before cutting them into micro-batches; TRL
  best shuffles the generation batch's rows (`shuffle_sequence_dict`) and cuts them in order.
- sampled lengths are random: the report gives each side's generated tokens per step and
  seconds per 1k generated tokens; `--fixed-length` forces every response to exactly
  `--max-new-tokens` tokens on all sides (min_new_tokens) so all do identical token work.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from common import StepTimes, load_average, stopwatch  # bench/common.py, beside this script
from trl_side import (  # bench/trl_side.py
    Interleaver,
    build_trl_sides,
    liger_note,
    parse_trl_sides,
    print_speed,
    start,
    trl_names,
    trl_settings,
    trl_side_arguments,
)

from rlhfkit.data.schemas import as_conversation, prompt_text
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.models.loading import load_model
from rlhfkit.recipes.online import prompts_for_step, step_seed
from rlhfkit.recipes.policy_gradient import (
    GRPOConfig,
    PolicyGradientRun,
    setup_run,
    train_step,
)
from rlhfkit.rollout.generate import PolicySampler, generate
from rlhfkit.rollout.reward_spec import GoldReward
from rlhfkit.rollout.rewards import Sample
from rlhfkit.tasks.generate import Task, make_tasks

OURS, TRL = "ours (rlhfkit GRPO)", "TRL GRPOTrainer"


# ------------------------------------------------------------------------------ prompts and reward

def bench_tasks(n: int, families: tuple[str, ...]) -> list[Task]:
    """The first `n` demo train tasks of `families`, in the order our recipe lists them."""
    return make_tasks("train", math.ceil(n / len(families)), seed=0, families=families)[:n]


def trl_gold_reward(tasks: list[Task]) -> Callable:
    """TRL reward function: our `GoldReward` (the demo task's checker) on each completion.

    Our samples carry the stripped decoded response and the prompt's meta (the Task); the
    same is built here from TRL's conversational completions and the dataset's task_id column.
    """
    by_id = {t.id: t for t in tasks}
    gold = GoldReward()

    def gold_reward(prompts, completions, task_id, **_):
        samples = []
        for prompt, completion, tid in zip(prompts, completions, task_id, strict=True):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            conv = as_conversation(prompt)
            samples.append(Sample(prompt_text(conv), text.strip(),
                                  {"task": by_id[tid], "task_id": tid, "answer": by_id[tid].answer,
                                   "conversation": conv}))
        return gold.score(samples)

    return gold_reward


# ------------------------------------------------------------------------------ our side

class OurSide:
    """One rlhfkit GRPO run, a step at a time: `train_step` then `engine.end_step`, as
    `run_policy_gradient` does. Records each step's generation time and sampled tokens."""

    def __init__(self, run: PolicyGradientRun):
        self.run = run
        self.steps_done = 0
        self.gen_seconds: list[float] = []
        self.gen_tokens: list[int] = []
        self.metrics: list[dict[str, float]] = []

    def step(self) -> dict[str, float]:
        metrics, tokens = train_step(self.run, self.steps_done)
        self.run.engine.end_step(self.steps_done + 1, metrics, tokens=tokens, extra_state=self.run.state())
        self.steps_done += 1
        self.metrics.append(metrics)
        return metrics


def build_ours(args, tmp: Path) -> OurSide:
    families = ("arithmetic", "units", "strings", "format")
    rows = args.prompts * args.group
    cfg = GRPOConfig(model=args.model, tasks="demo", demo_families=families,
                     demo_per_family=math.ceil(args.prompts / len(families)), reward="gold",
                     prompts_per_step=args.prompts, samples_per_prompt=args.group, max_new_tokens=args.max_new_tokens,
                     temperature=args.temperature, top_p=1.0, top_k=0, gen_batch_size=rows, batch_size=args.micro_batch,
                     kl_coef=args.beta, kl_estimator="k3", kl_placement="loss", clip_eps=0.2, inner_epochs=1,
                     minibatches=1, aggregation="token", scale_advantages=True, lr=args.lr, schedule="constant",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, precision=args.precision,
                     max_length=args.max_length, max_steps=args.total_steps, seed=0, progress=False,
                     resume=False, output_dir=str(tmp / "ours"))
    run = setup_run(cfg)
    run.prompts = run.prompts[:args.prompts]  # the same P prompts every step (prompts_per_step = P)
    if args.fixed_length:
        # `rollout.generate` passes no min_new_tokens; HF merges the model's generation_config.
        for model in (run.policy.model, run.sampler.model):
            model.generation_config.min_new_tokens = args.max_new_tokens
    return OurSide(run)


def time_our_generation(side: OurSide) -> None:
    """Wrap the sampler's `generate` that train_step calls, to time it and count its sampled tokens."""
    sampler = side.run.sampler
    inner = sampler.generate
    engine = side.run.engine

    def timed_generate(tokenizer, prompts, cfg, **kw):
        with stopwatch(engine.device) as t:
            out = inner(tokenizer, prompts, cfg, **kw)
        side.gen_seconds.append(t[0])
        side.gen_tokens.append(sum(len(g.response_ids) for g in out))
        return out

    sampler.generate = timed_generate


# ------------------------------------------------------------------------------ TRL side

def trl_best_batching(args) -> dict:
    """TRL best's update batching: micro-batches of `--micro-batch` rows as ours, gradients
    accumulated over the P × G rows of one generation batch (generated once per optimizer step)."""
    steps = args.prompts * args.group // args.micro_batch  # parse_args checks the division
    return dict(per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=steps,
                steps_per_generation=steps)


def build_trl(tasks: list[Task], tokenizer, *, args, run_dir: Path, callback, best: bool = False):
    from datasets import Dataset
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    settings = trl_settings(args, batch_size=args.prompts * args.group, run_dir=run_dir, best=best)
    del settings["max_length"]  # GRPOConfig has none: max_completion_length bounds the responses
    if best:
        settings.update(trl_best_batching(args))
    trl_args = TRLGRPOConfig(
        num_generations=args.group, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.beta, use_bias_correction_kl=False, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group",
        generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.fixed_length else None, **settings)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": t.prompt}], "task_id": t.id}
                                 for t in tasks])
    return GRPOTrainer(model=load_model(args.model), reward_funcs=trl_gold_reward(tasks), args=trl_args,
                       train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])


# TRL's profiling timers, per thread: each TRL trainer's loop runs in its own thread (the first
# in the main one, each `FollowerTRL` in a worker), so a timer belongs to the trainer of its thread.
_PROFILED: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))


def _record_profiling_timers() -> None:
    """Patch `trl.extras.profiling.ProfilingContext._log_metrics` (once) to add every timer's
    duration to `_PROFILED[this thread]` too; TRL's own logging call stays inside."""
    from trl.extras import profiling

    context = profiling.ProfilingContext
    if getattr(context, "_bench_recorded", False):
        return
    original_log = context._log_metrics

    def log_metrics(ctx, duration):
        _PROFILED[threading.get_ident()][ctx.name] += duration
        return original_log(ctx, duration)

    context._log_metrics = log_metrics
    context._bench_recorded = True


class TRLRecorder:
    """What one TRL trainer does per optimizer step, read from its own calls without changing them.

    - `trainer._generate` (tokenize prompts, `model.generate`, decode): wall time, prompt ids,
      completions and sampled tokens of each call;
    - `trainer.compute_loss`: the rows of each forward (+ backward) pass, i.e. each micro-batch;
    - its step callbacks: how many on_step_begin / on_substep_end / on_step_end fire per
      optimizer step (with gradient accumulation the Trainer fires on_step_begin and
      on_step_end once per optimizer step and on_substep_end after the other micro-batches);
    - TRL's profiling timers (`trl.extras.profiling.ProfilingContext`), which it reports only
      to wandb/mlflow/trackio: their durations, e.g. "transformers.generate";
    - `trainer._metrics["train"]`: its logged metrics (reward, step_time, ...), read by a
      TrainerCallback at each step's end, before the trainer logs and clears them.
    Each list has one entry per optimizer step (warmup first).
    """

    def __init__(self, trainer, device):
        from transformers import TrainerCallback

        self.trainer, self.device = trainer, device
        self.gen_seconds: list[float] = []
        self.gen_tokens: list[int] = []
        self.gen_calls: list[list[int]] = []  # per step: the completions of each _generate call
        self.passes: list[list[int]] = []  # per step: the rows of each compute_loss call
        # per on_step_end: on_step_begin and on_substep_end calls since the last one, optimizer steps it ended
        self.callbacks: list[tuple[int, int, int]] = []
        self.prompt_ids: list[list[int]] = []
        self.profiled: dict[str, list[float]] = defaultdict(list)  # per step: the sum of that step's calls
        self.rewards: list[float] = []
        self.step_time: list[float] = []
        self._seconds, self._tokens, self._calls, self._passes = 0.0, 0, [], []
        self._begins = self._substeps = self._global_step = 0
        inner_generate, inner_loss = trainer._generate, trainer.compute_loss

        def generate(prompts):
            with stopwatch(device) as t:
                out = inner_generate(prompts)
            self._seconds += t[0]
            self._tokens += sum(len(c) for c in out[1])
            self._calls.append(len(out[1]))
            self.prompt_ids = [list(p) for p in out[0]]
            return out

        def compute_loss(model, inputs, *a, **kw):
            self._passes.append(int(inputs["completion_ids"].shape[0]))
            return inner_loss(model, inputs, *a, **kw)

        trainer._generate, trainer.compute_loss = generate, compute_loss
        _record_profiling_timers()
        recorder = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                recorder._begins += 1

            def on_substep_end(self, args, state, control, **kw):
                recorder._substeps += 1

            def on_step_end(self, args, state, control, **kw):
                recorder.step_ended(state.global_step)

        trainer.add_callback(_Callback())

    def step_ended(self, global_step: int) -> None:
        """At on_step_end (in the trainer's thread), before the trainer logs (and clears) this step's metrics."""
        for name, seconds in _PROFILED.pop(threading.get_ident(), {}).items():
            self.profiled[name].append(seconds)
        self.gen_seconds.append(self._seconds)
        self.gen_tokens.append(self._tokens)
        self.gen_calls.append(self._calls)
        self.passes.append(self._passes)
        self.callbacks.append((self._begins, self._substeps, global_step - self._global_step))
        self._global_step = global_step
        self._seconds, self._tokens, self._calls, self._passes = 0.0, 0, [], []
        self._begins = self._substeps = 0
        metrics = self.trainer._metrics["train"]
        self.rewards.append(metrics["reward"][-1] if metrics.get("reward") else float("nan"))
        self.step_time.append(metrics["step_time"][-1] if metrics.get("step_time") else float("nan"))

    def timer(self, suffix: str) -> list[float]:
        """Durations of TRL's profiling timer whose name ends with `suffix` (names carry the class)."""
        return next((v for k, v in self.profiled.items() if k.endswith(suffix)), [])

    def batching_line(self, name: str, rows: int) -> str:
        """What the trainer did per optimizer step (generate calls, forward/backward passes,
        callbacks) against what its settings say, flagged when they differ."""
        t = self.trainer.args
        expected = ([rows], [t.per_device_train_batch_size] * t.gradient_accumulation_steps,
                    (1, t.gradient_accumulation_steps - 1, 1))
        seen = sorted({(tuple(c), tuple(p), cb) for c, p, cb in zip(self.gen_calls, self.passes, self.callbacks)})
        per_step = "; ".join(
            f"{len(c)} generate call(s) of {'+'.join(map(str, c)) or 0} completions, {len(p)} forward+backward "
            f"pass(es) of {'+'.join(map(str, p)) or 0} rows, on_step_begin/on_substep_end/on_step_end "
            f"{cb[0]}/{cb[1]}/1 per {cb[2]} optimizer step(s)" for c, p, cb in seen)
        ok = seen == [(tuple(expected[0]), tuple(expected[1]), expected[2])]
        return (f"TRL batching  {name}, each of its {len(self.passes)} optimizer step(s): {per_step} "
                f"({'as configured' if ok else 'WARNING: not as configured'}: P × G = {rows} completions generated "
                f"once, {t.gradient_accumulation_steps} pass(es) of {t.per_device_train_batch_size} rows)")


# ------------------------------------------------------------------------------ checks

class DecodeDtype:
    """Forward hook on one decoder matmul: the dtype its output has during decoding (a single
    new position), i.e. the precision the sampler actually computes in. Removes itself."""

    def __init__(self, model):
        from rlhfkit.train.engine import inner_hf_model

        layer = inner_hf_model(model).model.layers[0].mlp.down_proj
        self.dtype: torch.dtype | None = None
        self._handle = layer.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if output.dim() == 3 and output.shape[1] == 1 and not torch.is_grad_enabled():
            self.dtype = output.dtype
            self._handle.remove()


def our_generation_alone(side: OurSide, repeats: int) -> dict[str, list[tuple[int, float]]]:
    """Rollouts of the benchmark batch with our generation alone: (sampled tokens, seconds)
    per call, the variants alternating within each repeat:

    - what train_step runs: `PolicySampler.sync` (copy the policy's weights into the sampler's
      bf16 copy) + `PolicySampler.generate`;
    - `rollout.generate` on the fp32 training weights, outside autocast (fp32 sampling);
    - the same under the engine's autocast (what TRL's accelerate-patched forward does):
      every weight re-cast to bf16 at every decoding step.
    """
    run = side.run
    prompts = [p.prompt for p in prompts_for_step(run.prompts, run.cfg.prompts_per_step, seed=run.cfg.seed,
                                                  step=0)]
    variants = ["sampler: sync + generate (as train_step)"]
    if run.engine.precision == "bf16":
        variants += ["fp32 training weights, no autocast", "training weights under engine.autocast()"]
    out: dict[str, list[tuple[int, float]]] = {v: [] for v in variants}
    for r in range(repeats):
        sampling = run.cfg.sampling(step_seed(run.cfg.seed, 10_000 + r))
        for name in variants:
            with stopwatch(run.engine.device) as t:
                if name.startswith("sampler"):
                    run.sampler.sync()
                    gens = PolicySampler.generate(run.sampler, run.tokenizer, prompts, sampling)  # not the timed one
                else:
                    with run.engine.autocast() if "autocast" in name else contextlib.nullcontext():
                        gens = generate(run.policy.model, run.tokenizer, prompts, sampling)
            out[name].append((sum(len(g.response_ids) for g in gens), t[0]))
    return out


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded",
                   help="model of all sides: 'embedded' (SmolLM2-135M-Instruct), an HF id or a local folder "
                        "(e.g. random weights from bench/random_checkpoint.py)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (all sides)")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (group size / num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest response in tokens (all sides)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (all sides)")
    p.add_argument("--beta", type=float, default=0.05,
                   help="KL coefficient, k3 in the loss (ours kl_coef, TRL beta); 0 = TRL's default")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate, constant, all sides")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before timing")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast with fp32 master weights, or fp32 throughout")
    p.add_argument("--max-length", type=int, default=512, help="our max sequence length (prompt + response)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="rows per forward + backward pass of ours (length-sorted; `rlhf grpo`'s batch_size, "
                        "default 8) and of TRL best (per_device_train_batch_size, gradient accumulation over "
                        "P × G / micro-batch passes); the gradient is that of all rows either way")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every usable core)")
    p.add_argument("--fixed-length", action="store_true",
                   help="min_new_tokens = max_new_tokens on all sides: every response has the same length")
    trl_side_arguments(p)
    p.add_argument("--gen-repeats", type=int, default=2,
                   help="after the steps, time our generate alone on the same batch this many times (0 = skip)")
    args = p.parse_args(argv)
    if min(args.prompts, args.steps, args.max_new_tokens, args.micro_batch) < 1 or args.group < 2 or args.warmup < 0 \
            or args.gen_repeats < 0 or args.beta < 0:
        p.error("--prompts, --steps, --max-new-tokens, --micro-batch must be ≥ 1, --group ≥ 2, "
                "--warmup, --gen-repeats, --beta ≥ 0")
    parse_trl_sides(p, args)
    rows = args.prompts * args.group
    if "best" in args.trl_sides and rows % args.micro_batch:
        p.error(f"TRL best updates the P × G = {args.prompts} × {args.group} = {rows} rows of a step in micro-batches "
                f"of --micro-batch {args.micro_batch} (gradient_accumulation_steps = steps_per_generation = P × G / "
                "micro-batch), so P × G must be divisible by --micro-batch; change --micro-batch, --prompts or "
                "--group, or run --trl-sides default")
    args.total_steps = args.warmup + args.steps
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = start(args, "rlhfkit GRPO step vs TRL GRPOTrainer")
    with tempfile.TemporaryDirectory(prefix="bench_grpo_") as folder:
        run(args, threads, Path(folder))
    return 0


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(args, threads: int, tmp: Path) -> None:
    ours = build_ours(args, tmp)
    time_our_generation(ours)
    device = ours.run.engine.device
    tokenizer = ours.run.tokenizer
    tasks = bench_tasks(args.prompts, ours.run.cfg.demo_families)
    if [t.id for t in tasks] != [p.id for p in ours.run.prompts]:
        raise SystemExit("our run's prompts are not the benchmark's demo tasks")

    names = trl_names(TRL, args)
    times = {name: StepTimes(name, 0, args.warmup) for name in (OURS, *names.values())}
    inter = Interleaver({OURS: ours}, times, trl_name=next(iter(names.values())), device=device, profile_step=None,
                        profile_rows=0)
    trainers = build_trl_sides(inter, names, lambda best, callback: build_trl(
        tasks, tokenizer, args=args, run_dir=tmp / f"trl{'_best' * best}", callback=callback, best=best))
    trls = list(trainers)
    recorders = {name: TRLRecorder(t, device) for name, t in trainers.items()}
    from transformers import PrinterCallback

    for t in trainers.values():
        t.remove_callback(PrinterCallback)  # TRL's logs are read from the trainer, not printed
    dtypes = {OURS: DecodeDtype(ours.run.sampler.model), **{n: DecodeDtype(t.model) for n, t in trainers.items()}}

    rows = args.prompts * args.group
    cfg = ours.run.cfg
    print(f"batch         {args.prompts} prompts × {args.group} samples = {rows} responses per step, ≤ "
          f"{args.max_new_tokens} new tokens{' (fixed length)' if args.fixed_length else ''}, temperature "
          f"{args.temperature}; precision {args.precision}; β {args.beta}; lr {args.lr}; threads {threads}")
    for name, trainer in trainers.items():
        t = trainer.args
        print(f"TRL settings  {name}: loss_type {t.loss_type}, scale_rewards {t.scale_rewards}, beta {t.beta} "
              f"(reference model {'loaded' if trainer.ref_model is not None else 'none'}), use_bias_correction_kl "
              f"{t.use_bias_correction_kl}, epsilon {t.epsilon}, num_iterations {t.num_iterations}, "
              f"generation_batch_size {t.generation_batch_size}, steps_per_generation {t.steps_per_generation}, "
              f"per_device_train_batch_size {t.per_device_train_batch_size}, gradient_accumulation_steps "
              f"{t.gradient_accumulation_steps}, gradient_checkpointing {t.gradient_checkpointing}, optim "
              f"{t.optim.value}, lr_scheduler {t.lr_scheduler_type.value}, logging_steps {t.logging_steps}"
              + (f"; {liger_note()}" if name.endswith("(best)") else ""))
    print(f"ours          algorithm {cfg.algorithm}, aggregation {cfg.aggregation}, kl_coef {cfg.kl_coef} "
          f"({cfg.resolved_kl_estimator} in the {cfg.resolved_kl_placement}), clip_eps {cfg.clip_eps}, inner_epochs "
          f"{cfg.inner_epochs}, minibatches {cfg.minibatches}, batch_size {cfg.batch_size}, gen_batch_size "
          f"{cfg.gen_batch_size}, logprob_chunk {cfg.logprob_chunk}, no gradient checkpointing, AdamW fused")
    print("load average  before the steps: " + load_average())

    inter.train(trainers[inter.trl_name])
    if torch.get_num_threads() != threads:
        print(f"WARNING       torch threads changed to {torch.get_num_threads()} during the run (set {threads})")
    for name, recorder in recorders.items():
        print(recorder.batching_line(name, rows))

    # ---- same prompts
    ours_prompts = sorted(tuple(encode_prompt(tokenizer, p.prompt)) for p in ours.run.prompts)
    print("\n## Same prompts")
    for name, recorder in recorders.items():
        trl_prompts = sorted({tuple(p) for p in recorder.prompt_ids})
        print(f"identical     prompt token ids (chat template applied by each side), ours and {name}: "
              f"{'yes' if ours_prompts == trl_prompts else 'NO'} ({len(ours_prompts)} prompts, "
              f"{sum(map(len, ours_prompts))} prompt tokens per group member)")
    print("decode dtype  (a decoder matmul's output while sampling) "
          + ", ".join(f"{name} {d.dtype}" for name, d in dtypes.items()))

    # ---- generated tokens
    warm = args.warmup
    gen_tokens = {OURS: ours.gen_tokens, **{n: r.gen_tokens for n, r in recorders.items()}}
    gen_seconds = {OURS: ours.gen_seconds, **{n: r.gen_seconds for n, r in recorders.items()}}
    width = max(len(name) for name in gen_tokens)
    print("\n## Generated tokens per step (timed steps)")
    for name, every in gen_tokens.items():
        tok = every[warm:]
        print(f"{name:{width}} mean {statistics.mean(tok):7.1f}  [{min(tok)} – {max(tok)}]  of at most "
              f"{rows * args.max_new_tokens}; every step: {' '.join(map(str, every))}")
    print(f"{'mean gold reward':{width}} ours {statistics.mean(m['reward/mean'] for m in ours.metrics):.3f}, "
          + ", ".join(f"{n} {statistics.mean(r.rewards):.3f}" for n, r in recorders.items()) + " (all steps)")

    # ---- speed
    for name, every in gen_tokens.items():
        times[name].tokens_per_step = round(statistics.mean(every[warm:]))
    print_speed(times, inter, ours=OURS, others=[], flops=None, device=device, warmup=warm,
                heading="Speed and memory (full RL steps: rollout + update; tokens = sampled response tokens)")
    per_k = {name: _med([s / n * 1000 for s, n in zip(times[name].timed, every[warm:], strict=True)])
             for name, every in gen_tokens.items()}
    print("s per 1k generated tokens (median of per-step ratios): ours " + f"{per_k[OURS]:.3f}, " + ", ".join(
        f"{n} {per_k[n]:.3f} ({per_k[n] / per_k[OURS]:.2f}× ours)" for n in trls))
    for name, recorder in recorders.items():
        print(f"{name} step, its own step_time metric (training_step of every micro-batch: generation to "
              f"backward, no optimizer): median {_med(recorder.step_time[warm:]):.2f} s")
    print(f"ours, train_step's own timers: time/rollout_s (generate, reward, old and reference log-probs) "
          f"{_med([m['time/rollout_s'] for m in ours.metrics[warm:]]):.2f} s, time/update_s (forward, backward, "
          f"optimizer) {_med([m['time/update_s'] for m in ours.metrics[warm:]]):.2f} s")

    print("\n## Generation inside the steps (timed steps; medians)")
    for name, every in gen_seconds.items():
        gen, tok = every[warm:], gen_tokens[name][warm:]
        call = "rollout.generate " if name == OURS else "trainer._generate"
        print(f"{name:{width}} {call}  {_med(gen):7.2f} s/step  "
              f"{_med([n / s for n, s in zip(tok, gen, strict=True)]):7.1f} tokens/s  "
              f"({_med(gen) / times[name].median_s:.0%} of the step)")
    for name, recorder in recorders.items():
        prof = recorder.timer("transformers.generate")[warm:]
        if prof:
            tok = gen_tokens[name][warm:]
            print(f"{name:{width}} its profiling timer 'transformers.generate' (model.generate only): "
                  f"{_med(prof):.2f} s/step, {_med([n / s for n, s in zip(tok, prof, strict=True)]):.1f} tokens/s")
    print("non-generation part of the step: " + ", ".join(
        f"{name} {_med([a - b for a, b in zip(times[name].timed, every[warm:])]):.2f} s"
        for name, every in gen_seconds.items()))
    for name, recorder in recorders.items():
        other = {k.split(".", 1)[-1]: _med(v[warm:]) for k, v in recorder.profiled.items()
                 if not k.endswith("transformers.generate") and v[warm:]}
        if other:
            print(f"{name} profiling timers (median s/step, a step's calls summed): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(other.items())))

    # ---- our generation engine alone
    if args.gen_repeats:
        print(f"\n## Our generation engine alone (rollout of the same {rows}-response batch, "
              f"{args.gen_repeats} call(s) each, alternating)")
        for name, calls in our_generation_alone(ours, args.gen_repeats).items():
            rates = [n / s for n, s in calls]
            print(f"{name:42} {statistics.mean(n for n, _ in calls):7.1f} sampled tokens/call  "
                  f"{_med([s for _, s in calls]):7.2f} s  {_med(rates):7.1f} tokens/s (median)")

    print("\n## What differs per step (beyond the settings made equal)")
    print("- old log-probs: all sides take them from the training forward (detached) when on-policy; ours "
          "computes entropy there without a gradient, TRL with one")
    for name, trainer in trainers.items():
        t = trainer.args
        passes = t.gradient_accumulation_steps
        print(f"- {name}: reference forward {'too (β ≠ 0)' if trainer.ref_model is not None else 'none (β = 0)'}, "
              f"ours always; gradient checkpointing {t.gradient_checkpointing} (ours off); update in {passes} "
              f"pass(es) of {t.per_device_train_batch_size} rows"
              + (" (rows shuffled, then cut in order)" if passes > 1 else "")
              + f", ours in {math.ceil(rows / cfg.batch_size)} of ≤ {cfg.batch_size} (rows sorted by length); "
              f"sampling precision {dtypes[name].dtype} (training weights under autocast), ours "
              f"{dtypes[OURS].dtype} (a synced bf16 copy)")
    print("- generation batching: ours sorts the rows by prompt length (one batch here); TRL keeps its order")


if __name__ == "__main__":
    sys.exit(main())
