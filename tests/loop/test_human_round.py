"""A human round end to end: the loop puts its pairs into the labeling app and stops, two
annotators vote through the HTTP API, `rlhf loop resume` trains on exactly those votes, and the
lineage names the vote ids behind the round's model."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from rlhfkit.cli import app as cli_app
from rlhfkit.feedback.app import create_app
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.models import ANNOTATOR, Project, Vote
from rlhfkit.loop.registry import WAITING, Registry
from rlhfkit.loop.runner import WaitingForLabels, run_loop

PASSWORD = "correct horse battery"


def annotator(app, username: str) -> TestClient:
    client = TestClient(app, follow_redirects=False)
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/login").text).group(1)
    assert client.post("/login", data={"username": username, "password": PASSWORD,
                                        "csrf_token": token}).status_code == 303
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf_token"]
    return client


def vote_all(client: TestClient, project_id: int, pick) -> list[int]:
    """Vote on every item the app hands out; `pick(candidate texts) → 'A' | 'B' | 'tie'`."""
    ids = []
    while (item := client.post(f"/api/p/{project_id}/next").json()["item"]) is not None:
        choice = pick([c["text"] for c in item["candidates"]])
        response = client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", json={"choice": choice})
        assert response.status_code == 200, response.text
        ids.append(response.json()["vote_id"])
    return ids


def longer_first(texts):   # a deterministic annotator: the longer response (by text) wins
    return "A" if (len(texts[0]), texts[0]) > (len(texts[1]), texts[1]) else "B"


def test_human_round_waits_for_votes_then_trains_on_exactly_them(tiny_loop, tmp_path, labeling_accounts):
    db_path = labeling_accounts(tmp_path / "labels.db", {"ann1": ANNOTATOR, "ann2": ANNOTATOR})
    cfg = tiny_loop(feedback=("human",), label_db=str(db_path), label_project="loop-test", overlap=2, kl_prompts=0)

    with pytest.raises(WaitingForLabels, match=r"0 of 4 votes"):
        run_loop(cfg)
    result = CliRunner().invoke(cli_app, ["loop", "status", cfg.output_dir])
    assert result.exit_code == 0 and "waiting for labels: 0 of 4 votes" in result.output

    app = create_app(str(db_path))
    with open_database(str(db_path)).read() as session:
        project_id = session.scalar(select(Project.id).where(Project.name == "loop-test"))
    ann1 = vote_all(annotator(app, "ann1"), project_id, longer_first)
    assert len(ann1) == 2
    with pytest.raises(WaitingForLabels, match=r"2 of 4 votes"):          # the rerun adds no second round
        run_loop(cfg)
    with Registry(cfg.output_dir) as reg:
        assert reg.step(1, "feedback").status == WAITING
    ann2 = vote_all(annotator(app, "ann2"), project_id, lambda texts: "tie")

    result = CliRunner().invoke(cli_app, ["loop", "resume", cfg.output_dir])
    assert result.exit_code == 0, result.output

    out = tmp_path / "loop"
    labels = [json.loads(line) for line in (out / "rounds" / "r1" / "labels.jsonl").read_text().splitlines()]
    assert sorted(lab["vote_id"] for lab in labels) == sorted(ann1 + ann2)
    with open_database(str(db_path)).read() as session:
        assert sorted(session.scalars(select(Vote.id))) == sorted(ann1 + ann2)
    # training saw exactly ann1's two decided votes (ann2's ties carry no preference)
    trained = [json.loads(line) for line in (out / "rounds" / "r1" / "train_pairs.jsonl").read_text().splitlines()]
    decided = [lab for lab in labels if lab["annotator"] == "ann1"]
    assert sorted((t["chosen"], t["rejected"]) for t in trained) == sorted((d["chosen"], d["rejected"])
                                                                            for d in decided)
    assert all(longer_first([t["chosen"], t["rejected"]]) == "A" for t in trained)
    with Registry(out) as reg:
        r1 = reg.rounds()[1]
    fb = r1["metrics"]["feedback"]
    assert fb["vote_ids"] == sorted(ann1 + ann2) and fb["project"] == "loop-test"
    assert fb["agreement"]["items_with_2_votes"] == 2 and fb["agreement"]["percent_agreement"] == 0.0
    assert r1["metrics"]["train"]["pairs"] == 2 and r1["model"] == "rounds/r1/model/final"
