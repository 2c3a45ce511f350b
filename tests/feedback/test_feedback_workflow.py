"""Assignment with overlap, undo, gold accuracy, outliers, progress and export, on a real
SQLite file through the service functions (no HTTP)."""

import json
import math
import os

import pytest
from sqlalchemy import func, select, text

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.assignment import next_assignment
from rlhfkit.feedback.export import export_records, write_jsonl
from rlhfkit.feedback.migrations import SCHEMA_VERSION, SchemaError, migrate
from rlhfkit.feedback.models import Assignment, Item, Project, User, Vote
from rlhfkit.feedback.projects import add_round
from rlhfkit.feedback.quality import gold_score, project_report
from rlhfkit.feedback.votes import VoteInput, save_vote, to_shown_order, undo_last_vote


def answer_all(database, project_id, username, answers, *, default=None):
    """Let `username` work through their queue, answering each item with the ranks (imported
    order) in answers[external_id] (or `default(item)`); returns the external ids answered."""
    done = []
    with database.write() as session:
        project = session.get(Project, project_id)
        user = session.scalar(select(User).where(User.username == username))
        while (assignment := next_assignment(session, project, user)) is not None:
            item = assignment.item
            ranks, both_bad, strength = answers.get(item.external_id) or default(item)
            shown = to_shown_order(list(ranks), assignment.display_order)
            save_vote(session, assignment, VoteInput(shown, both_bad, strength, None))
            done.append(item.external_id)
        session.commit()
    return done


def first_best(item):
    return [0] + [1] * (len(item.responses) - 1), False, None


def records(n, gold_every=None):
    return [{"id": f"q{i}", "prompt": f"prompt {i}", "responses": [f"good {i}", f"bad {i}"],
             **({"gold": 0} if gold_every and i % gold_every == 0 else {})} for i in range(n)]


def test_overlap_k_and_gold_to_everyone(database, seed):
    # 5 normal items with overlap 2 and 1 gold item, 3 annotators.
    items = records(5) + [{"id": "g", "prompt": "gold", "responses": ["right", "wrong"], "gold": 0}]
    project_id = seed(database, annotators=("a", "b", "c"), overlap=2, records=items)
    answered = {name: answer_all(database, project_id, name, {}, default=first_best) for name in "abc"}
    with database.read() as session:
        per_item = dict(session.execute(select(Item.external_id, func.count(Vote.id))
                                        .join(Vote, Vote.item_id == Item.id).group_by(Item.external_id)).all())
    assert per_item == {"q0": 2, "q1": 2, "q2": 2, "q3": 2, "q4": 2, "g": 3}
    # a and b take items in file order; c gets what is left plus the gold item.
    assert answered["a"] == ["q0", "q1", "q2", "q3", "q4", "g"]
    assert answered["c"] == ["g"]
    assert sum(len(v) for v in answered.values()) == 13


def test_held_item_is_returned_until_answered_and_undo_reopens(database, seed):
    project_id = seed(database, annotators=("a",), overlap=1, records=records(3))
    with database.write() as session:
        project = session.get(Project, project_id)
        user = session.scalar(select(User).where(User.username == "a"))
        first = next_assignment(session, project, user)
        assert next_assignment(session, project, user).id == first.id  # a reload does not skip
        save_vote(session, first, VoteInput((0, 1)))
        second = next_assignment(session, project, user)
        assert second.item_id != first.item_id
        save_vote(session, second, VoteInput((1, 0)))
        assert undo_last_vote(session, project, user).id == second.item_id
        assert session.scalar(select(func.count(Vote.id))) == 1
        assert next_assignment(session, project, user).item_id == second.item_id
        session.commit()


def test_display_order_is_per_annotator_and_recorded_with_the_vote(database, seed):
    project_id = seed(database, annotators=("a", "b"), overlap=2, records=records(20))
    for name in "ab":
        answer_all(database, project_id, name, {}, default=first_best)
    with database.read() as session:
        orders = session.execute(select(Assignment.item_id, Assignment.user_id, Assignment.display_order)).all()
        votes = {(v.item_id, v.user_id): v for v in session.scalars(select(Vote))}
    assert {tuple(o) for _, _, o in orders} == {(0, 1), (1, 0)}  # both sides used
    by_item = {}
    for item_id, user_id, order in orders:
        assert votes[(item_id, user_id)].display_order == order
        assert votes[(item_id, user_id)].ranks == [0, 1]  # stored in imported order whatever was shown
        by_item.setdefault(item_id, set()).add(tuple(order))
    assert any(len(o) == 2 for o in by_item.values())  # the two annotators saw some item differently


