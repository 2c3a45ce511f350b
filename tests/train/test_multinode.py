"""Machinery: a 2-node launch (two torchrun groups rendezvousing over c10d on localhost, one
process each) equals the single-node 2-process run; one process reports; data parallelism
shows every example once per epoch.

Tolerances: the 2-node and the single-node 2-process runs do the same arithmetic in the same
layout (2 ranks, gloo all-reduce), so their losses agree to 1e-6; against one process the
halves of each step are summed in another order, fp32 rounding apart: 1e-5, as in
tests/train/test_resume_ddp.py.
"""

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.train.loop import SupervisedTask, fit
from rlhfkit.train.metrics import read_metrics

from .conftest import addition_sft_data, free_port

STEPS = 3




def _sft(data: Path, out: Path) -> list[str]:
    # The progress bar stays on (the default) to check that only one process draws it.
    return ["-m", "rlhfkit.cli", "sft", "--model", "tiny", "--train-data", str(data), "--output-dir", str(out),
            "--max-steps", str(STEPS), "--batch-size", "2", "--grad-accum", "1", "--lr", "3e-3",
            "--warmup-steps", "2", "--precision", "fp32", "--seed", "7"]


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_two_node_launch_matches_one_node_and_reports_once(tmp_path):
    data = addition_sft_data(tmp_path / "d.jsonl")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [subprocess.Popen([*torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                               "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "rlhfkit-test",
                               *_sft(data, tmp_path / "two-nodes")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    outputs = []
    for node in nodes:
        out, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
        outputs.append(out + err)
    one_node = tmp_path / "one-node"
    res = subprocess.run([*torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                          str(free_port()), *_sft(data, one_node)],
                         capture_output=True, text=True, timeout=240, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    single = tmp_path / "single"
    run_sft(SFTConfig(model="tiny", train_data=str(data), output_dir=str(single), max_steps=STEPS, batch_size=2,
                      grad_accum=2, lr=3e-3, warmup_steps=2, precision="fp32", progress=False, seed=7))

    two, one, ref = _losses(tmp_path / "two-nodes"), _losses(one_node), _losses(single)
    assert sorted(two) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two[step] == pytest.approx(one[step], abs=1e-6), step
        assert two[step] == pytest.approx(ref[step], abs=1e-5), step
    # Rank 0 writes metrics once per step, prints the result once and draws the one progress bar.
    assert [m["step"] for m in read_metrics(tmp_path / "two-nodes") if "loss" in m] == [1, 2, 3]
    both = "".join(outputs)
    assert both.count("SFT done") == 1, both
    assert both.count(f"{STEPS}/{STEPS}") == 1, both


class _FakeEngine:
    """What `fit` reads of an engine, as process `rank` of `world` sees it."""

    def __init__(self, cfg: SFTConfig, rank: int, world: int):
        self.cfg, self.rank, self.world_size = cfg, rank, world
        self.finished, self.start_step, self.device = False, 0, torch.device("cpu")
        self.module = torch.nn.Linear(1, 1)
        self.accelerator = self

    def reduce(self, t, reduction):
        return t

    def sum_across(self, value):
        return float(value)

    def interruptible(self):
        return contextlib.nullcontext()

    def accumulate(self, last):
        return contextlib.nullcontext()

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        pass

    def optimizer_step(self):
        return 0.0

    def end_step(self, step, metrics, tokens=0):
        pass


@pytest.mark.parametrize("world,accum", [(2, 1), (2, 3), (3, 2)])
def test_each_process_gets_its_own_examples_every_epoch(world, accum):
    """Over one epoch, the W processes' micro-batches partition the examples: none seen twice."""
    n, batch = 48, 2
    steps = n // (batch * world * accum)
    cfg = SFTConfig(model="tiny", train_data="x", max_steps=steps, batch_size=batch, grad_accum=accum, seed=3)
    seen: dict[int, list[int]] = {}
    for rank in range(world):
        def make_batch(idx, rank=rank):
            seen.setdefault(rank, []).extend(idx)
            return torch.zeros(len(idx))

        task = SupervisedTask(lengths=[10 + i % 5 for i in range(n)], make_batch=make_batch, units=len,
                              tokens=len, loss=lambda module, b, norm: (torch.zeros(()), {"loss": torch.zeros(())}))
        fit(_FakeEngine(cfg, rank, world), task)
    every = [i for rank in range(world) for i in seen[rank]]
    assert len(every) == len(set(every)) == n
    assert all(len(seen[rank]) == n // world for rank in range(world))
