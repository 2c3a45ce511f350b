"""SIGKILL during sampling, the labeling wait, training and registration: each resume ends
with the same registry (times aside) and the same models as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from rlhfkit.feedback.assignment import next_assignment
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.models import ANNOTATOR, Item, Project, Round, User
from rlhfkit.feedback.votes import VoteInput, save_vote, to_shown_order
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.runner import run_loop

HARNESS = Path(__file__).with_name("kill_harness.py")


def run_harness(cfg, point: str) -> int:
    proc = subprocess.run([sys.executable, str(HARNESS), json.dumps(cfg.to_dict()), point],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 3, -signal.SIGKILL), proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def reference(tiny_loop_module, snapshot):
    cfg = tiny_loop_module("reference")
    run_loop(cfg)
    return snapshot(cfg.output_dir)


@pytest.fixture(scope="module")
def tiny_loop_module(loop_files, tmp_path_factory):
    """make(name, **overrides): the tiny loop, 2 rounds of 4 DPO steps with a checkpoint every 2 (so
    the training kill lands between checkpoints), in a fresh folder named `name`."""
    def make(name: str, **overrides):
        root = tmp_path_factory.mktemp(name)
        fields = dict(output_dir=str(root / "loop"), policy="tiny", rounds=2, prompts=loop_files["prompts"],
                      eval_tasks=loop_files["eval"], prompts_per_round=2, samples_per_prompt=2, pairs_per_prompt=1,
                      feedback=(f"rm:{loop_files['rm']}",), steps=4, batch_size=2, max_new_tokens=4, kl_prompts=0,
                      precision="fp32", lr=1e-3)
        return LoopConfig(**{**fields, **overrides})
    return make


@pytest.mark.parametrize("point", ["sampling", "training", "registration"])
def test_sigkill_then_resume_gives_the_uninterrupted_result(tiny_loop_module, reference, snapshot, point):
    cfg = tiny_loop_module(point)
    assert run_harness(cfg, point) == -signal.SIGKILL
    interrupted = snapshot(cfg.output_dir)
    assert len(interrupted["steps"]) < len(reference["steps"])
    if point == "training":
        assert list(Path(cfg.output_dir).rglob("checkpoints/step-*")), "the kill came after a checkpoint"
    assert run_harness(cfg, "none") == 0
    assert snapshot(cfg.output_dir) == reference


def _vote_everything(db: Path, project: str) -> None:
    """ann1 prefers the first response of every item (as imported), straight into the app's database."""
    database = open_database(str(db))
    with database.write() as session:
        p = session.scalar(select(Project).where(Project.name == project))
        user = session.scalar(select(User).where(User.username == "ann1"))
        while (a := next_assignment(session, p, user)) is not None:
            save_vote(session, a, VoteInput(shown_ranks=to_shown_order([0, 1], a.display_order), both_bad=False))
        session.commit()
    database.close()


def test_sigkill_while_sending_a_human_round_to_the_app_loses_and_duplicates_nothing(tiny_loop_module,
                                                                                     labeling_accounts, snapshot):
    snaps = []
    for point in ("none", "labeling"):
        cfg = tiny_loop_module(f"human-{point}", feedback=("human",), rounds=1, overlap=1, steps=2,
                               label_project="faults")
        db = Path(cfg.output_dir) / "labels.db"          # the default labeling database of the loop
        db.parent.mkdir(parents=True)
        labeling_accounts(db, {"ann1": ANNOTATOR})
        first = run_harness(cfg, point)
        assert first == (3 if point == "none" else -signal.SIGKILL)
        if point == "labeling":
            assert run_harness(cfg, "none") == 3            # resumes into the wait, the round imported once
        _vote_everything(db, "faults")
        assert run_harness(cfg, "none") == 0
        snaps.append(snapshot(cfg.output_dir))
        database = open_database(str(db))
        with database.read() as session:
            assert session.scalar(select(func.count(Round.id))) == 1
            assert session.scalar(select(func.count(Item.id))) == 2
        database.close()
    assert snaps[0] == snaps[1]