def test_gold_score_counts_only_specified_comparisons():
    # gold "response 1 is best" over 3, ranks (None, 0, None): comparisons (0,1) and (1,2)
    # are specified (1 better in both), (0,2) is not.
    # vote (1, 0, 1): 1 better than 0 and than 2 -> 2 of 2
    assert gold_score([1, 0, 1], [None, 0, None]) == 1.0
    # vote (1, 0, 0): (0,1) right, but 1 tied with 2 -> 1 of 2
    assert gold_score([1, 0, 0], [None, 0, None]) == 0.5
    # full gold ranks (0, 0, 1): pairs (0,1) tie, (0,2) 0 better, (1,2) 1 better
    assert gold_score([0, 1, 2], [0, 0, 1]) == pytest.approx(2 / 3)
    assert gold_score([1, 0], [0, 1]) == 0.0


def test_report_flags_the_annotator_who_disagrees(database, seed):
    # 6 items (every third gold: q0, q3), overlap 3, 3 annotators. a and b answer "first is
    # best" everywhere; c answers the opposite.
    project_id = seed(database, annotators=("a", "b", "c"), overlap=3, records=records(6, gold_every=3))
    for name in "ab":
        answer_all(database, project_id, name, {}, default=first_best)
    answer_all(database, project_id, "c", {}, default=lambda item: ([1, 0], False, None))
    with database.read() as session:
        report = project_report(session, session.get(Project, project_id))
    by_name = {a.username: a for a in report.annotators}
    # c vs the others' majority (a and b both "first"): 0 of 6 units. For a, the others are
    # b ("first") and c ("second"): a tie for first place, so no unit counts.
    assert by_name["c"].majority_agreement == 0.0 and by_name["c"].majority_units == 6
    assert by_name["a"].majority_units == 0 and math.isnan(by_name["a"].majority_agreement)
    assert (by_name["a"].gold_accuracy, by_name["a"].gold_votes) == (1.0, 2)
    assert by_name["c"].gold_accuracy == 0.0
    # Gold: a=1.0 (2 votes) — below the minimum of 3, so gold accuracy flags nobody here,
    # and majority agreement has only one judged annotator: no flag yet.
    assert not any(a.flagged for a in report.annotators)
    # Percent agreement: each of 6 units has ratings (first, first, second): 1 agreeing pair of 3.
    assert report.agreement.percent_agreement == pytest.approx(1 / 3)
    assert report.rounds[0].votes == 18 and report.rounds[0].target_votes == 18
    assert report.rounds[0].complete_items == 6 and report.rounds[0].fraction == 1.0


def test_outlier_flag_with_four_annotators(database, seed):
    # 4 annotators, 4 gold items: a, b, d always right; c always wrong.
    items = [{"id": f"g{i}", "prompt": f"g{i}", "responses": ["right", "wrong"], "gold": 0} for i in range(4)]
    project_id = seed(database, annotators=("a", "b", "c", "d"), overlap=2, records=items)
    for name in "abd":
        answer_all(database, project_id, name, {}, default=first_best)
    answer_all(database, project_id, "c", {}, default=lambda item: ([1, 0], False, None))
    with database.read() as session:
        report = project_report(session, session.get(Project, project_id))
    flagged = {a.username: a.flags for a in report.annotators if a.flagged}
    # gold: a, b, d 1.0, c 0.0, median 1.0 -> c. majority: c's others (a, b, d) all "first" -> 0/4.
    assert set(flagged) == {"c"}
    assert len(flagged["c"]) == 2


def test_progress_target_is_capped_by_annotator_count(database, seed):
    project_id = seed(database, annotators=("a",), overlap=3, records=records(4))
    answer_all(database, project_id, "a", {}, default=first_best)
    with database.read() as session:
        (progress,) = project_report(session, session.get(Project, project_id)).rounds
    # one annotator can give each of 4 items at most one vote: target 4, all complete.
    assert (progress.votes, progress.target_votes, progress.complete_items) == (4, 4, 4)


