"""The supervised loop (`train.loop.fit`) on a one-parameter model whose loss and gradient are
known by hand.

Example i is a target a_i worth u_i loss units, each unit costing ½(w − a_i)². A step over the
examples S, with U = Σ_S u_i the units of the whole step (every micro-batch), has

    L(w)  = Σ_S u_i · ½(w − a_i)² / U
    ∂L/∂w = Σ_S u_i · (w − a_i) / U

so the logged loss and the logged (pre-clip) gradient norm |∂L/∂w| of every step follow from
the weight the step started from, however the step is cut into micro-batches.
"""

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rlhfkit.train.engine import Engine, TrainConfig
from rlhfkit.train.loop import SupervisedTask, fit
from rlhfkit.train.metrics import read_metrics

# The units differ, so a step normalized micro-batch by micro-batch (a mean of means) or by
# the last micro-batch's units gives other numbers than the whole step's Σ/U.
TARGETS = [1.0, 2.0, 3.0, 4.0]
UNITS = [1, 2, 3, 6]
U = sum(UNITS)  # 12
# At w = 0: L = Σ u a² / 2U = 132 / 24,  |∂L/∂w| = Σ u a / U = 38 / 12.
STEP1_LOSS, STEP1_GRAD = 132 / 24, 38 / 12


