"""The training engine every recipe calls: accelerate, precision, optimizer, schedule,
checkpoints, exact resume, Ctrl-C, metrics and progress.

Recipes compose it rather than inherit from it:

    engine = Engine(cfg, run_dir, total_steps=cfg.max_steps)
    module = engine.setup(module, tokenizer)         # optimizer, schedule, DDP/FSDP, resume
    for step in range(engine.start_step, cfg.max_steps):
        for micro in micro_batches:
            with engine.accumulate(last=...), engine.autocast():
                loss = ...
            engine.backward(loss)
        engine.optimizer_step()
        engine.end_step(step + 1, metrics, tokens=n)   # log, progress, periodic checkpoint

The run folder holds one run: `train.identity` refuses a rerun with another recipe, other
settings or other data, and a rerun of a finished run trains nothing. Resume falls back from an
unreadable checkpoint to the previous one; Ctrl-C saves and raises `TrainingInterrupted`.

Distributed runs go through accelerate (`accelerate launch --num_processes N -m rlhfkit.cli ...`,
or a config of configs/accelerate/ for FSDP2 or DeepSpeed; docs/SCALING.md): DDP by
`accelerator.prepare`, FSDP2 by torch's `fully_shard` under the accelerate config's settings
(`train.distributed` says why), DeepSpeed ZeRO-2/3 by `accelerator.prepare` with the run's
settings filled into its config (`train.deepspeed`); nothing here is home-made parallelism.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from torch import nn

from rlhfkit.config import Config, ConfigError, check, param
from rlhfkit.models.device import resolve_precision
from rlhfkit.train import checkpoint as ckpt
from rlhfkit.train import deepspeed as zero
from rlhfkit.train import distributed, identity
from rlhfkit.train.metrics import TRACKERS, MetricsLogger, StepProgress, read_metrics
from rlhfkit.train.modules import inner_hf_model as inner_hf_model
from rlhfkit.train.modules import resolve_attention as resolve_attention
from rlhfkit.train.modules import set_training_attention as set_training_attention

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTIONS = ("auto", "fp32-matmul", "packed-sdpa", "model", "eager", "sdpa", "flash_attention_2")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class TrainConfig(Config):
    """Fields every trainable recipe shares."""

    model: str = param("embedded", "model to start from: 'embedded', a Hugging Face id, a local folder, or 'tiny'")
    output_dir: str = param("runs/run", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")
    seed: int = param(0, "random seed (data order, dropout, sampling)")
    max_steps: int = param(100, "optimizer steps to run")
    batch_size: int = param(8, "examples per micro-batch on each process")
    grad_accum: int = param(1, "micro-batches per optimizer step")
    lr: float = param(1e-5, "peak learning rate (AdamW)")
    weight_decay: float = param(0.0, "AdamW weight decay")
    warmup_steps: int = param(0, "linear warmup steps")
    schedule: str = param("cosine", "learning-rate schedule after warmup", choices=SCHEDULES)
    min_lr_ratio: float = param(0.1, "final lr as a fraction of the peak (cosine/linear)")
    max_grad_norm: float = param(1.0, "gradient clipping norm (0 disables)")
    precision: str = param("auto", "auto (bf16 where the hardware has it), bf16, fp16 or fp32", choices=PRECISIONS)
    max_length: int = param(512, "longest example in tokens; longer ones are skipped and counted")
    lora_r: int = param(0, "LoRA rank (0 = full fine-tuning)")
    lora_alpha: int = param(32, "LoRA alpha")
    save_every: int = param(0, "checkpoint every N steps (0 = only on Ctrl-C; the final model is always saved)")
    keep_checkpoints: int = param(2, "how many recent checkpoints to keep")
    log_every: int = param(1, "log metrics every N steps")
    eval_every: int = param(0, "evaluate every N steps (0 = only at the end)")
    resume: bool = param(True, "resume the run folder's run from its latest checkpoint (--no-resume: move its "
                               "earlier run into replaced-<time>/ and start over)")
    tracker: str = param("none", "also log to tensorboard or wandb (if installed)", choices=TRACKERS)
    attention: str = param("auto", "attention kernel for training: auto (fp32-matmul on CPU, packed-sdpa on "
                           "GPUs), fp32-matmul or packed-sdpa (models/attention.py: packed rows cost Σ len², not "
                           "row²), model (the model's own), eager, sdpa or flash_attention_2",
                           choices=ATTENTIONS)
    share_prompts: bool = param(True, "store a prompt once for every sequence that continues it: an RL group's "
                                      "samples, online DPO's pairs, a preference pair's two sides when packed "
                                      "(same log-probs and gradients, fewer tokens; models/attention.py). Only "
                                      "with rlhfkit's attention (--attention auto, fp32-matmul or packed-sdpa); "
                                      "SFT has no shared prompts")
    logprob_chunk: int = param(512, "tokens per chunk of the output projection (memory vs speed)")
    progress: bool = param(True, "show a progress bar")

    @property
    def shares_prompts(self) -> bool:
        """Whether sequences of one prompt store it once (`share_prompts`, and a kernel that reads
        the branches of `models.attention.sequence_spans`)."""
        return self.share_prompts and self.attention in ("auto", "fp32-matmul", "packed-sdpa")

    def validate(self) -> None:
        check(self.max_steps >= 1, "max_steps must be ≥ 1")
        check(self.batch_size >= 1, "batch_size must be ≥ 1")
        check(self.grad_accum >= 1, "grad_accum must be ≥ 1")
        check(self.lr > 0, "lr must be > 0")
        check(self.max_length >= 8, "max_length must be ≥ 8")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]")
        check(self.max_grad_norm >= 0, "max_grad_norm must be ≥ 0")
        check(self.lora_r >= 0, "lora_r must be ≥ 0")
        check(self.logprob_chunk >= 1, "logprob_chunk must be ≥ 1")


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training. step: optimizer steps done; checkpoint: the folder a rerun
    resumes from (saved at `step` on the first Ctrl-C; an earlier one, or None, after a second)."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"interrupted at step {step}; " + (f"checkpoint {checkpoint}" if checkpoint
                                                              else "no checkpoint saved"))
        self.checkpoint, self.step = checkpoint, step


def _allow_new_precision(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision. A single (non-distributed) process may run several recipes in a row (the demo
    pipeline, tests), each with its own precision: reset that state between them."""
    if not AcceleratorState._shared_state:
        return
    state = AcceleratorState()
    if PartialState().num_processes == 1 and str(state.mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_lambda(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine/linear decay to min_ratio."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Engine:
    """total_steps: the steps the lr schedule spans (default cfg.max_steps). updates_per_step:
    optimizer updates per step (an online recipe makes several per rollout); the schedule,
    warmup included, counts steps, so the updates of one step share its learning rate."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, *, total_steps: int | None = None,
                 updates_per_step: int = 1, description: str = "train"):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps or cfg.max_steps
        self.updates_per_step = updates_per_step
        self.precision = resolve_precision(cfg.precision)
        mp = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision]
        _allow_new_precision(mp)
        self.accelerator = Accelerator(mixed_precision=mp, **zero.accelerator_kwargs())
        if self.is_main and self.world_size > 1:  # once, so that a run's log says which path it took
            log.info("distributed: %s, %d process(es)", self.accelerator.distributed_type.value, self.world_size)
        self.description = description
        self.start_step = 0
        self.resumed_from: Path | None = None
        self.extra_state: dict[str, Any] = {}
        self._interrupted = False
        self._step = 0
        # Every process reads the folder before the main one changes it.
        self.identity = identity.identity_of(cfg)
        self.start = identity.decide(cfg, self.run_dir, self.identity)
        self.accelerator.wait_for_everyone()
        if self.is_main and self.start.action != "finished":
            if self.start.replace:
                identity.move_aside(self.run_dir)
            identity.record(self.identity, self.run_dir)
        self.accelerator.wait_for_everyone()
        if self.finished:
            self.start_step = self._step = self.start.finished_step
        seed_everything(cfg.seed)

    @property
    def finished(self) -> bool:
        """This run already finished in its folder: there is nothing to train (see `identity`)."""
        return self.start.action == "finished"

    def recorded_metrics(self) -> dict[str, float]:
        """A finished run's metrics at its last step, as its training returned them (metrics.jsonl
        spells a non-finite value as a string)."""
        out: dict[str, float] = {}
        for row in read_metrics(self.run_dir):
            if row.get("step") == self.start_step:
                out.update({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items() if k != "step"})
        return out

    # ---------------------------------------------------------------- process info
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype autocast computes in (bf16/fp16), or None when training in fp32."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def sum_across(self, value: float) -> float:
        """Σ over processes (token counts for exact loss normalization)."""
        if self.world_size == 1:
            return float(value)
        t = torch.tensor([float(value)], device=self.device, dtype=torch.float64)
        return float(self.accelerator.reduce(t, reduction="sum").item())

    # ---------------------------------------------------------------- setup
    def setup(self, module: nn.Module, tokenizer=None, *, trainable: list[nn.Parameter] | None = None,
              lr: float | None = None) -> nn.Module:
        """Optimizer + schedule + accelerate.prepare (or FSDP2 sharding), then resume from the
        latest checkpoint."""
        self.tokenizer = tokenizer
        set_training_attention(module, self.cfg, self.device)
        plugin = distributed.fsdp_plugin() if self.world_size > 1 else None
        if plugin is not None:
            check(trainable is None, "FSDP replaces the parameters it shards: pass no explicit trainable list")
            module = distributed.shard(module, inner_hf_model(module), plugin)
        params = trainable if trainable is not None else [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # The fused kernel (CPU and CUDA) updates 135M parameters ~5× faster than foreach.
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or self.cfg.lr,
                                      betas=(0.9, 0.95), eps=1e-8, fused=fused or None,
                                      foreach=None if fused else True)
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: lr_lambda(
            update // self.updates_per_step, warmup=self.cfg.warmup_steps, total=self.total_steps,
            schedule=self.cfg.schedule, min_ratio=self.cfg.min_lr_ratio))
        # The scheduler stays outside accelerate.prepare: a prepared scheduler steps once per
        # process, which would run the schedule N times too fast under N-process DDP.
        zero.configure(self.accelerator, self.cfg, self.precision)  # a no-op unless under DeepSpeed
        if distributed.is_sharded(module):
            self.module, self.optimizer = module, optimizer  # already sharded: nothing for accelerate to wrap
        else:
            self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.scheduler = sched
        if self.start.action == "resume":
            self._maybe_resume()
        if self.is_main:
            self.cfg.save(self.run_dir / "config.yaml")
        continuing = self.resumed_from is not None or self.finished
        self.metrics = MetricsLogger(self.run_dir, tracker=self.cfg.tracker, enabled=self.is_main,
                                     resume_step=self.start_step if continuing else None,
                                     run_name=self.run_dir.name, config=self.cfg.to_dict())
        self.progress = StepProgress(self.total_steps, self.description, start=self.start_step,
                                     enabled=self.is_main and self.cfg.progress and not self.finished)
        return self.module

    @property
    def sharded(self) -> bool:
        """The trained module is sharded over the processes (FSDP2): forwards are collective."""
        return distributed.is_sharded(getattr(self, "module", None))

    # The trained module is a DeepSpeed engine (ZeRO-2/3 through accelerate).
    deepspeed = property(lambda self: zero.is_engine(getattr(self, "module", None)))

    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.module)

    def _maybe_resume(self) -> None:
        """Load the newest checkpoint that reads whole; an unreadable one (torn file, bad JSON)
        is named in a warning, set aside as checkpoints/corrupt-step-N, and the previous one tried."""
        candidates = ckpt.complete_checkpoints(self.run_dir)
        failed: list[tuple[Path, str]] = []
        for path in candidates:
            try:
                self._load(ckpt.read_checkpoint(path))
                break
            except ckpt.CorruptCheckpoint as e:
                failed.append((path, str(e)))
                if self.is_main:
                    log.warning("cannot resume from %s/%s; trying the previous checkpoint", path.parent, e)
        else:
            if failed:
                reasons = "; ".join(reason for _, reason in failed)
                raise ConfigError(f"{self.run_dir}: no checkpoint can be resumed ({reasons}): pass --no-resume to "
                                  f"start over (the earlier run is moved into {self.run_dir}/replaced-<time>/)")
            return
        self.accelerator.wait_for_everyone()  # every process has read before the main one moves
        if self.is_main:
            ckpt.set_aside([path for path, _ in failed], latest=self.resumed_from)
            log.info("resumed from %s (step %d)", self.resumed_from, self.start_step)
        self.accelerator.wait_for_everyone()

    def _load(self, saved: ckpt.Checkpoint) -> None:
        """Apply a checkpoint read whole; a part that does not fit this run counts as unreadable."""
        blob = saved.training
        if (self.sharded, self.deepspeed) != (saved.sharded, saved.deepspeed):
            raise ConfigError(f"{saved.path}: written by a run launched otherwise (FSDP, DeepSpeed or neither) than "
                              "this one: resume it as it was launched, or pass --no-resume")
        try:
            if saved.deepspeed:
                zero.load_state(self.module, saved.path / zero.FOLDER)
            elif saved.sharded:
                distributed.load_shards(self.module, self.optimizer, saved.path / distributed.SHARDS)
            else:
                ckpt.apply_weights(inner_hf_model(self.unwrapped()), saved.weights, adapter=saved.adapter)
                self.optimizer.load_state_dict(blob["optimizer"])
            if blob["scheduler"] is not None:
                self.scheduler.load_state_dict(blob["scheduler"])
            ckpt.set_rng_state(blob["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise ckpt.CorruptCheckpoint(f"{saved.path.name}: does not fit this run ({ckpt.short_reason(e)})") from e
        self.extra_state = blob.get("extra", {})
        self.start_step = self._step = int(saved.state["step"])
        self.resumed_from = saved.path

    # ---------------------------------------------------------------- the step
    def autocast(self):
        return self.accelerator.autocast()

    def accumulate(self, last: bool):
        """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last
        micro-batch of a step."""
        if self.sharded:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.deepspeed:  # DeepSpeed steps in the backward of the step's last micro-batch
            self.accelerator.sync_gradients = last
            return contextlib.nullcontext()
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.module)

    def backward(self, loss: torch.Tensor) -> None:
        # rlhfkit's losses are normalized over the whole step: DeepSpeed must not divide again
        self.accelerator.backward(loss, **({"scale_wrt_gas": False} if self.deepspeed else {}))

    def optimizer_step(self) -> float:
        """Clip, step, schedule, zero the grads; returns the pre-clip gradient norm."""
        norm = float("nan")
        if self.cfg.max_grad_norm > 0 and self.sharded:  # the norm of sharded (DTensor) grads is collective
            norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm))
        elif self.cfg.max_grad_norm > 0:  # DeepSpeed clipped in its own step: this is its pre-clip norm
            clipped = self.accelerator.clip_grad_norm_(self.module.parameters(), self.cfg.max_grad_norm)
            norm = float("nan") if clipped is None else float(clipped)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def end_step(self, step: int, metrics: dict[str, Any], *, tokens: int = 0,
                 extra_state: dict[str, Any] | None = None) -> None:
        """Log (every log_every), advance the progress bar, checkpoint (every save_every)."""
        rate = self.progress.update(step, tokens=tokens, **{k: float(v) for k, v in metrics.items()
                                                            if k in ("loss", "reward", "kl")})
        if step % self.cfg.log_every == 0 or step == self.total_steps:
            self.metrics.log(step, {**metrics, "lr": self.lr, "tokens_per_s": rate})
        if extra_state is not None:
            self.extra_state = extra_state
        self._step = step
        if self._interrupted:
            raise TrainingInterrupted(self.save(step), step)
        if self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.total_steps:
            self.save(step)

    def save(self, step: int) -> Path:
        """Checkpoint `step` (the main process writes; under FSDP every process writes its
        shards first); returns its folder on every process."""
        self.accelerator.wait_for_everyone()
        shards = None
        if self.sharded or self.deepspeed:
            shards = ckpt.shards_staging(self.run_dir, step)
            if self.is_main and shards.exists():
                shutil.rmtree(shards)  # left by a run killed while saving
            self.accelerator.wait_for_everyone()
            (zero.save_state if self.deepspeed else distributed.save_shards)(self.module, self.optimizer, shards)
            self.accelerator.wait_for_everyone()
        if self.is_main:
            model = self.unwrapped_model_for_save()
            base = identity.adapter_base(self.cfg.model) if ckpt.is_adapter_model(model) else None
            ckpt.save_checkpoint(self.run_dir, step, model=model, tokenizer=self.tokenizer, optimizer=self.optimizer,
                                 scheduler=self.scheduler, state={"description": self.description},
                                 extra=self.extra_state, keep=self.cfg.keep_checkpoints, base_model=base,
                                 shards=shards, shards_name=zero.FOLDER if self.deepspeed else distributed.SHARDS)
        self.accelerator.wait_for_everyone()
        return self.run_dir / "checkpoints" / ckpt.checkpoint_name(step)

    def unwrapped_model_for_save(self) -> nn.Module:
        """The object whose save_pretrained writes the checkpoint (the inner HF model)."""
        return inner_hf_model(self.unwrapped())

    @contextlib.contextmanager
    def interruptible(self):
        """Ctrl-C finishes the current step, saves a checkpoint, then stops."""
        def handler(signum, frame):
            if self._interrupted:  # a second Ctrl-C stops at once
                done = ckpt.complete_checkpoints(self.run_dir)
                raise TrainingInterrupted(done[0] if done else None, self._step)
            self._interrupted = True
            if self.is_main:
                log.warning("interrupt: saving a checkpoint after this step (Ctrl-C again to stop now)")

        previous = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            previous = None
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.progress.close()

    def finish(self) -> Path:
        """Save the final model to run_dir/final and mark the run finished; a LoRA run's final
        model has the adapter merged in, and the adapter itself goes to run_dir/final-adapter
        (naming its base so that `PeftModel.from_pretrained` finds it). A run that had already
        finished writes nothing and returns its final model. Under FSDP and ZeRO-3 the full
        weights are gathered first."""
        self.accelerator.wait_for_everyone()
        out = self.run_dir / identity.FINAL
        model = self.unwrapped_model_for_save()
        gather = distributed.full_state_dict if self.sharded else zero.full_state_dict if self.deepspeed else None
        full = gather(model) if gather is not None and not self.finished else None  # collective
        if self.is_main and not self.finished:
            if full is not None and ckpt.is_adapter_model(model):
                model, full = distributed.unsharded_adapter_model(model, full), None
            ckpt.save_final(model, self.tokenizer, out, state_dict=full)
            if ckpt.is_adapter_model(model):
                ckpt.save_adapter(model, self.tokenizer, self.run_dir / identity.FINAL_ADAPTER,
                                  base_model=identity.adapter_base(self.cfg.model))
            identity.record(self.identity, self.run_dir, finished_step=self._step)
        self.metrics.close()
        self.accelerator.wait_for_everyone()
        return out
