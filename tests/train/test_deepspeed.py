"""Machinery: DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on 2 CPU processes (gloo).

accelerate prepares DeepSpeed on CPU only because the engine asks it to (`train.deepspeed`):
each run must log `distributed: DEEPSPEED` (not MULTI_CPU, accelerate's silent DDP fallback)
and write DeepSpeed's checkpoint layout (checkpoints/step-N/deepspeed/state/, one optimizer
partition per process).

Tolerance against one process (2 micro-batches per step = the 2 processes' examples): 1e-6 on
losses and 1e-5 on final weights, in fp32 (measured ≤ 1e-7: the same numbers summed in another
order). The ZeRO-3 run forces `stage3_param_persistence_threshold: 0` (a DeepSpeed config file,
set through accelerate's environment variables under torchrun, as accelerate launch would) so
that every weight of the tiny model is really partitioned and the final model must be gathered.
Resume is compared with the same 2-process layout, up to 1e-6.

DeepSpeed builds its CPU shared-memory op once per machine (~2 min, cached in
~/.cache/torch_extensions); after that each launch is ~30 s on 2 cores.
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

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
COMMON = dict(model="tiny", lr=3e-3, warmup_steps=2, precision="fp32", progress=False, seed=7)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}


def _args(command: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "rlhfkit.cli", command, "--model", "tiny", "--train-data", str(data), "--output-dir", str(out),
            "--lr", "3e-3", "--warmup-steps", "2", "--precision", "fp32", "--no-progress", "--seed", "7", *extra]


def _accelerate(config: str, *args: str) -> list[str]:
    """accelerate launch with a shipped DeepSpeed config on 2 processes, like a user would."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
            "--num_processes", "2", "--main_process_port", str(free_port()), *args]


