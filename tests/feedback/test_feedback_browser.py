"""End to end in real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright;
no browser is ever downloaded): an admin creates annotators and a project, two annotators
log in and label a round of pairwise and ranking-with-ties items by keyboard, the admin
exports the votes, and the export trains a reward model for a few steps.

Screenshots go to a temporary folder, or to docs/screenshots/ with
RLHFKIT_UPDATE_SCREENSHOTS=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser      # the `chromium` fixture skips without Chromium or Playwright

from sqlalchemy import select  # noqa: E402

from rlhfkit.feedback.db import open_database  # noqa: E402
from rlhfkit.feedback.models import ADMIN, Item, User, Vote  # noqa: E402
from rlhfkit.feedback.votes import to_item_order  # noqa: E402

PASSWORD = "correct horse battery"
SCREENSHOTS = (Path(__file__).resolve().parents[2] / "docs" / "screenshots"
               if os.environ.get("RLHFKIT_UPDATE_SCREENSHOTS") == "1" else None)

ROUND = [
    {"id": "rm-1", "prompt": "Explain in one sentence what a reward model is.",
     "responses": ["A reward model is a network trained on human comparisons of responses that scores how "
                   "good a new response is, so a policy can be optimized against those scores.",
                   "It is a model that gives rewards."]},
    {"id": "commit-1", "prompt": [{"role": "system", "content": "You are a concise assistant."},
                                  {"role": "user", "content": "Give me one tip for writing clear commit messages."}],
     "responses": ["Start with a short imperative summary line (\"Fix crash when the config is empty\"), then "
                   "explain why in the body.",
                   "Write good messages.",
                   "Use the imperative mood and keep the first line under about 50 characters.",
                   "asdf"]},
    {"id": "fr-1", "prompt": "Translate 'good morning' into French.", "responses": ["Bonjour.", "Bonne nuit."],
     "gold": 0},
]
GUIDELINES = "# How to judge\n\nPrefer the response that is **correct**, then the one that is *clearer*.\n\n" \
             "- Tie when they are equally good.\n- Both bad when neither answers the prompt."


def shot(page, tmp_dir: Path, name: str, full_page: bool = False) -> Path:
    folder = SCREENSHOTS or tmp_dir
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    page.screenshot(path=str(path), full_page=full_page)
    return path


def press(page, *keys: str) -> None:
    for key in keys:
        page.keyboard.press(key)


def submit(page, key: str = "Enter") -> None:
    with page.expect_navigation():
        page.keyboard.press(key)


def shown_texts(page) -> dict[str, str]:
    cards = page.query_selector_all("article.candidate")
    return {card.get_attribute("data-letter"): card.query_selector(".text").inner_text() for card in cards}


def current_item(page) -> tuple[str, dict[str, str]]:
    page.wait_for_selector("#vote-form")
    return page.get_attribute("#vote-form", "data-kind"), shown_texts(page)


@pytest.fixture(scope="module")
def labeled_round(tmp_path_factory, server_process, chromium, browser_page, log_in, labeling_accounts):
    """Run the whole browser session once; what it produced, for the tests below."""
    tmp = tmp_path_factory.mktemp("browser")
    db_path = tmp / "feedback.db"
    labeling_accounts(db_path, {"admin": ADMIN})
    candidates = tmp / "round1.jsonl"
    candidates.write_text("".join(json.dumps(r) + "\n" for r in ROUND), encoding="utf-8")

    server = server_process(db_path)
    expected: dict[tuple[str, str], dict] = {}
    try:
        with chromium() as browser:
            admin = browser_page(browser, accept_downloads=True)

            # 1. The admin creates two annotators and a project with its first round.
            log_in(admin, server.url, "admin")
            assert admin.url.endswith("/admin")
            for name in ("ann1", "ann2"):
                admin.fill("#user-name", name)
                admin.fill("#user-password", PASSWORD)
                with admin.expect_navigation():
                    admin.click("#new-user button[type=submit]")
            admin.fill("#project-name", "helpfulness")
            admin.fill("#project-overlap", "2")
            admin.set_input_files("#project-file", str(candidates))
            admin.fill("#project-model-version", "sft-v1")
            admin.fill("#project-guidelines", GUIDELINES)
            with admin.expect_navigation():
                admin.click("#new-project button[type=submit]")
            assert "/admin/p/" in admin.url
            project_url = admin.url.replace("/admin", "")

            # 2. Two annotators, each in their own browser context, label by keyboard only.
            pages = {}
            for name in ("ann1", "ann2"):
                page = browser_page(browser)
                log_in(page, server.url, name)
                page.goto(f"{project_url}/label")
                # "Start labeling" takes the focus (autofocus, once the page has rendered): Enter claims an item.
                page.wait_for_function("document.activeElement?.closest('#claim-form') != null")
                with page.expect_navigation():
                    page.keyboard.press("Enter")
                pages[name] = page

            # ann1: rm-1 "A better", then changes their mind with u (undo) and marks a tie.
            page = pages["ann1"]
            kind, texts = current_item(page)
            assert kind == "pairwise"
            press(page, "1")
            submit(page)
            submit(page, "u")
            assert "was undone" in page.inner_text("main")
            press(page, "t")
            submit(page)
            expected[("ann1", "rm-1")] = {"tie": True}
            # ann1: the 4-way ranking D > C > A = B.
            kind, texts = current_item(page)
            assert kind == "ranking"
            press(page, "4", "3", "1", "=", "2")
            assert page.input_value("#ranking") == "D > C > A = B"
            submit(page)
            expected[("ann1", "commit-1")] = {"best": texts["D"], "tied": {texts["A"], texts["B"]}}
            # ann1: the gold item, right answer, with a rationale typed after r (Esc leaves the box).
            kind, texts = current_item(page)
            press(page, "r")
            page.keyboard.type("Bonjour is <b>morning</b>; the other is night.")
            press(page, "Escape", "a" if texts["A"] == "Bonjour." else "b")
            submit(page)
            expected[("ann1", "fr-1")] = {"chosen": "Bonjour.",
                                          "rationale": "Bonjour is <b>morning</b>; the other is night."}
            assert "Nothing left to label" in page.inner_text("main")

            # ann2: rm-1, the full answer is clearly better (strength 2: s twice); screenshot first.
            page = pages["ann2"]
            kind, texts = current_item(page)
            better = "A" if texts["A"].startswith("A reward model is") else "B"
            press(page, better.lower(), "s", "s")
            assert page.is_checked("input[name=strength][value='2']")
            shot(page, tmp, "labeling-pairwise.png")
            submit(page)
            expected[("ann2", "rm-1")] = {"chosen": texts[better], "margin": 2.0}
            # ann2: a sensible ranking with the two weak answers tied; Backspace corrects a slip.
            kind, texts = current_item(page)
            key_of = {text: str("ABCD".index(letter) + 1) for letter, text in texts.items()}
            best, second, weak1, weak2 = sorted(texts.values(), key=lambda t: (
                not t.startswith("Start with"), not t.startswith("Use the"), t))
            press(page, key_of[best], key_of[second], key_of[weak1], "Backspace", key_of[weak1], "=", key_of[weak2])
            letter_of = {text: letter for letter, text in texts.items()}
            assert page.input_value("#ranking") == (
                f"{letter_of[best]} > {letter_of[second]} > {letter_of[weak1]} = {letter_of[weak2]}")
            shot(page, tmp, "labeling-ranking.png")
            submit(page)
            expected[("ann2", "commit-1")] = {"best": best, "tied": {weak1, weak2}}
            # ann2: gold item, both bad (x).
            kind, texts = current_item(page)
            press(page, "x")
            submit(page)
            expected[("ann2", "fr-1")] = {"both_bad": True}

            # 3. The admin sees the progress on the dashboard and downloads the export.
            admin.reload()
            assert "6 / 6" in admin.inner_text("#rounds")
            assert "ann1" in admin.inner_text("#annotators") and "ann2" in admin.inner_text("#annotators")
            shot(admin, tmp, "dashboard.png", full_page=True)
            exports = {}
            for fmt in ("pairs", "rankings", "soft"):
                admin.select_option("#export-format", fmt)
                with admin.expect_download() as download:
                    admin.click("#export-button")
                exports[fmt] = tmp / f"{fmt}.jsonl"
                download.value.save_as(str(exports[fmt]))
    finally:
        server.stop()
    return {"db": db_path, "expected": expected, "exports": exports, "shots": SCREENSHOTS or tmp}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_keyboard_labeling_is_exported_with_ties_and_provenance(labeled_round):
    expected = labeled_round["expected"]
    pairs = read_jsonl(labeled_round["exports"]["pairs"])
    by = {}
    for record in pairs:
        by.setdefault((record["annotator"], record["item_id"]), []).append(record)
    # 3 items × 2 annotators: pairwise items give 1 pair each, the ranking 6.
    assert len(pairs) == 2 * (1 + 6 + 1)
    assert all(r["source"] == "human" and r["round"] == 1 and r["model_version"] == "sft-v1" for r in pairs)

    (tie,) = by[("ann1", "rm-1")]
    assert tie["label"] == 0.5 and tie["both_bad"] is False
    (b_better,) = by[("ann2", "rm-1")]
    assert b_better["chosen"] == expected[("ann2", "rm-1")]["chosen"]
    assert (b_better["label"], b_better["margin"]) == (1.0, 2.0)
    (gold,) = by[("ann1", "fr-1")]
    assert gold["chosen"] == expected[("ann1", "fr-1")]["chosen"] == "Bonjour."
    assert gold["rationale"] == expected[("ann1", "fr-1")]["rationale"]  # stored verbatim
    (both_bad,) = by[("ann2", "fr-1")]
    assert both_bad["both_bad"] is True and both_bad["label"] == 0.5

    for annotator in ("ann1", "ann2"):
        want = expected[(annotator, "commit-1")]
        ranking_pairs = by[(annotator, "commit-1")]
        ties = {frozenset((r["chosen"], r["rejected"])) for r in ranking_pairs if r["label"] == 0.5}
        tied = sorted(want["tied"])
        assert ties == {frozenset((a, b)) for i, a in enumerate(tied) for b in tied[i + 1:]}
        best_pairs = [r for r in ranking_pairs if want["best"] in (r["chosen"], r["rejected"])]
        assert len(best_pairs) == 3 and all(r["chosen"] == want["best"] and r["label"] == 1.0 for r in best_pairs)
        assert ranking_pairs[0]["prompt"][0] == {"role": "system", "content": "You are a concise assistant."}

    rankings = read_jsonl(labeled_round["exports"]["rankings"])
    assert len(rankings) == 6
    soft = read_jsonl(labeled_round["exports"]["soft"])
    (rm_soft,) = [r for r in soft if r["item_id"] == "rm-1"]
    # ann1 tie (0.5) and ann2 a clear preference (1.0 for their choice) -> 0.75 for it.
    assert rm_soft["label"] == 0.75 and rm_soft["chosen"] == expected[("ann2", "rm-1")]["chosen"]
    assert rm_soft["annotator"] == "ann1,ann2"


def test_votes_record_the_order_each_annotator_saw(labeled_round):
    database = open_database(str(labeled_round["db"]))
    with database.read() as session:
        rows = session.execute(select(Vote, Item.external_id, User.username)
                               .join(Item, Vote.item_id == Item.id).join(User, Vote.user_id == User.id)).all()
    database.close()
    responses = ROUND[1]["responses"]
    for vote, external_id, username in rows:
        assert sorted(vote.display_order) == list(range(len(vote.ranks)))
        if external_id == "commit-1" and username == "ann1":  # typed D > C > A = B on screen
            assert vote.ranks == to_item_order((2, 2, 1, 0), vote.display_order)
        if external_id == "commit-1" and username == "ann2":  # ranked by content
            assert vote.ranks == [0, 2, 1, 2] and responses[0].startswith("Start with")


def test_screenshots_were_taken(labeled_round):
    for name in ("labeling-pairwise.png", "labeling-ranking.png", "dashboard.png"):
        path = labeled_round["shots"] / name
        assert path.stat().st_size > 10_000, name


def test_the_export_trains_a_reward_model(labeled_round, train_reward_model_on_export):
    pairs = labeled_round["exports"]["pairs"]
    result = train_reward_model_on_export(str(pairs), steps=3)
    # every exported pair, ties included, reached the trainer
    assert result["data"]["train_pairs"] == len(read_jsonl(pairs)) == 16


def test_dashboard_shows_progress_agreement_and_an_outlier(tmp_path, database, seed, server_process, chromium,
                                                           browser_page, log_in):
    """Two rounds from two model versions, five annotators, one of whom answers against
    everyone else: the dashboard flags them."""
    from rlhfkit.feedback.assignment import next_assignment
    from rlhfkit.feedback.models import Project
    from rlhfkit.feedback.projects import add_round
    from rlhfkit.feedback.votes import VoteInput, save_vote, to_shown_order

    def round_records(n, tag):
        pairs = [{"prompt": f"{tag} question {i}", "responses": [f"good {i}", f"poor {i}"],
                  **({"gold": 0} if i % 4 == 0 else {})} for i in range(n)]
        rankings = [{"prompt": f"{tag} ranking {i}", "responses": ["best", "fine", "fine too", "bad"]}
                    for i in range(3)]
        return pairs + rankings

    names = ("alice", "bob", "carol", "dave", "erin")
    project_id = seed(database, annotators=names, overlap=3, records=round_records(9, "sft"), model_version="sft-v1")
    with database.write() as session:
        project = session.get(Project, project_id)
        add_round(session, project, round_records(9, "ppo"), "ppo-step-2000")
        users = {name: session.scalar(select(User).where(User.username == name)) for name in names}
        for step in range(12):  # the annotators take turns, as they would working side by side
            for name in names:
                if name == "dave" and step >= 7:  # dave is behind
                    continue
                assignment = next_assignment(session, project, users[name])
                if assignment is None:
                    continue
                count = len(assignment.item.responses)
                # everyone: responses in imported order, the middle two tied; erin: reversed
                ranks = [0, 1] if count == 2 else [0, 1, 1, 2]
                if name == "erin":
                    ranks = [max(ranks) - r for r in ranks]
                save_vote(session, assignment, VoteInput(to_shown_order(ranks, assignment.display_order)))
        session.commit()

    server = server_process(database.engine.url.render_as_string(hide_password=False))
    try:
        with chromium() as browser:
            page = browser_page(browser)
            log_in(page, server.url, "admin")
            page.goto(f"{server.url}/admin/p/{project_id}")
            flagged = page.inner_text("#annotators tr.flagged")
            assert flagged.startswith("erin") and "outlier" in flagged
            assert page.locator("#annotators tr.flagged").count() == 1
            assert "ppo-step-2000" in page.inner_text("#rounds")
            shot(page, tmp_path, "dashboard-outliers.png", full_page=True)
    finally:
        server.stop()
