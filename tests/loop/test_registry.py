"""The lineage registry: steps with their artifacts' hashes, rounds, relative paths, snapshots."""

from __future__ import annotations

import hashlib

import pytest

from rlhfkit.loop.registry import DONE, WAITING, Artifact, Registry, sha256_of


def test_file_and_folder_hashes(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_bytes(b'{"x": 1}\n')
    assert sha256_of(f) == hashlib.sha256(b'{"x": 1}\n').hexdigest()
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "w.bin").write_bytes(b"abc")
    (d / "sub" / "c.json").write_bytes(b"{}")
    expected = hashlib.sha256(b"sub/c.json\0{}" + b"w.bin\0abc").hexdigest()   # sorted paths, then contents
    assert sha256_of(d) == expected
    (d / "w.bin").write_bytes(b"abd")
    assert sha256_of(d) != expected


def test_steps_artifacts_and_waiting(tmp_path):
    with Registry(tmp_path / "run") as reg:
        out = tmp_path / "run" / "rounds" / "r1" / "labels.jsonl"
        out.parent.mkdir(parents=True)
        out.write_text('{"a": 1}\n{"a": 2}\n\n')
        assert reg.step(1, "feedback") is None and not reg.is_done(1, "feedback")
        reg.record_step(1, "feedback", {"votes": 1, "needed": 4}, status=WAITING)
        assert reg.step(1, "feedback").status == WAITING and not reg.is_done(1, "feedback")
        assert reg.artifacts() == []
        reg.record_step(1, "feedback", {"labels": 2}, [Artifact("labels", out)], started=0.0)
        row = reg.step(1, "feedback")
        assert (row.status, row.outputs) == (DONE, {"labels": 2})
        [art] = reg.artifacts(1)
        # stored relative to the run folder; the record count is the non-empty lines
        assert art == {"round": 1, "step": "feedback", "name": "labels", "path": "rounds/r1/labels.jsonl",
                       "sha256": sha256_of(out), "records": 2}
        assert reg.artifact_path(1, "feedback", "labels") == out.resolve()
        with pytest.raises(KeyError, match="round 2"):
            reg.artifact_path(2, "feedback", "labels")


def test_rounds_keep_hub_ids_and_store_folders_relative(tmp_path):
    with Registry(tmp_path / "run") as reg:
        reg.register_round(0, parent_model=None, model="embedded", config={"a": 1}, package_version="0.1",
                           metrics={"acc": 0.5})
        model = tmp_path / "run" / "rounds" / "r1" / "model" / "final"
        model.mkdir(parents=True)
        (model / "w").write_text("w")
        reg.register_round(1, parent_model="embedded", model=str(model), config={"a": 1}, package_version="0.1",
                           metrics={"acc": 0.6})
        r0, r1 = reg.rounds()
        assert (r0["model"], r0["parent_model"], r0["model_sha256"]) == ("embedded", None, "not-a-local-model:embedded")
        assert (r1["model"], r1["parent_model"]) == ("rounds/r1/model/final", "embedded")
        assert r1["model_sha256"] == sha256_of(model) and r1["metrics"] == {"acc": 0.6}
        assert reg.model_of(1) == model.resolve() and reg.model_of(0) == "embedded"


def test_snapshot_ignores_times_only(tmp_path, snapshot):
    snaps = []
    for name in ("a", "b"):
        with Registry(tmp_path / name / "run") as reg:
            reg.record_step(0, "evaluate", {"accuracy": 0.25}, started=float(len(name)))
        snaps.append(snapshot(tmp_path / name / "run"))
    assert snaps[0] == snaps[1]
    with Registry(tmp_path / "a" / "run") as reg:
        reg.record_step(0, "evaluate", {"accuracy": 0.5})
    assert snapshot(tmp_path / "a" / "run") != snaps[1]