def test_add_round_numbers_rounds_and_records_model_version(database, seed):
    project_id = seed(database, records=records(2), model_version="sft-v1")
    with database.write() as session:
        project = session.get(Project, project_id)
        second = add_round(session, project, [{"prompt": "p", "responses": ["x", "y"], "model_version": "ppo-7"}])
        session.commit()
        assert (second.number, second.model_version) == (2, "ppo-7")
        with pytest.raises(DataError, match="<records>:1: field 'responses'"):
            add_round(session, project, [{"prompt": "p", "responses": ["only one"]}], "v")


EXPORT_ITEMS = [
    {"id": "p1", "prompt": "What is 2+2?", "responses": ["4", "5"], "model_version": "sft-v1"},
    {"id": "r1", "prompt": [{"role": "user", "content": "Name a colour."}],
     "responses": ["red", "blue", "green", "not a colour"], "model_version": "sft-v1"},
]


@pytest.fixture
def voted(database, seed):
    project_id = seed(database, annotators=("ann1", "ann2"), overlap=2, records=EXPORT_ITEMS)
    # ann1: p1 response 0 better, strength 2; r1 red = blue > green > not a colour.
    answer_all(database, project_id, "ann1", {"p1": ([0, 1], False, 2), "r1": ([0, 0, 1, 2], False, None)})
    # ann2: p1 tie; r1 blue > red > green = not a colour, all bad.
    answer_all(database, project_id, "ann2", {"p1": ([0, 0], False, None), "r1": ([1, 0, 2, 2], True, None)})
    with database.read() as session:
        yield session, session.get(Project, project_id)


PROVENANCE = {"source": "human", "rationale": None, "round": 1, "model_version": "sft-v1", "project": "demo",
              "item_meta": {}}


def test_export_pairs(voted):
    session, project = voted
    out = export_records(session, project, format="pairs")
    p1 = [r for r in out if r["item_id"] == "p1"]
    # Each record names the vote behind it (the loop's lineage lists them).
    vote_of = {username: vote_id for vote_id, username in session.execute(
        select(Vote.id, User.username).join(User, Vote.user_id == User.id).join(Item, Vote.item_id == Item.id)
        .where(Item.external_id == "p1"))}
    assert p1 == [
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "label": 1.0, "margin": 2.0,
         "both_bad": False, "annotator": "ann1", "item_id": "p1", "vote_id": vote_of["ann1"], **PROVENANCE},
        {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "label": 0.5, "margin": None,
         "both_bad": False, "annotator": "ann2", "item_id": "p1", "vote_id": vote_of["ann2"], **PROVENANCE},
    ]
    assert vote_of["ann1"] != vote_of["ann2"]
    ann1_r1 = [(r["chosen"], r["rejected"], r["label"]) for r in out
               if r["item_id"] == "r1" and r["annotator"] == "ann1"]
    # ranks (0, 0, 1, 2): the tie red=blue, then every better-worse pair, in index order.
    assert ann1_r1 == [("red", "blue", 0.5), ("red", "green", 1.0), ("red", "not a colour", 1.0),
                       ("blue", "green", 1.0), ("blue", "not a colour", 1.0), ("green", "not a colour", 1.0)]
    assert all(r["prompt"] == [{"role": "user", "content": "Name a colour."}] for r in out if r["item_id"] == "r1")
    ann2_r1 = [r for r in out if r["item_id"] == "r1" and r["annotator"] == "ann2"]
    assert len(ann2_r1) == 6 and all(r["both_bad"] for r in ann2_r1)
    assert ("blue", "red", 1.0) in [(r["chosen"], r["rejected"], r["label"]) for r in ann2_r1]


def test_export_rankings(voted):
    session, project = voted
    out = export_records(session, project, format="rankings")
    assert [(r["item_id"], r["annotator"], r["ranks"], r["both_bad"]) for r in out] == [
        ("p1", "ann1", [0, 1], False), ("p1", "ann2", [0, 0], False),
        ("r1", "ann1", [0, 0, 1, 2], False), ("r1", "ann2", [1, 0, 2, 2], True)]
    assert out[2]["responses"] == ["red", "blue", "green", "not a colour"]


