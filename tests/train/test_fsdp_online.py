"""Machinery: an online recipe (GRPO) under FSDP2 on 2 CPU processes (gloo), against the same
2-process run under DDP.

Sampling calls the transformers model directly, outside the sharded root's forward, and the
processes decode different lengths (different numbers of forwards): `train.distributed.
full_parameters` all-gathers every unit's weights once before the rollout and keeps them
unsharded, with no collective per forward, until the rollout is scored.

Compared with DDP, not one process: both launches give each process the same prompts and
sampling seed (`prompts_for_step`), so the rollouts are the same tokens and only the gradient
reduction differs (FSDP's reduce-scatter, DDP's all-reduce: the same two halves added in
another order, fp32 rounding apart). Tolerance 1e-5 on loss, KL and gradient norm (as the
other FSDP tests); measured agreement is ~1e-7 on the gradient norm, bitwise on the rest.

Three subprocess runs of ~10-15 s each on 2 cores.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.models.device import cpu_supports_bf16
from rlhfkit.train.metrics import read_metrics

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
FSDP2 = ROOT / "configs" / "accelerate" / "fsdp2.yaml"
STEPS = 3
ARGS = ["--model", "tiny", "--tasks", "demo", "--demo-per-family", "3", "--prompts-per-step", "2",
        "--max-new-tokens", "8", "--batch-size", "4", "--no-progress", "--seed", "5", "--lr", "1e-3",
        "--reward", "gold,format:[a-z]:0.5"]



def _fsdp() -> list[str]:
    return ["-m", "accelerate.commands.launch", "--config_file", str(FSDP2), "--num_processes", "2",
            "--main_process_port", str(free_port())]


def _run(launcher: list[str], out: Path, precision: str = "fp32", steps: int = STEPS,
         recipe: str = "grpo") -> subprocess.CompletedProcess:
    cmd = [sys.executable, *launcher, "-m", "rlhfkit.cli", recipe, *ARGS, "--output-dir", str(out),
           "--precision", precision, "--max-steps", str(steps)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _steps(run: Path) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run) if "loss" in m}


@pytest.mark.parametrize("recipe", ["grpo", "ppo"])
def test_fsdp_online_recipe_matches_ddp_on_two_processes(tmp_path, recipe):
    """PPO also checks its critic: the value head's weights, gathered from the shards at the
    end, equal the DDP run's."""
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    res = _run(_fsdp(), fsdp, recipe=recipe)
    # Plain torchrun: 2 processes, no FSDP variables, so the engine wraps the model in DDP.
    _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
          "--master_port", str(free_port())], ddp, recipe=recipe)
    a, b = _steps(ddp), _steps(fsdp)
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert b[step]["reward"] == a[step]["reward"], step  # the same sampled responses
        for key in ("loss", "kl", "grad_norm", "entropy"):
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-5), (step, key)
    assert b[STEPS]["kl"] > 0  # the policy moved, under sharding too
    assert res.stdout.lower().count(f"{recipe} done") == 1, res.stdout
    AutoModelForCausalLM.from_pretrained(fsdp / "final")  # the gathered final model loads
    if recipe == "ppo":
        sharded, plain = (load_file(str(run / "final" / "value_head.safetensors")) for run in (fsdp, ddp))
        assert set(sharded) == set(plain) and sharded
        for name in plain:
            torch.testing.assert_close(sharded[name], plain[name], atol=1e-5, rtol=0)


@pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
def test_fsdp_grpo_in_bf16_samples_from_its_own_copy(tmp_path):
    """bf16 runs decode with the sampler's own bf16 copy of the policy: it is taken before
    sharding (FSDP refuses to copy a sharded model) and synced from the gathered weights
    before each rollout."""
    out = tmp_path / "bf16"
    _run(_fsdp(), out, precision="bf16", steps=2)
    assert "precision: bf16" in (out / "config.yaml").read_text()
    steps = _steps(out)
    assert sorted(steps) == [1, 2]
    assert steps[2]["kl"] != 0.0  # the policy moved after step 1
    assert (out / "final" / "config.json").exists()
