"""Machinery: FSDP2 (accelerate launch with configs/accelerate/fsdp2.yaml) on 2 CPU processes.

accelerate enables FSDP only on accelerators; the engine shards with torch's `fully_shard`
under the accelerate config's settings (`train.distributed`), so these runs are sharded on CPU
too: each process holds half of every weight, gradient and Adam state, and checkpoints are
written as shards (checkpoints/step-N/sharded/).

Tolerance against one process: 1e-5 on losses (as the DDP test, tests/train/test_resume_ddp.py).
Two processes each sum half of a step's examples and the halves are added by a collective,
where one process adds them in one order: the same numbers summed in another order, fp32
rounding apart (~1e-7 relative), which over a few steps of lr 3e-3 stays far below 1e-5.
Resume is compared with the same 2-process layout: bitwise up to 1e-6 (as the DDP resume test).

Each subprocess run is ~30 s on 2 cores (mostly starting Python, torch and transformers twice).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.train.metrics import read_metrics

from .conftest import addition_sft_data, free_port, kill_after_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
STEPS = 40  # long enough that the run is still going when the kill test sees its first checkpoint
COMMON = dict(model="tiny", batch_size=2, lr=3e-3, warmup_steps=2, precision="fp32", progress=False, seed=7)



def _pairs(path: Path, n: int = 32) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            right = i + i % 7
            f.write(json.dumps({"prompt": f"Add {i} and {i % 7}.", "chosen": f"Answer: {right}",
                                "rejected": f"Answer: {right + 1 + i % 3}"}) + "\n")
    return path



def _launch(command: str, data: Path, out: Path, *extra: str, batch: int = 2, accum: int = 1) -> list[str]:
    """accelerate launch with the shipped FSDP2 config on 2 processes, like a user would."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
            "--main_process_port", str(free_port()), "-m", "rlhfkit.cli", command, "--model", "tiny",
            "--train-data", str(data), "--output-dir", str(out), "--batch-size", str(batch), "--grad-accum", str(accum),
            "--lr", "3e-3", "--warmup-steps", "2", "--precision", "fp32", "--no-progress", "--seed", "7", *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


@pytest.fixture(scope="module")
def sharded_sft(tmp_path_factory):
    """One uninterrupted 2-process FSDP SFT run of STEPS steps, a checkpoint every 4."""
    root = tmp_path_factory.mktemp("fsdp")
    data = addition_sft_data(root / "d.jsonl")
    out = root / "fsdp"
    res = _run(_launch("sft", data, out, "--max-steps", str(STEPS), "--save-every", "4"))
    return data, out, res


def test_fsdp_sft_matches_one_process_and_saves_a_loadable_final_model(sharded_sft, tmp_path):
    data, fsdp, res = sharded_sft
    single = tmp_path / "single"
    # One process, 2 micro-batches of 2 = the 2 processes' 2 × 2 examples per step.
    run_sft(SFTConfig(**COMMON, train_data=str(data), output_dir=str(single), max_steps=STEPS, grad_accum=2))
    a, b = _losses(single), _losses(fsdp)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert b[STEPS] == pytest.approx(a[STEPS], abs=1e-4)

    # Sharded checkpoints: one DCP file per process, no gathered model.
    ckpt = fsdp / "checkpoints" / f"step-{STEPS - 4:06d}"
    assert sorted(p.name for p in (ckpt / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model").exists()

    # final/ is one consolidated Hugging Face folder, equal to the 1-process run's weights.
    model = AutoModelForCausalLM.from_pretrained(fsdp / "final")
    assert json.loads((fsdp / "final" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ours = model.state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(single / "final").state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert torch.allclose(ours[name], value, atol=1e-4, rtol=0), name
    # The tied output head is written once, as the 1-process save does.
    assert sorted(load_file(fsdp / "final" / "model.safetensors")) == sorted(
        load_file(single / "final" / "model.safetensors"))

    # The main process alone reports.
    assert res.stdout.count("SFT done") == 1, res.stdout


def test_fsdp_run_killed_after_a_checkpoint_resumes_exactly(sharded_sft, tmp_path):
    data, full, _ = sharded_sft
    run = tmp_path / "killed"
    cmd = _launch("sft", data, run, "--max-steps", str(STEPS), "--save-every", "4")
    kill_after_checkpoint(cmd, run, 4, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout_s=180)
    assert not (run / "final").exists(), "the run finished before it was killed"
    saved = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert saved, "killed before any checkpoint"
    stopped = int(saved[-1].split("-")[1])
    _run(cmd)
    a, b = _losses(full), _losses(run)
    assert sorted(b)[-1] == STEPS
    for step in range(stopped + 1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    ours = load_file(run / "final" / "model.safetensors")
    theirs = load_file(full / "final" / "model.safetensors")
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6, rtol=0) for k in theirs)


def test_fsdp_dpo_matches_one_process(tmp_path):
    """The reference log-probs are scored before sharding (each process its share, gathered);
    the policy is sharded for training. Two micro-batches per step: the first skips FSDP's
    gradient reduce-scatter, the second reduces both."""
    pairs = _pairs(tmp_path / "p.jsonl")
    single = tmp_path / "single"
    run_dpo(DPOConfig(**{**COMMON, "batch_size": 1}, train_data=str(pairs), output_dir=str(single), max_steps=3,
                      grad_accum=4))
    fsdp = tmp_path / "fsdp"
    res = _run(_launch("dpo", pairs, fsdp, "--max-steps", "3", batch=1, accum=2))
    a, b = _losses(single), _losses(fsdp)
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    assert b[1] == pytest.approx(0.6931472, abs=1e-6)  # step 0: policy = reference under sharding too
    assert res.stdout.count("DPO done") == 1


def test_fsdp_lora_saves_the_merged_model_and_its_adapter(sharded_sft, tmp_path):
    """LoRA under FSDP: frozen base and adapter sharded together; final/ (merged) and
    final-adapter/ are written from the gathered weights and agree with each other. (Not
    compared with one process: the adapter's random init is not seeded by --seed.)"""
    from peft import PeftModel

    from rlhfkit.models.tiny import tiny_causal_lm

    data, _, _ = sharded_sft
    out = tmp_path / "lora"
    _run(_launch("sft", data, out, "--max-steps", "2", "--save-every", "1", "--lora-r", "4"))
    assert (out / "checkpoints" / "step-000001" / "sharded" / ".metadata").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    adapted = PeftModel.from_pretrained(tiny_causal_lm(seed=7), out / "final-adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, tiny_causal_lm(seed=7)(ids).logits, atol=1e-3)  # it trained
