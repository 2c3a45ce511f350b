"""A human round of `rlhf loop` labeled in real headless Chromium: the loop stops waiting for
votes, an annotator labels the round's pairs by keyboard in the app, and the resumed loop trains
on exactly those votes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.models import ANNOTATOR, Project, Vote
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.registry import Registry
from rlhfkit.loop.runner import WaitingForLabels, run_loop

pytestmark = pytest.mark.browser      # the `chromium` fixture skips without Chromium or Playwright
PASSWORD = "correct horse battery"


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_loop_round_labeled_in_chromium(tmp_path, server_process, chromium, browser_page, log_in,
                                          labeling_accounts):
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"What is {a} plus 1?", "answer": str(a + 1)}
                                                  for a in range(4)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"prompt": "What is 2 times 2?", "answer": "4"}])
    db_path = labeling_accounts(tmp_path / "labels.db", {"ann1": ANNOTATOR})
    cfg = LoopConfig(output_dir=str(tmp_path / "loop"), policy="tiny", rounds=1, prompts=prompts, eval_tasks=evals,
                     prompts_per_round=2, samples_per_prompt=2, pairs_per_prompt=1, feedback=("human",),
                     label_db=str(db_path), label_project="browser-round", overlap=1, steps=2, batch_size=2,
                     max_new_tokens=4, kl_prompts=0, precision="fp32")
    with pytest.raises(WaitingForLabels, match="0 of 2 votes"):
        run_loop(cfg)
    with open_database(str(db_path)).read() as session:
        project_id = session.scalar(select(Project.id).where(Project.name == "browser-round"))

    server = server_process(db_path)
    chosen_texts = []
    try:
        with chromium() as browser:
            page = browser_page(browser)
            log_in(page, server.url, "ann1")
            page.goto(f"{server.url}/p/{project_id}/label")
            # "Start labeling" takes the focus (autofocus, once the page has rendered): Enter claims an item.
            page.wait_for_function("document.activeElement?.closest('#claim-form') != null")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            for _ in range(2):
                page.wait_for_selector("#vote-form")
                texts = {c.get_attribute("data-letter"): c.query_selector(".text").inner_text()
                         for c in page.query_selector_all("article.candidate")}
                letter = "A" if (len(texts["A"]), texts["A"]) >= (len(texts["B"]), texts["B"]) else "B"
                chosen_texts.append(texts[letter])
                page.keyboard.press(letter.lower())
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            assert "Nothing left to label" in page.inner_text("main")
    finally:
        server.stop()

    run_loop(cfg)
    out = tmp_path / "loop"
    with open_database(str(db_path)).read() as session:
        vote_ids = sorted(session.scalars(select(Vote.id)))
    with Registry(out) as reg:
        r1 = reg.rounds()[1]
    assert r1["metrics"]["feedback"]["vote_ids"] == vote_ids and len(vote_ids) == 2
    trained = [json.loads(line) for line in (out / "rounds" / "r1" / "train_pairs.jsonl").read_text().splitlines()]
    # the browser shows the text as rendered (whitespace collapsed): compare on that
    assert sorted(" ".join(t["chosen"].split()) for t in trained) == sorted(" ".join(c.split()) for c in chosen_texts)