def _zero3_unpersisted(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """torchrun with ZeRO-3 from a DeepSpeed config file that keeps no parameter whole."""
    config = tmp / "ds-zero3.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                  "train_batch_size": "auto", "gradient_clipping": "auto",
                                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    env = {**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config),
           "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port())], env


def _run(cmd: list[str], env: dict[str, str] = ENV) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert out.count("distributed: DEEPSPEED, 2 process(es)") == 1, out[-3000:]
    return out


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


def _same_weights(a: Path, b: Path, atol: float) -> None:
    ours = AutoModelForCausalLM.from_pretrained(a).state_dict()
    theirs = AutoModelForCausalLM.from_pretrained(b).state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        assert ours[name].numel() > 0 and torch.allclose(ours[name], value, atol=atol, rtol=0), name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return addition_sft_data(tmp_path_factory.mktemp("ds") / "d.jsonl")


@pytest.fixture(scope="module")
def single(data, tmp_path_factory):
    """One process, 2 micro-batches of 2 per step: 4 steps."""
    out = tmp_path_factory.mktemp("single") / "run"
    run_sft(SFTConfig(**COMMON, batch_size=2, train_data=str(data), output_dir=str(out), max_steps=4, grad_accum=2))
    return out


@pytest.fixture(scope="module")
def zero3(data, tmp_path_factory):
    """An uninterrupted 2-process ZeRO-3 SFT run of 4 steps, a checkpoint every 2."""
    tmp = tmp_path_factory.mktemp("zero3")
    launcher, env = _zero3_unpersisted(tmp)
    cmd = [*launcher, *_args("sft", data, tmp / "run", "--batch-size", "2", "--max-steps", "4", "--save-every", "2")]
    _run(cmd, env)
    return tmp / "run", cmd, env


def test_zero2_sft_matches_one_process(data, single, tmp_path):
    out = tmp_path / "zero2"
    _run(_accelerate("deepspeed-zero2.yaml", *_args("sft", data, out, "--batch-size", "2", "--max-steps", "4")))
    a, b = _losses(single), _losses(out)
    assert sorted(b) == [1, 2, 3, 4]
    for step in b:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    # The logged gradient norm is DeepSpeed's pre-clip norm of the whole step's gradients.
    norms = [{m["step"]: m["grad_norm"] for m in read_metrics(run) if "grad_norm" in m} for run in (single, out)]
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    _same_weights(out / "final", single / "final", atol=1e-5)


def test_zero3_sft_partitioned_matches_one_process_and_gathers_final(zero3, single):
    out, _, _ = zero3
    a, b = _losses(single), _losses(out)
    assert sorted(b) == [1, 2, 3, 4]
    for step in b:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    # DeepSpeed's own checkpoint: every process's partition, no gathered model.
    ckpt = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (ckpt / "deepspeed" / "state").glob("*.pt")) == [
        "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (ckpt / "model").exists()
    # final/ holds the gathered weights (none are kept whole with threshold 0), as one process's.
    _same_weights(out / "final", single / "final", atol=1e-5)
    assert sorted(load_file(out / "final" / "model.safetensors")) == sorted(
        load_file(single / "final" / "model.safetensors"))


def test_zero3_run_killed_after_a_checkpoint_resumes_exactly(zero3, tmp_path):
    full, cmd, env = zero3
    run = tmp_path / "killed"
    cmd = [str(run) if part == str(full) else part for part in cmd]
    kill_after_checkpoint(cmd, run, 2, env=env)
    assert not (run / "final").exists(), "the run finished before it was killed"
    assert (run / "checkpoints" / "step-000002").is_dir(), "killed before the checkpoint"
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    _run(cmd, env)
    a, b = _losses(full), _losses(run)
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    _same_weights(run / "final", full / "final", atol=1e-6)


def test_zero3_dpo_with_grad_accum_matches_one_process(tmp_path):
    """The shipped ZeRO-3 config; 2 micro-batches per process: DeepSpeed steps once per step,
    on the second, without dividing rlhfkit's already normalized loss again."""
    pairs = tmp_path / "p.jsonl"
    with open(pairs, "w") as f:
        for i in range(32):
            right = i + i % 7
            f.write(json.dumps({"prompt": f"Add {i} and {i % 7}.", "chosen": f"Answer: {right}",
                                "rejected": f"Answer: {right + 1 + i % 3}"}) + "\n")
    single = tmp_path / "single"
    run_dpo(DPOConfig(**COMMON, batch_size=1, train_data=str(pairs), output_dir=str(single), max_steps=3,
                      grad_accum=4))
    out = tmp_path / "zero3"
    _run(_accelerate("deepspeed-zero3.yaml", *_args("dpo", pairs, out, "--batch-size", "1", "--grad-accum", "2",
                                                     "--max-steps", "3")))
    a, b = _losses(single), _losses(out)
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    assert b[1] == pytest.approx(0.6931472, abs=1e-6)  # step 0: policy = reference
    _same_weights(out / "final", single / "final", atol=1e-5)


def test_zero2_grpo_matches_two_process_ddp(tmp_path):
    """An online recipe under ZeRO-2 (sampling from the engine's module, the update inside
    DeepSpeed's step) takes the steps 2-process DDP takes: loss, KL and entropy to 1e-6, the
    gradient norm to 1e-5 relative (the same sums in another order)."""
    args = ["-m", "rlhfkit.cli", "grpo", "--model", "tiny", "--tasks", "demo", "--reward", "format:e",
            "--max-steps", "3", "--prompts-per-step", "2", "--samples-per-prompt", "4", "--max-new-tokens", "8",
            "--batch-size", "8", "--lr", "1e-3", "--precision", "fp32", "--no-progress", "--seed", "3"]
    _run(_accelerate("deepspeed-zero2.yaml", *args, "--output-dir", str(tmp_path / "zero2")))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(free_port()), *args, "--output-dir", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    ours, theirs = read_metrics(tmp_path / "zero2"), read_metrics(tmp_path / "ddp")
    assert [m["step"] for m in ours] == [m["step"] for m in theirs] == [1, 2, 3]
    assert any(m["reward"] > 0 for m in ours), "no reward: nothing was learned from"
    for a, b in zip(ours, theirs):
        for key in ("reward", "loss", "kl", "entropy"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
