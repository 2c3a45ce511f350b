"""The supervised loop shared by SFT, reward models and the DPO family.

A recipe describes its data and loss as a `SupervisedTask`; `fit` runs the optimizer
steps. The loss of a step is normalized by the number of loss units (tokens for SFT,
pairs for DPO/RM) of the whole step — every micro-batch on every process — so gradient
accumulation and data parallelism give exactly the gradient of the full batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rlhfkit.data.packing import plan_batches
from rlhfkit.train.engine import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisedTask:
    """What a supervised recipe plugs into `fit`.

    lengths: tokens per example (for length grouping).
    make_batch(indices) → a batch container with `.to(device)`.
    units(batch) → loss units in the batch (tokens or pairs); tokens(batch) → tokens processed.
    loss(module, batch, normalizer) → (loss to backpropagate, {metric: sum over units}).
    evaluate(module) → {metric: value}, run on the main process at eval points.
    """

    lengths: list[int]
    make_batch: Callable[[list[int]], Any]
    units: Callable[[Any], int]
    tokens: Callable[[Any], int]
    loss: Callable[[nn.Module, Any, float], tuple[Tensor, dict[str, Tensor]]]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    group_by_length: bool = True


class MicroBatchStream:
    """Micro-batch k of the run, across epochs: a pure function of (seed, k)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group_by_length: bool):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self._epochs: dict[int, list[list[int]]] = {}
        self.per_epoch = len(self._plan(0))
        if self.per_epoch == 0:
            raise ValueError("no training examples left to batch")

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self._epochs = {epoch: plan_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch,
                                                group_by_length=self.group)}
        return self._epochs[epoch]

    def __getitem__(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.per_epoch)
        return self._plan(epoch)[i]


def fit(engine: Engine, task: SupervisedTask) -> dict[str, float]:
    """Run optimizer steps from engine.start_step to cfg.max_steps; returns the last metrics
    (a run that had already finished in its folder runs nothing and returns its recorded ones)."""
    cfg = engine.cfg
    if engine.finished:
        return engine.recorded_metrics()
    module = engine.module
    stream = MicroBatchStream(task.lengths, cfg.batch_size, cfg.seed, task.group_by_length)
    W, A = engine.world_size, cfg.grad_accum
    last: dict[str, float] = {}
    with engine.interruptible():
        for step in range(engine.start_step, cfg.max_steps):
            module.train()
            batches = [task.make_batch(stream[step * A * W + a * W + engine.rank]) for a in range(A)]
            units = engine.sum_across(sum(task.units(b) for b in batches))
            sums: dict[str, float] = {}
            tokens = 0
            for a, batch in enumerate(batches):
                batch = batch.to(engine.device)
                with engine.accumulate(last=a == A - 1), engine.autocast():
                    # DDP averages gradients over W processes; scale so the result is Σ/units.
                    loss, metrics = task.loss(module, batch, units / W)
                engine.backward(loss)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                tokens += task.tokens(batch)
            grad_norm = engine.optimizer_step()
            keys = sorted(sums)
            totals = torch.tensor([sums[k] for k in keys] + [float(tokens)], dtype=torch.float64)
            if W > 1:
                totals = engine.accelerator.reduce(totals.to(engine.device), reduction="sum").cpu()
            last = {k: float(totals[i]) / max(units, 1.0) for i, k in enumerate(keys)}
            last["grad_norm"] = grad_norm
            last["units"] = units
            done = step + 1
            if task.evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                last.update(run_eval(engine, task))
            engine.end_step(done, last, tokens=int(totals[-1]))
    if task.evaluate is not None:
        final_eval = run_eval(engine, task)
        last.update(final_eval)
        engine.metrics.log(cfg.max_steps, final_eval)
    return last


def run_eval(engine: Engine, task: SupervisedTask) -> dict[str, float]:
    out: dict[str, float] = {}
    engine.accelerator.wait_for_everyone()
    if engine.is_main or engine.sharded:  # a sharded model's forward needs every process
        module = engine.unwrapped()
        module.eval()
        with torch.no_grad(), engine.autocast():
            out = task.evaluate(module)
        module.train()
    engine.accelerator.wait_for_everyone()
    return out
