"""What a run leaves on disk, with the tiny random model: resume falls back past a corrupt
checkpoint to the previous one and continues exactly; a LoRA run keeps both the merged model
and an adapter PEFT can load onto its base; every file and folder follows the umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.config import ConfigError
from rlhfkit.models.loading import load_model
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.train.metrics import read_metrics


def _data(path: Path, n: int = 24) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Add {i} and 3.", "completion": f"{i} + 3 = {i + 3}"}) + "\n"
                            for i in range(n)))
    return path


def _cfg(data: Path, out: Path, **kw) -> SFTConfig:
    base = dict(model="tiny", train_data=str(data), output_dir=str(out), max_steps=4, batch_size=4, lr=3e-3,
                precision="fp32", progress=False, seed=3, save_every=1, keep_checkpoints=3)
    return SFTConfig(**{**base, **kw})


def _losses(run) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(run) if "loss" in m}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """An unbroken 4-step run: checkpoints at steps 1–3, the final model at 4."""
    root = tmp_path_factory.mktemp("full")
    data = _data(root / "d.jsonl")
    run_sft(_cfg(data, root / "run"))
    return root / "run", data


def _died_after_step_3(full_run: Path, where: Path) -> Path:
    """The folder of the same run killed right after its step-3 checkpoint."""
    (where / "checkpoints").mkdir(parents=True)
    for name in ("step-000002", "step-000003"):
        shutil.copytree(full_run / "checkpoints" / name, where / "checkpoints" / name)
    (where / "checkpoints" / "latest").write_text("step-000003\n")
    shutil.copy(full_run / "run.json", where / "run.json")  # final/ is not there: not finished
    return where


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "training.pt": _truncate,
    "model/model.safetensors": _truncate,
    "trainer_state.json": lambda p: p.write_text('{"step": 3, "descr'),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(full, tmp_path, caplog, name):
    full_run, data = full
    died = _died_after_step_3(full_run, tmp_path / "died")
    CORRUPTIONS[name](died / "checkpoints" / "step-000003" / name)
    with caplog.at_level(logging.WARNING):
        run_sft(_cfg(data, died))
    warning = next(m for m in caplog.messages if m.startswith("cannot resume from"))
    assert warning.startswith(f"cannot resume from {died}/checkpoints/step-000003/{name}: ")
    assert warning.endswith("; trying the previous checkpoint")
    # Resumed from step 2: steps 3 and 4 retrained, exactly as the unbroken run trained them.
    a, b = _losses(full_run), _losses(died)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    ours, theirs = load_file(died / "final" / "model.safetensors"), load_file(full_run / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in ours)
    # The unreadable one is set aside, out of the way of resume and of pruning.
    assert (died / "checkpoints" / f"corrupt-step-000003/{name}").exists()
    assert sorted(p.name for p in (died / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    assert (died / "checkpoints" / "latest").read_text().strip() == "step-000003"  # the new one


def test_when_no_checkpoint_loads_the_rerun_is_refused_in_one_line(full, tmp_path):
    full_run, data = full
    died = _died_after_step_3(full_run, tmp_path / "died")
    _truncate(died / "checkpoints" / "step-000003" / "training.pt")
    (died / "checkpoints" / "step-000002" / "trainer_state.json").write_text("")
    with pytest.raises(ConfigError) as e:
        run_sft(_cfg(data, died))
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{died}: no checkpoint can be resumed (step-000003/training.pt: ")
    assert "; step-000002/trainer_state.json: Expecting value: line 1 column 1 (char 0)): " in message
    assert message.endswith(f"pass --no-resume to start over (the earlier run is moved into {died}/replaced-<time>/)")
    run_sft(_cfg(data, died, resume=False))  # the way out it names
    assert _losses(died) == pytest.approx(_losses(full_run), abs=1e-6)


def _tiny_base(folder: Path) -> Path:
    load_model("tiny", seed=5).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_a_lora_run_keeps_the_merged_model_and_an_adapter_that_loads_onto_its_base(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)  # the base is named by a relative path, as on a command line
    _tiny_base(tmp_path / "base")
    data = _data(tmp_path / "d.jsonl")
    result = run_sft(_cfg(data, tmp_path / "run", model="base", lora_r=2, lora_alpha=4, lr=5e-2, max_steps=2))
    run = tmp_path / "run"
    assert result["final"] == str(run / "final")
    assert not (run / "final" / "adapter_config.json").exists()  # a plain model
    for adapter in (run / "final-adapter", run / "checkpoints" / "step-000001" / "model"):
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tmp_path / "base")  # absolute: loads from anywhere
    monkeypatch.chdir("/")
    tokens = torch.tensor([[5, 40, 41, 42, 43, 44]])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        base_logits = base(tokens).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "final").eval()(tokens).logits
        config = json.loads((run / "final-adapter" / "adapter_config.json").read_text())
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]),
                                         run / "final-adapter").eval()
        adapted = peft(tokens).logits
    assert (merged - base_logits).abs().max() > 1e-3  # the adapter was trained: the comparison can fail
    assert torch.allclose(adapted, merged, atol=1e-5)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    files = {stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*") if p.is_file()}
    dirs = {stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")] if p.is_dir()}
    return files, dirs


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_every_output_follows_the_umask(tmp_path, umask, file_mode, dir_mode):
    _tiny_base(tmp_path / "base")
    data = _data(tmp_path / "d.jsonl")
    old = os.umask(umask)
    try:
        run_sft(_cfg(data, tmp_path / "run", model=str(tmp_path / "base"), lora_r=2, max_steps=2))
        run_sft(_cfg(data, tmp_path / "run", model=str(tmp_path / "base"), lora_r=2, max_steps=2, resume=False))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"checkpoints", "final", "final-adapter", "run.json",
                                               "metrics.jsonl", "config.yaml"}
    assert len([p for p in run.iterdir() if p.name.startswith("replaced-")]) == 1
    assert _modes(run) == ({file_mode}, {dir_mode})
