"""The simulated annotator: gold-driven choices, mis-click rate, ties, provenance."""

import pytest

from rlhfkit.demo.preferences import pair_to_record, simulate_preferences
from rlhfkit.tasks.generate import make_tasks


def _tasks_and_responses(n=40):
    tasks = [t for t in make_tasks("train", n, families=("arithmetic",))]
    responses = [[t.reference, "Answer: -1", "I am not sure.\nAnswer: -2"] for t in tasks]
    return tasks, responses


def test_noise_free_labels_always_prefer_the_correct_response():
    tasks, responses = _tasks_and_responses()
    pairs, stats = simulate_preferences(tasks, responses, noise=0.0, seed=0)
    decided = [p for p in pairs if p.label == 1.0]
    ties = [p for p in pairs if p.label == 0.5]
    # per prompt: 2 pairs (reference vs each wrong one) decided, 1 tie (both wrong)
    assert len(decided) == 2 * len(tasks) and len(ties) == len(tasks) == stats.ties
    task_of = {t.prompt: t for t in tasks}
    assert all(p.chosen == task_of[p.prompt[0].content].reference for p in decided)
    assert all(p.both_bad for p in ties)
    assert stats.flipped == 0
    assert all(p.provenance.source == "synthetic" and p.provenance.annotator for p in pairs)


def test_mis_click_rate_is_respected():
    tasks, responses = _tasks_and_responses(400)
    pairs, stats = simulate_preferences(tasks, responses, noise=0.25, seed=1)
    decided = [p for p in pairs if p.label == 1.0]
    wrong = sum(p.meta["gold_label"] == 0.0 for p in decided)
    assert wrong == stats.flipped
    assert wrong / len(decided) == pytest.approx(0.25, abs=0.04)  # 800 pairs: ±3σ ≈ 0.046


def test_records_round_trip_through_the_reader(tmp_path):
    import json

    from rlhfkit.data.readers import read_preferences

    tasks, responses = _tasks_and_responses(3)
    pairs, _ = simulate_preferences(tasks, responses, noise=0.0, seed=0, model_version="sft")
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(pair_to_record(p)) + "\n" for p in pairs))
    back = read_preferences(path)
    assert [(b.chosen, b.rejected, b.label, b.both_bad) for b in back] == \
           [(p.chosen, p.rejected, p.label, p.both_bad) for p in pairs]
    assert back[0].provenance.model_version == "sft"