def test_export_soft_labels_pool_the_annotators(voted):
    session, project = voted
    out = export_records(session, project, format="soft")
    p1 = [r for r in out if r["item_id"] == "p1"]
    # P(4 ≻ 5): ann1 1.0, ann2 0.5 -> mean 0.75; margin: only ann1 gave one (+2) -> 2.0
    assert p1 == [{"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "label": 0.75, "margin": 2.0,
                   "both_bad": False, "annotator": "ann1,ann2", "num_votes": 2, "item_id": "p1", **PROVENANCE}]
    by_pair = {(r["chosen"], r["rejected"]): r["label"] for r in out if r["item_id"] == "r1"}
    # red vs blue: ann1 tie 0.5, ann2 blue ≻ red 0 -> P(red ≻ blue) = 0.25 -> blue chosen, 0.75
    assert by_pair[("blue", "red")] == 0.75
    # green vs not a colour: ann1 1.0, ann2 tie 0.5 -> 0.75
    assert by_pair[("green", "not a colour")] == 0.75
    assert len(by_pair) == 6


def test_export_filters(voted):
    session, project = voted
    assert {r["annotator"] for r in export_records(session, project, exclude_annotators={"ann2"})} == {"ann1"}
    assert export_records(session, project, rounds=[2]) == []
    with pytest.raises(ValueError, match="unknown export format"):
        export_records(session, project, format="csv")


def test_exported_files_read_back_as_training_records(voted, tmp_path):
    readers = pytest.importorskip("rlhfkit.data.readers")
    session, project = voted
    path = tmp_path / "pairs.jsonl"
    assert write_jsonl(export_records(session, project, format="pairs"), path) == 14
    pairs = readers.read_preferences(path)
    assert len(pairs) == 14
    first = pairs[0]
    assert (first.chosen, first.rejected, first.label, first.margin) == ("4", "5", 1.0, 2.0)
    assert first.provenance.annotator == "ann1" and first.provenance.source == "human"
    assert first.provenance.round == 1 and first.provenance.model_version == "sft-v1"
    rankings = tmp_path / "rankings.jsonl"
    write_jsonl(export_records(session, project, format="rankings"), rankings)
    assert len(readers.read_preferences(rankings)) == 14  # rankings expand to the same pairs
    assert json.loads(rankings.read_text().splitlines()[3])["both_bad"] is True


sqlite_only = pytest.mark.skipif(bool(os.environ.get("RLHFKIT_TEST_DATABASE_URL")), reason="checks SQLite settings")


@sqlite_only
def test_schema_version_is_stamped_and_upgrades_run_in_order(database):
    with database.engine.connect() as conn:
        assert conn.execute(text("SELECT version FROM schema_version")).scalar_one() == SCHEMA_VERSION
        assert conn.execute(text("PRAGMA journal_mode")).scalar_one() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar_one() == 2  # FULL

    def add_duration(conn):
        conn.execute(text("ALTER TABLE votes ADD COLUMN duration_ms INTEGER"))

    newer = SCHEMA_VERSION + 1
    assert migrate(database.engine, upgrades={newer: add_duration}, latest=newer) == newer
    assert migrate(database.engine, upgrades={newer: add_duration}, latest=newer) == newer  # idempotent
    with database.engine.connect() as conn:
        columns = [row[1] for row in conn.execute(text("PRAGMA table_info(votes)"))]
        assert "duration_ms" in columns
    with pytest.raises(SchemaError, match="newer than this"):
        migrate(database.engine)  # the code is a version behind the database now


@sqlite_only
def test_write_transactions_take_the_write_lock_first(database):
    # A write session holds SQLite's write lock from its first statement (BEGIN IMMEDIATE),
    # so a second writer waits instead of failing later on a stale snapshot; readers go on.
    import sqlite3

    with database.write() as writer:
        writer.execute(text("SELECT 1")).all()
        other = sqlite3.connect(database.engine.url.database, timeout=0.05, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        with database.read() as reader:
            assert reader.scalar(select(func.count(User.id))) == 0
