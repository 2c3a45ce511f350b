"""A run folder holds one run: reruns resume only the same run, refuse another recipe, other
settings or other data with one line, rerun nothing once it finished, and `--no-resume` moves the
earlier run aside. Ctrl-C raises TrainingInterrupted naming the checkpoint to resume from.

The runs train one float64 weight w on the loss ½(w − a)² (see test_loop.py), so they take
milliseconds; the engine only sees a config, a module and a loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from rlhfkit.config import ConfigError
from rlhfkit.recipes.dpo import DPOConfig
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.train.engine import Engine, TrainingInterrupted
from rlhfkit.train.loop import SupervisedTask, fit
from rlhfkit.train.metrics import read_metrics

TARGETS = [1.0, 2.0, 3.0, 4.0]


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def save_pretrained(self, out, safe_serialization=True):
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({"w": self.w.detach().clone()}, Path(out) / "model.safetensors")


class Task:
    """½(w − a)² over TARGETS; counts loss calls; sends SIGINT `sigints` times at call `at`."""

    def __init__(self, *, at: int | None = None, sigints: int = 1):
        self.calls, self.at, self.sigints = 0, at, sigints

    def loss(self, module, batch, normalizer):
        self.calls += 1
        if self.calls == self.at:
            for _ in range(self.sigints):
                os.kill(os.getpid(), signal.SIGINT)
        a = torch.tensor([TARGETS[i] for i in batch], dtype=torch.float64)
        total = (0.5 * (module.w - a) ** 2).sum()
        return total / normalizer, {"loss": total.detach()}

    def task(self) -> SupervisedTask:
        return SupervisedTask(lengths=[1] * 4, make_batch=lambda idx: _Batch(idx), units=len, tokens=len,
                              loss=self.loss, group_by_length=False)


class _Batch(list):
    def to(self, device):
        return self


def sft(tmp_path, **kw) -> SFTConfig:
    data = tmp_path / "d.jsonl"
    if not data.exists():
        data.write_text('{"prompt": "p", "completion": "c"}\n')
    base = dict(model="tiny", train_data=str(data), output_dir=str(tmp_path / "run"), max_steps=3, batch_size=4,
                lr=0.1, schedule="constant", precision="fp32", progress=False, seed=0)
    return SFTConfig(**{**base, **kw})


def train(cfg, task: Task | None = None, *, finish: bool = True):
    """Engine → setup → fit → finish, as every supervised recipe does. Returns (engine, model, metrics)."""
    task = task or Task()
    engine = Engine(cfg, cfg.output_dir)
    model = Scalar()
    engine.setup(model)
    last = fit(engine, task.task())
    if finish:
        engine.finish()
    return engine, model, last


def steps(run_dir) -> list[int]:
    return sorted(r["step"] for r in read_metrics(run_dir) if "loss" in r)


def ways_out(out) -> str:
    return (f"pass a new --output-dir for a new run, or --no-resume to start over in {out} "
            f"(the earlier run is moved into {out}/replaced-<time>/)")


# ----------------------------------------------------------------------------- identity


def test_run_json_records_recipe_model_data_hash_and_settings(tmp_path):
    cfg = sft(tmp_path)
    train(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["kind"] == "sft" and record["finished_step"] == 3
    assert record["data"]["train_data"] == {"path": cfg.train_data,
                                            "sha256": hashlib.sha256(b'{"prompt": "p", "completion": "c"}\n')
                                            .hexdigest()}
    assert record["data"]["eval_data"] == {"path": "", "sha256": None}
    assert record["config"]["lr"] == 0.1 and record["config"]["model"] == "tiny"
    assert not {"output_dir", "resume", "max_steps", "save_every", "progress"} & set(record["config"])


def test_a_folder_holding_another_recipes_run_is_refused(tmp_path):
    cfg = sft(tmp_path, save_every=1)
    train(cfg, finish=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    dpo = DPOConfig(model="tiny", train_data=cfg.train_data, output_dir=cfg.output_dir, progress=False)
    with pytest.raises(ConfigError) as e:
        Engine(dpo, dpo.output_dir)
    out = tmp_path / "run"
    assert str(e.value) == f"{out} holds an earlier sft run, not dpo: {ways_out(out)}"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched


def test_changed_settings_are_refused_naming_each_and_config_yaml_is_kept(tmp_path):
    cfg = sft(tmp_path, save_every=1)
    train(cfg, finish=False)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        Engine(cfg.replace(lr=0.2, seed=1), out)
    assert str(e.value) == (f"{out} holds an earlier sft run with other settings (seed: 0 → 1; lr: 0.1 → 0.2): "
                            f"resume it with its own settings, {ways_out(out)}")
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.1


def test_data_is_compared_by_contents_not_by_path(tmp_path):
    cfg = sft(tmp_path, save_every=1)
    train(cfg, finish=False)
    out, data = tmp_path / "run", Path(cfg.train_data)
    original = data.read_text()
    data.write_text(original + '{"prompt": "q", "completion": "d"}\n')
    with pytest.raises(ConfigError, match=rf"\(train_data: {data} has other contents\)"):
        Engine(cfg, out)
    data.write_text(original)
    moved = tmp_path / "moved.jsonl"
    data.rename(moved)
    engine = Engine(cfg.replace(train_data=str(moved)), out)  # same bytes elsewhere: the same run
    engine.setup(Scalar())
    assert engine.start_step == 2                   # checkpoints at steps 1 and 2 (none at the last)


def test_where_and_how_often_it_saves_and_how_far_it_trains_may_change(tmp_path):
    cfg = sft(tmp_path, save_every=1)
    train(cfg, finish=False)                        # checkpoints at steps 1 and 2
    changed = cfg.replace(save_every=2, log_every=2, keep_checkpoints=5, max_steps=5, eval_every=3,
                          logprob_chunk=7, precision="fp32", attention="eager")
    engine, _, _ = train(changed)
    assert engine.resumed_from.name == "step-000002"
    assert steps(tmp_path / "run") == [1, 2, 4, 5]  # then every 2nd step, and the last


# ----------------------------------------------------------------------------- finished runs


def test_a_finished_run_trains_nothing_and_returns_its_metrics(tmp_path, caplog):
    cfg = sft(tmp_path)
    _, _, first = train(cfg)
    out = tmp_path / "run"
    final_weights = (out / "final" / "model.safetensors").stat().st_mtime_ns
    metrics = (out / "metrics.jsonl").read_text()
    again = Task()
    with caplog.at_level(logging.WARNING):
        engine, _, last = train(cfg, again)
    assert again.calls == 0 and engine.finished and engine.start_step == 3
    assert first.items() <= last.items()  # read back from step 3's row (which adds lr and tokens/s)
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == final_weights
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (f"{out} holds a finished sft run (3 steps; its model is {out}/final): nothing to train. --no-resume "
            "trains it again; a new --output-dir starts another run") in caplog.messages


def test_a_finished_run_trains_on_from_its_last_checkpoint_when_max_steps_is_raised(tmp_path):
    cfg = sft(tmp_path, save_every=1)
    train(cfg)                                       # checkpoints 1, 2; final at 3
    engine, _, _ = train(cfg.replace(max_steps=5))
    assert engine.resumed_from.name == "step-000002"
    assert steps(tmp_path / "run") == [1, 2, 3, 4, 5]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["finished_step"] == 5


def test_a_finished_run_without_checkpoints_cannot_be_raised(tmp_path):
    cfg = sft(tmp_path)                              # save_every 0: only the final model
    train(cfg)
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as e:
        Engine(cfg.replace(max_steps=5), out)
    assert str(e.value) == (f"{out} holds a finished sft run (3 steps; its model is {out}/final) with no checkpoint "
                            f"left to train on from: to reach step 5, start a new run from its model (--model "
                            f"{out}/final --output-dir NEW), or pass --no-resume to start over")


def test_no_resume_moves_the_earlier_run_aside_and_starts_from_step_0(tmp_path):
    cfg = sft(tmp_path, save_every=1)
    train(cfg)
    out = tmp_path / "run"
    first_rows = read_metrics(out)
    fresh = Task()
    train(cfg.replace(resume=False, lr=0.2), fresh)  # other settings are fine when starting over
    (aside,) = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert sorted(p.name for p in aside.iterdir()) == ["checkpoints", "config.yaml", "final", "metrics.jsonl",
                                                        "run.json"]
    assert read_metrics(aside) == first_rows
    assert fresh.calls == 3 and steps(out) == [1, 2, 3]
    assert json.loads((out / "run.json").read_text())["config"]["lr"] == 0.2
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]


def test_a_folder_from_before_run_json_is_checked_against_its_config_yaml(tmp_path, caplog):
    cfg = sft(tmp_path, save_every=1)
    train(cfg, finish=False)
    out = tmp_path / "run"
    (out / "run.json").unlink()
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.1 → 0.2\)"):
        Engine(cfg.replace(lr=0.2), out)
    engine = Engine(cfg, out)
    engine.setup(Scalar())
    assert engine.start_step == 2 and (out / "run.json").exists()


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_raises_training_interrupted_with_the_checkpoint_it_saved(tmp_path):
    cfg = sft(tmp_path)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, Task(at=2))
    assert isinstance(e.value, KeyboardInterrupt)
    assert (e.value.checkpoint, e.value.step) == (tmp_path / "run" / "checkpoints" / "step-000002", 2)
    assert e.value.checkpoint.is_dir()


@pytest.mark.parametrize("save_every,checkpoint", [(0, None), (2, "step-000002")])
def test_a_second_ctrl_c_stops_at_once_naming_the_last_checkpoint_or_none(tmp_path, save_every, checkpoint):
    cfg = sft(tmp_path, save_every=save_every, max_steps=4)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, Task(at=3, sigints=2))             # both during step 3
    assert e.value.step == 2
    expected = tmp_path / "run" / "checkpoints" / checkpoint if checkpoint else None
    assert e.value.checkpoint == expected
    assert not (tmp_path / "run" / "checkpoints" / "step-000003").exists()
