"""rlhfkit's GRPO step against TRL's `GRPOTrainer`: same model, prompts, group size, sampling,
loss settings and precision, in one process, steps interleaved; prints seconds per step of
each side, generated tokens per step, seconds per 1k generated tokens, generation speed
and the ratio.

    python bench/grpo_vs_trl.py                 # 8 prompts × 4 samples, ≤ 64 new tokens, bf16, 1 + 5 steps
    python bench/grpo_vs_trl.py --beta 0        # TRL's default β: no TRL reference model (ours still runs one)
    python bench/grpo_vs_trl.py --fixed-length  # every response exactly --max-new-tokens long, both sides
    OMP_NUM_THREADS=1 python bench/grpo_vs_trl.py --prompts 2 --group 4 --max-new-tokens 32 \\
        --warmup 0 --steps 1 --gen-repeats 1 --threads 1   # smoke test, ≈ 1–2 minutes

What each side runs per step (one rollout, then one optimizer step on it)
- ours: exactly what `rlhf grpo` runs per step: `recipes.policy_gradient.train_step` on the
  run `setup_run` builds from a `GRPOConfig` (demo tasks, gold reward), then
  `engine.end_step` (metrics logging). train_step: `PolicySampler` (sync, then HF `model.generate`
  with KV cache, prompts sorted by length and left-padded, `gen_batch_size` = all rows, so
  one batch; each distinct prompt prefilled once and its KV cache shared by its G rows; tokens
  drawn by inverse CDF, `InverseCDFSampler`, instead of `torch.multinomial`) → the
  gold reward (`GoldReward`: the demo task's checker) → `with_logprobs`: no-grad forwards of
  the frozen reference (reference log-probs; run even when β = 0; on policy, no separate
  policy forward: log π_old comes detached from the update's own forward) → group-normalized
  advantages → forward + backward of `grpo_loss` (clipped surrogate + β·k3 in the loss, "token"
  aggregation) in length-sorted micro-batches of `--micro-batch` rows (`rlhf grpo`'s default 8;
  gradients accumulated, so the step's gradient is that of all rows) → clip 1.0 → AdamW (fused).
- TRL: `GRPOTrainer.train()`; per step `_generate_and_score_completions`: HF
  `model.generate` of all rows in one batch (prompts repeated, left-padded, unsorted) → the
  reward function → a no-grad reference forward only when β ≠ 0 (TRL skips the old-log-prob
  forward when on-policy: num_iterations = 1 and steps_per_generation = gradient
  accumulation steps, and uses the detached current log-probs instead) → one forward
  (fused chunked LM head: log-probs and entropy) + backward with gradient checkpointing
  (TRL's default; `--trl-gradient-checkpointing off` turns it off) → clip 1.0 → AdamW
  (`adamw_torch_fused`). A TrainerCallback times each TRL step and runs our steps between
  two of TRL's (`Interleaver` in bench/trl_side.py, shared with the other benchmarks).

Settings made equal (TRL 1.16 defaults in brackets where we set them)
- model: the embedded SmolLM2-135M-Instruct, fresh fp32 weights each side; bf16 autocast
  with fp32 master weights on both (`--precision fp32`: fp32 throughout); same torch threads.
- prompts: the first `--prompts` demo train tasks of the four checkable families
  (`make_tasks("train", …)`), the same P prompts every step on both sides (ours: the run's
  prompt list cut to P with prompts_per_step = P; TRL: a dataset of those P prompts with
  per_device_train_batch_size = P × G); the prompt token ids are checked to be identical.
- group size G (num_generations [8]), max new tokens (max_completion_length [512]),
  temperature 1.0, top_p 1, top_k off.
- reward: ours `--reward gold`; TRL a Python reward function that calls the same
  `GoldReward` (the demo task's checker) on the stripped completion text.
- loss: β = `--beta` (default 0.05, our default; TRL's default is 0.0) with the k3 estimator
  in the loss on both sides; TRL's `use_bias_correction_kl` [True] is set False (ours has
  no importance weight on the KL term); clip ε 0.2 (epsilon); one update per rollout
  (num_iterations 1 / inner_epochs 1, minibatches 1); loss averaged over all response
  tokens of the step (loss_type "dapo", TRL's default = our aggregation "token");
  advantages (r − mean_g) / std_g (scale_rewards "group", TRL's default; ε 1e-4 vs ours 1e-6).
- optimizer: AdamW lr 1e-6 [1e-6] constant [linear decay], no warmup, betas 0.9/0.95
  [0.9/0.999], weight decay 0, clip 1.0.

Differences that remain (printed again with the results)
- generation weights: ours samples with `PolicySampler`, a bf16 copy of the policy synced
  from the fp32 master weights before each rollout (≈ 0.04 s); TRL samples with its training
  model, whose forward accelerate patches with bf16 autocast, so every weight is re-cast to
  bf16 at every decoding step (the script checks the dtype of a decoder matmul during
  decoding on each side and prints it). The "our generation engine alone" section times the
  sampler, fp32 decoding and autocast decoding on the same batch.
- extra forwards: ours runs a reference forward even at β = 0 (the KL is logged); TRL skips
  it at β = 0.
- TRL computes entropy in the training forward and checkpoints activations; ours does neither.
- sampled lengths are random: the report gives each side's generated tokens per step and
  seconds per 1k generated tokens; `--fixed-length` forces every response to exactly
  `--max-new-tokens` tokens on both sides (min_new_tokens) so both do identical token work.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import statistics
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from common import (  # bench/common.py, beside this script
    StepTimes,
    format_machine,
    format_table,
    load_average,
    machine_info,
    ratio_lines,
    stopwatch,
)
from trl_side import Interleaver  # bench/trl_side.py

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

def build_trl(tasks: list[Task], tokenizer, *, args, run_dir: Path, callback):
    from datasets import Dataset
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer

    trl_args = TRLGRPOConfig(
        output_dir=str(run_dir), bf16=args.precision == "bf16", use_cpu=not torch.cuda.is_available(),
        per_device_train_batch_size=args.prompts * args.group, gradient_accumulation_steps=1,
        num_generations=args.group, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.beta, use_bias_correction_kl=False, epsilon=0.2, num_iterations=1,
        loss_type="dapo", scale_rewards="group",
        learning_rate=args.lr, adam_beta2=0.95, weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, max_steps=args.total_steps, report_to=[], save_strategy="no", disable_tqdm=True,
        seed=0, generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.fixed_length else None,
        **({} if args.trl_gradient_checkpointing is None
           else {"gradient_checkpointing": args.trl_gradient_checkpointing}))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": t.prompt}], "task_id": t.id}
                                 for t in tasks])
    return GRPOTrainer(model=load_model(args.model), reward_funcs=trl_gold_reward(tasks), args=trl_args,
                       train_dataset=dataset, processing_class=tokenizer, callbacks=[callback])


class TRLRecorder:
    """What TRL does per step, read from its own calls without changing them.

    - `trainer._generate` (tokenize prompts, `model.generate`, decode): wall time, prompt ids,
      sampled tokens per call;
    - TRL's profiling timers (`trl.extras.profiling.ProfilingContext`), which it reports only
      to wandb/mlflow/trackio: their durations, e.g. "transformers.generate";
    - `trainer._metrics["train"]`: its logged metrics (reward, step_time, ...), read by a
      TrainerCallback at each step's end, before the trainer logs and clears them.
    """

    def __init__(self, trainer, device):
        from transformers import TrainerCallback
        from trl.extras import profiling

        self.trainer, self.device = trainer, device
        self.gen_seconds: list[float] = []
        self.gen_tokens: list[int] = []
        self.prompt_ids: list[list[int]] = []
        self.profiled: dict[str, list[float]] = defaultdict(list)  # per step: the sum of that step's calls
        self._pending: dict[str, float] = defaultdict(float)
        self.rewards: list[float] = []
        self.step_time: list[float] = []
        inner_generate = trainer._generate

        def generate(prompts):
            with stopwatch(device) as t:
                out = inner_generate(prompts)
            self.gen_seconds.append(t[0])
            self.gen_tokens.append(sum(len(c) for c in out[1]))
            self.prompt_ids = [list(p) for p in out[0]]
            return out

        trainer._generate = generate
        original_log = profiling.ProfilingContext._log_metrics
        recorder = self

        def log_metrics(ctx, duration):
            recorder._pending[ctx.name] += duration
            return original_log(ctx, duration)

        profiling.ProfilingContext._log_metrics = log_metrics

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                recorder.step_ended()

        trainer.add_callback(_Callback())

    def step_ended(self) -> None:
        """At on_step_end, before the trainer logs (and clears) this step's metrics."""
        for name, seconds in self._pending.items():
            self.profiled[name].append(seconds)
        self._pending.clear()
        metrics = self.trainer._metrics["train"]
        self.rewards.append(metrics["reward"][-1] if metrics.get("reward") else float("nan"))
        self.step_time.append(metrics["step_time"][-1] if metrics.get("step_time") else float("nan"))

    def timer(self, suffix: str) -> list[float]:
        """Durations of TRL's profiling timer whose name ends with `suffix` (names carry the class)."""
        return next((v for k, v in self.profiled.items() if k.endswith(suffix)), [])


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
                   help="model of both sides: 'embedded' (SmolLM2-135M-Instruct), an HF id or a local folder "
                        "(e.g. random weights from bench/random_checkpoint.py)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step (both sides)")
    p.add_argument("--group", type=int, default=4, help="samples per prompt (group size / num_generations)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest response in tokens (both sides)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (both sides)")
    p.add_argument("--beta", type=float, default=0.05,
                   help="KL coefficient, k3 in the loss (ours kl_coef, TRL beta); 0 = TRL's default")
    p.add_argument("--lr", type=float, default=1e-6, help="AdamW learning rate, constant, both sides")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (after warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side before timing")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16 autocast with fp32 master weights, or fp32 throughout")
    p.add_argument("--max-length", type=int, default=512, help="our max sequence length (prompt + response)")
    p.add_argument("--micro-batch", type=int, default=8,
                   help="ours: rows per forward, length-sorted (`rlhf grpo`'s batch_size, default 8); the "
                        "gradient is that of all rows either way")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every usable core)")
    p.add_argument("--fixed-length", action="store_true",
                   help="min_new_tokens = max_new_tokens on both sides: every response has the same length")
    p.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default",
                   help="TRL's gradient checkpointing (its default is on); ours never checkpoints")
    p.add_argument("--gen-repeats", type=int, default=2,
                   help="after the steps, time our generate alone on the same batch this many times (0 = skip)")
    args = p.parse_args(argv)
    if min(args.prompts, args.steps, args.max_new_tokens, args.micro_batch) < 1 or args.group < 2 or args.warmup < 0 \
            or args.gen_repeats < 0 or args.beta < 0:
        p.error("--prompts, --steps, --max-new-tokens, --micro-batch must be ≥ 1, --group ≥ 2, "
                "--warmup, --gen-repeats, --beta ≥ 0")
    args.trl_gradient_checkpointing = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]
    args.total_steps = args.warmup + args.steps
    return args


def quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from datasets.utils.logging import disable_progress_bar
    from transformers.utils import logging as hf_logging

    disable_progress_bar()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(threads)
    quiet_logging()

    print("# rlhfkit GRPO step vs TRL GRPOTrainer\n")
    print(format_machine(machine_info()))
    print(f"command       python {' '.join(sys.argv)}\n")
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

    times = {name: StepTimes(name, 0, args.warmup) for name in (OURS, TRL)}
    inter = Interleaver({OURS: ours}, times, trl_name=TRL, device=device, profile_step=None, profile_rows=0)
    trainer = build_trl(tasks, tokenizer, args=args, run_dir=tmp / "trl", callback=inter.callback)
    recorder = TRLRecorder(trainer, device)
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # TRL's logs are read from the trainer, not printed
    dtypes = {OURS: DecodeDtype(ours.run.sampler.model), TRL: DecodeDtype(trainer.model)}

    rows = args.prompts * args.group
    cfg = ours.run.cfg
    print(f"batch         {args.prompts} prompts × {args.group} samples = {rows} responses per step, ≤ "
          f"{args.max_new_tokens} new tokens{' (fixed length)' if args.fixed_length else ''}, temperature "
          f"{args.temperature}; precision {args.precision}; β {args.beta}; lr {args.lr}; threads {threads}")
    t = trainer.args
    print(f"TRL settings  loss_type {t.loss_type}, scale_rewards {t.scale_rewards}, beta {t.beta} (reference model "
          f"{'loaded' if trainer.ref_model is not None else 'none'}), use_bias_correction_kl "
          f"{t.use_bias_correction_kl}, epsilon {t.epsilon}, num_iterations {t.num_iterations}, steps_per_generation "
          f"{t.steps_per_generation}, per_device_train_batch_size {t.per_device_train_batch_size}, "
          f"gradient_checkpointing {t.gradient_checkpointing}, optim {t.optim.value}, "
          f"lr_scheduler {t.lr_scheduler_type.value}, logging_steps {t.logging_steps}")
    print(f"ours          algorithm {cfg.algorithm}, aggregation {cfg.aggregation}, kl_coef {cfg.kl_coef} "
          f"({cfg.resolved_kl_estimator} in the {cfg.resolved_kl_placement}), clip_eps {cfg.clip_eps}, inner_epochs "
          f"{cfg.inner_epochs}, minibatches {cfg.minibatches}, batch_size {cfg.batch_size}, gen_batch_size "
          f"{cfg.gen_batch_size}, logprob_chunk {cfg.logprob_chunk}, no gradient checkpointing, AdamW fused")
    print("load average  before the steps: " + load_average())

    trainer.train()
    if torch.get_num_threads() != threads:
        print(f"WARNING       torch threads changed to {torch.get_num_threads()} during the run (set {threads})")

    # ---- same prompts
    ours_prompts = sorted(tuple(encode_prompt(tokenizer, p.prompt)) for p in ours.run.prompts)
    trl_prompts = sorted({tuple(p) for p in recorder.prompt_ids})
    print("\n## Same prompts")
    print(f"identical     prompt token ids (chat template applied by each side): "
          f"{'yes' if ours_prompts == trl_prompts else 'NO'} ({len(ours_prompts)} prompts, "
          f"{sum(map(len, ours_prompts))} prompt tokens per group member)")
    print(f"decode dtype  (a decoder matmul's output while sampling) ours {dtypes[OURS].dtype}, "
          f"TRL {dtypes[TRL].dtype}")

    # ---- generated tokens
    warm = args.warmup
    ours_tok, trl_tok = ours.gen_tokens[warm:], recorder.gen_tokens[warm:]
    print("\n## Generated tokens per step (timed steps)")
    for name, tok in ((OURS, ours_tok), (TRL, trl_tok)):
        print(f"{name:20} mean {statistics.mean(tok):7.1f}  [{min(tok)} – {max(tok)}]  of at most "
              f"{rows * args.max_new_tokens}; every step: "
              f"{' '.join(map(str, ours.gen_tokens if name == OURS else recorder.gen_tokens))}")
    print(f"{'mean gold reward':20} ours {statistics.mean(m['reward/mean'] for m in ours.metrics):.3f}, TRL "
          f"{statistics.mean(recorder.rewards):.3f} (all steps)")

    # ---- speed
    times[OURS].tokens_per_step = round(statistics.mean(ours_tok))
    times[TRL].tokens_per_step = round(statistics.mean(trl_tok))
    print("\n## Speed (full RL steps: rollout + update; tokens = sampled response tokens)")
    print(format_table([times[OURS], times[TRL]], baseline=TRL))
    for row in (times[OURS], times[TRL]):
        print(f"{row.name:20} every step (s), warmup first: " + " ".join(f"{x:.2f}" for x in row.seconds))
    per_k = {OURS: [s / n * 1000 for s, n in zip(times[OURS].timed, ours_tok, strict=True)],
             TRL: [s / n * 1000 for s, n in zip(times[TRL].timed, trl_tok, strict=True)]}
    print(f"s per 1k generated tokens (median of per-step ratios): ours {_med(per_k[OURS]):.3f}, "
          f"TRL {_med(per_k[TRL]):.3f}, TRL / ours {_med(per_k[TRL]) / _med(per_k[OURS]):.2f}×")
    print(f"s per step (medians): TRL / ours {times[TRL].median_s / times[OURS].median_s:.2f}×")
    print(f"TRL step, on_step_begin → on_step_end only: median {_med(inter.trl_compute[warm:]):.2f} s; its own "
          "step_time metric (training_step: generation to backward, no optimizer): "
          f"{_med(recorder.step_time[warm:]):.2f} s")
    print(f"ours, train_step's own timers: time/rollout_s (generate, reward, old and reference log-probs) "
          f"{_med([m['time/rollout_s'] for m in ours.metrics[warm:]]):.2f} s, time/update_s (forward, backward, "
          f"optimizer) {_med([m['time/update_s'] for m in ours.metrics[warm:]]):.2f} s")

    gen_o, gen_t = ours.gen_seconds[warm:], recorder.gen_seconds[warm:]
    prof = recorder.timer("transformers.generate")[warm:]
    print("\n## Generation inside the steps (timed steps; medians)")
    print(f"{OURS:20} rollout.generate      {_med(gen_o):7.2f} s/step  "
          f"{_med([n / s for n, s in zip(ours_tok, gen_o, strict=True)]):7.1f} tokens/s  "
          f"({_med(gen_o) / times[OURS].median_s:.0%} of the step)")
    print(f"{TRL:20} trainer._generate     {_med(gen_t):7.2f} s/step  "
          f"{_med([n / s for n, s in zip(trl_tok, gen_t, strict=True)]):7.1f} tokens/s  "
          f"({_med(gen_t) / times[TRL].median_s:.0%} of the step)")
    if prof:
        print(f"{TRL:20} its profiling timer 'transformers.generate' (model.generate only): {_med(prof):.2f} s/step, "
              f"{_med([n / s for n, s in zip(trl_tok, prof, strict=True)]):.1f} tokens/s")
    print(f"non-generation part of the step: ours {_med([a - b for a, b in zip(times[OURS].timed, gen_o)]):.2f} s, "
          f"TRL {_med([a - b for a, b in zip(times[TRL].timed, gen_t)]):.2f} s")
    other = {k.split(".", 1)[-1]: _med(v[warm:]) for k, v in recorder.profiled.items()
             if not k.endswith("transformers.generate") and v[warm:]}
    if other:
        print("TRL's profiling timers (median s/step, a step's calls summed): "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(other.items())))

    print()
    print(ratio_lines(times[OURS], times[TRL], target=2))
    print("load average  after each round: " + ", ".join(inter.loads))

    # ---- our generation engine alone
    if args.gen_repeats:
        print(f"\n## Our generation engine alone (rollout of the same {rows}-response batch, "
              f"{args.gen_repeats} call(s) each, alternating)")
        for name, calls in our_generation_alone(ours, args.gen_repeats).items():
            rates = [n / s for n, s in calls]
            print(f"{name:42} {statistics.mean(n for n, _ in calls):7.1f} sampled tokens/call  "
                  f"{_med([s for _, s in calls]):7.2f} s  {_med(rates):7.1f} tokens/s (median)")

    print("\n## What differs per step (beyond the settings made equal)")
    print("- old log-probs: both sides take them from the training forward (detached) when on-policy; ours "
          "computes entropy there without a gradient, TRL with one")
    print(f"- reference forward: ours always; TRL {'too (β ≠ 0)' if trainer.ref_model is not None else 'none (β = 0)'}")
    print(f"- TRL gradient checkpointing {t.gradient_checkpointing} (ours off); TRL computes entropy in the "
          f"training forward")
    print(f"- sampling precision: ours {dtypes[OURS].dtype} (a synced bf16 copy), "
          f"TRL {dtypes[TRL].dtype} (training weights under autocast)")
    print("- generation batching: ours sorts the rows by prompt length (one batch here); TRL keeps its order")


if __name__ == "__main__":
    sys.exit(main())
