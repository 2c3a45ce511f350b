"""Machinery: exact resume (from a checkpoint and after Ctrl-C) and 2-process DDP = 1 process."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.train.metrics import read_metrics

from .conftest import addition_sft_data, free_port


def _cfg(tmp_path, out, **kw):
    base = dict(model="tiny", train_data=str(addition_sft_data(tmp_path / "d.jsonl")), output_dir=str(out), max_steps=6,
                batch_size=4, lr=3e-3, warmup_steps=2, precision="fp32", progress=False, seed=7)
    base.update(kw)
    return SFTConfig(**base)


def _losses(run):
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def test_resume_from_checkpoint_gives_identical_losses(tmp_path):
    full = tmp_path / "full"
    run_sft(_cfg(tmp_path, full, save_every=3))
    # A run that died right after its step-3 checkpoint: only that checkpoint is left.
    died = tmp_path / "died"
    (died / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000003", died / "checkpoints" / "step-000003")
    (died / "checkpoints" / "latest").write_text("step-000003\n")
    run_sft(_cfg(tmp_path, died, save_every=3))
    a, b = _losses(full), _losses(died)
    assert sorted(b) == [4, 5, 6]  # resumed at step 4, not from scratch
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step


def test_no_resume_when_disabled(tmp_path):
    out = tmp_path / "r"
    run_sft(_cfg(tmp_path, out, save_every=3, max_steps=3))
    run_sft(_cfg(tmp_path, out, save_every=3, max_steps=3, resume=False))
    assert sorted(_losses(out)) == [1, 2, 3]


def _cli(tmp_path, out, *extra):
    return [sys.executable, "-m", "rlhfkit.cli", "sft", "--model", "tiny", "--train-data",
            str(addition_sft_data(tmp_path / "d.jsonl")), "--output-dir", str(out), "--max-steps", "120",
            "--batch-size", "2", "--lr", "1e-3", "--precision", "fp32", "--no-progress", *extra]


def test_ctrl_c_saves_a_checkpoint_and_resume_matches(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cli(tmp_path, ref), check=True, capture_output=True, timeout=300)
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(tmp_path, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = run / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()[-2000:]
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert saved, "Ctrl-C left no checkpoint"
    stopped = int(saved[-1].split("-")[1])
    assert 10 <= stopped < 120
    subprocess.run(_cli(tmp_path, run), check=True, capture_output=True, timeout=300)
    a, b = _losses(ref), _losses(run)
    assert sorted(b) == list(range(1, 121))
    for step in range(stopped + 1, stopped + 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert b[120] == pytest.approx(a[120], abs=1e-5)


def test_two_process_ddp_matches_single_process(tmp_path):
    single = tmp_path / "single"
    run_sft(_cfg(tmp_path, single, batch_size=2, grad_accum=2, max_steps=4))
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = free_port()  # for the rendezvous
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port),
           "-m", "rlhfkit.cli", "sft", "--model", "tiny", "--train-data", str(tmp_path / "d.jsonl"),
           "--output-dir", str(ddp), "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1",
           "--lr", "3e-3", "--warmup-steps", "2", "--precision", "fp32", "--no-progress", "--seed", "7"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(single), _losses(ddp)
    assert sorted(b) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    metrics = {m["step"]: m for m in read_metrics(ddp)}
    assert metrics[1]["units"] == {m["step"]: m for m in read_metrics(single)}[1]["units"]