class Scalar(nn.Module):
    """w, the one parameter; saved like a transformers model (the engine's checkpoints call
    save_pretrained and load `*.safetensors` back)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def save_pretrained(self, out, safe_serialization=True):
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, Path(out) / "model.safetensors")


@dataclass
class Batch:
    indices: list[int]
    targets: torch.Tensor  # (B,)
    units: torch.Tensor  # (B,)

    def to(self, device):
        return Batch(self.indices, self.targets.to(device), self.units.to(device))


class Recorder:
    """A SupervisedTask over `targets`/`units` that records what the loop asks of it."""

    def __init__(self, targets=TARGETS, units=UNITS, *, interrupt_at_call: int | None = None):
        self.targets, self.units = targets, units
        self.interrupt_at_call = interrupt_at_call
        self.batches: list[list[int]] = []  # make_batch's indices, in call order
        self.loss_calls: list[dict] = []  # per call: w before the step, the normalizer, train mode
        self.evals: list[dict] = []

    def make_batch(self, indices):
        self.batches.append(list(indices))
        return Batch(list(indices), torch.tensor([self.targets[i] for i in indices], dtype=torch.float64),
                     torch.tensor([float(self.units[i]) for i in indices], dtype=torch.float64))

    def loss(self, module, batch, normalizer):
        self.loss_calls.append({"w": module.w.item(), "normalizer": normalizer, "training": module.training})
        if len(self.loss_calls) == self.interrupt_at_call:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of a step
        per_unit = 0.5 * (module.w - batch.targets) ** 2
        total = (batch.units * per_unit).sum()
        return total / normalizer, {"loss": total.detach(), "w_sum": (batch.units * module.w).sum().detach()}

    def evaluate(self, module):
        self.evals.append({"training": module.training, "grad": torch.is_grad_enabled()})
        return {"eval/w": module.w.item()}

    def task(self, *, with_eval: bool = False) -> SupervisedTask:
        return SupervisedTask(lengths=[1] * len(self.targets), make_batch=self.make_batch,
                              units=lambda b: int(b.units.sum()), tokens=lambda b: 10 * len(b.indices),
                              loss=self.loss, evaluate=self.evaluate if with_eval else None, group_by_length=False)


def config(run_dir, **overrides) -> TrainConfig:
    base = dict(output_dir=str(run_dir), max_steps=3, batch_size=4, grad_accum=1, lr=0.1, precision="fp32",
                schedule="constant", max_grad_norm=1e9, progress=False, seed=0)
    return TrainConfig(**{**base, **overrides})


def run(run_dir, recorder: Recorder, *, with_eval: bool = False, **overrides) -> tuple[Engine, Scalar, dict]:
    engine = Engine(config(run_dir, **overrides), run_dir)
    model = Scalar()
    engine.setup(model)
    last = fit(engine, recorder.task(with_eval=with_eval))
    return engine, model, last


def rows(run_dir) -> dict[int, dict]:
    """metrics.jsonl's training rows by step (the final evaluation's row has no loss)."""
    return {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}


def by_hand(w: float, indices) -> tuple[float, float]:
    """(L, |∂L/∂w|) of a step over `indices` started at weight w."""
    units = sum(UNITS[i] for i in indices)
    loss = sum(UNITS[i] * 0.5 * (w - TARGETS[i]) ** 2 for i in indices) / units
    grad = sum(UNITS[i] * (w - TARGETS[i]) for i in indices) / units
    return loss, abs(grad)


# ----------------------------------------------------------------------------- steps and stopping


def test_runs_exactly_max_steps_optimizer_steps_of_grad_accum_micro_batches(tmp_path):
    rec = Recorder()
    engine, model, _ = run(tmp_path, rec, max_steps=5, batch_size=2, grad_accum=2)
    assert engine.optimizer.state[model.w]["step"] == 5  # optimizer steps taken
    assert len(rec.batches) == len(rec.loss_calls) == 5 * 2  # micro-batches made and used
    assert sorted(rows(tmp_path)) == [1, 2, 3, 4, 5]  # one row per step, none after max_steps
    # Each step (2 micro-batches of 2) covers one epoch of the 4 examples: no example is
    # skipped or seen twice within an epoch.
    for step in range(5):
        assert sorted(rec.batches[2 * step] + rec.batches[2 * step + 1]) == [0, 1, 2, 3]
    # The weight moves only between steps: both micro-batches of a step see the same w.
    ws = [c["w"] for c in rec.loss_calls]
    assert all(ws[2 * s] == ws[2 * s + 1] for s in range(5))
    assert len({ws[2 * s] for s in range(5)}) == 5


def test_micro_batches_walk_through_epochs_in_order(tmp_path):
    # 8 examples in micro-batches of 2, 3 per step: step k takes micro-batches 3k, 3k+1, 3k+2
    # of a stream that crosses epochs (4 micro-batches each) without skipping or repeating.
    targets, units = [float(i) for i in range(8)], [1] * 8
    rec = Recorder(targets, units)
    run(tmp_path, rec, max_steps=4, batch_size=2, grad_accum=3)
    assert len(rec.batches) == 12
    for epoch in range(3):
        assert sorted(sum(rec.batches[4 * epoch:4 * epoch + 4], [])) == list(range(8))
    assert rec.batches[:4] != rec.batches[4:8]  # each epoch is shuffled anew


# ----------------------------------------------------------------------------- normalization


def test_step_loss_and_gradient_are_the_units_weighted_mean_over_the_whole_step(tmp_path):
    rec = Recorder()
    _, _, last = run(tmp_path, rec, max_steps=3, batch_size=2, grad_accum=2)
    # Every micro-batch is normalized by the step's units, not its own.
    assert [c["normalizer"] for c in rec.loss_calls] == [U] * 6
    logged = rows(tmp_path)
    assert logged[1]["loss"] == pytest.approx(STEP1_LOSS, rel=1e-12)
    assert logged[1]["grad_norm"] == pytest.approx(STEP1_GRAD, rel=1e-6)
    for step in (1, 2, 3):
        w = rec.loss_calls[2 * (step - 1)]["w"]
        loss, grad = by_hand(w, range(4))
        row = logged[step]
        assert row["loss"] == pytest.approx(loss, rel=1e-12)
        assert row["grad_norm"] == pytest.approx(grad, rel=1e-6)
        assert row["w_sum"] == pytest.approx(w, rel=1e-12)  # Σ u·w / U: every metric is per unit
        assert row["units"] == U
        assert row["lr"] == pytest.approx(0.1)
    assert {k: last[k] for k in ("loss", "grad_norm", "units")} == {k: logged[3][k] for k in ("loss", "grad_norm",
                                                                                             "units")}


@pytest.mark.parametrize("batch_size,grad_accum", [(2, 2), (1, 4)])
def test_grad_accumulation_equals_one_big_batch(tmp_path, batch_size, grad_accum):
    _, big_model, _ = run(tmp_path / "big", Recorder(), max_steps=4, batch_size=4, grad_accum=1)
    _, small_model, _ = run(tmp_path / "small", Recorder(), max_steps=4, batch_size=batch_size,
                            grad_accum=grad_accum)
    a, b = rows(tmp_path / "big"), rows(tmp_path / "small")
    for step in range(1, 5):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-12)
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=1e-12)
        assert b[step]["units"] == a[step]["units"] == U
    assert small_model.w.item() == pytest.approx(big_model.w.item(), rel=1e-12)


def test_tokens_are_counted_over_the_step(tmp_path):
    # The progress rate gets the step's tokens (10 per example here): 4 examples a step.
    rec = Recorder()
    engine = Engine(config(tmp_path, max_steps=2, batch_size=1, grad_accum=4), tmp_path)
    engine.setup(Scalar())
    seen = []
    end_step = engine.end_step

    def spy(step, metrics, *, tokens=0):
        seen.append((step, tokens))
        end_step(step, metrics, tokens=tokens)

    engine.end_step = spy
    fit(engine, rec.task())
    assert seen == [(1, 40), (2, 40)]


# ----------------------------------------------------------------------------- logging and evaluation


def test_every_step_logs_its_metrics_at_its_step_number(tmp_path):
    rec = Recorder()
    run(tmp_path, rec, max_steps=4, log_every=1)
    logged = rows(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4]
    for step, row in logged.items():
        assert {"loss", "w_sum", "grad_norm", "units", "lr", "tokens_per_s"} <= set(row)
        assert row["loss"] == pytest.approx(by_hand(rec.loss_calls[step - 1]["w"], range(4))[0], rel=1e-12)


@pytest.mark.parametrize("max_steps,eval_every,eval_steps", [
    (5, 2, [2, 4]),  # every 2 steps, then the final evaluation
    (4, 2, [2]),  # not twice at the last step: the final evaluation covers it
    (3, 0, []),  # only the final evaluation
])
def test_evaluation_cadence(tmp_path, max_steps, eval_every, eval_steps):
    rec = Recorder()
    _, model, last = run(tmp_path, rec, with_eval=True, max_steps=max_steps, eval_every=eval_every)
    assert len(rec.evals) == len(eval_steps) + 1
    logged = rows(tmp_path)
    assert [s for s, r in sorted(logged.items()) if "eval/w" in r] == eval_steps
    for s in eval_steps:  # evaluated after step s's update: the weight the next step starts from
        assert logged[s]["eval/w"] == rec.loss_calls[s]["w"]
    (final,) = [r for r in read_metrics(tmp_path) if "loss" not in r]
    assert final == {"step": max_steps, "eval/w": model.w.item()}
    assert last["eval/w"] == model.w.item() and last["loss"] == logged[max_steps]["loss"]
    # Evaluation runs in eval mode without gradients; training resumes in train mode.
    assert all(not e["training"] and not e["grad"] for e in rec.evals)
    assert all(c["training"] for c in rec.loss_calls)


# ----------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_at_the_next_step_and_ends_where_an_unbroken_run_does(tmp_path):
    targets, units = [float(i) for i in range(8)], [1, 2, 3, 4, 1, 2, 3, 4]
    full = Recorder(targets, units)
    _, full_model, _ = run(tmp_path / "full", full, max_steps=6, batch_size=2, save_every=0)

    # Ctrl-C during step 3: the step finishes, is checkpointed, and the run stops.
    broken = tmp_path / "broken"
    first = Recorder(targets, units, interrupt_at_call=3)
    with pytest.raises(KeyboardInterrupt):
        run(broken, first, max_steps=6, batch_size=2)
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step-000003"
    assert first.batches == full.batches[:3]

    second = Recorder(targets, units)
    engine, model, _ = run(broken, second, max_steps=6, batch_size=2)
    assert engine.start_step == 3
    assert second.batches == full.batches[3:]  # steps 4–6 take the micro-batches they would have
    assert [c["w"] for c in second.loss_calls] == [c["w"] for c in full.loss_calls[3:]]
    assert model.w.item() == full_model.w.item()
    assert engine.optimizer.state[model.w]["step"] == 6
    a, b = rows(tmp_path / "full"), rows(broken)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # one row per step: none lost, none twice
    for step in range(1, 7):
        assert (b[step]["loss"], b[step]["grad_norm"]) == (a[step]["loss"], a[step]["grad_norm"])
