"""Machine feedback on a round's pairs: the exact checkers first, then the next source."""

from __future__ import annotations

from rlhfkit.data.schemas import as_conversation
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.feedback import machine_labels, rules_labels
from rlhfkit.rollout.prompts import RLPrompt, demo_prompts

WRONG = "The answer is 987654321."


def _pool():
    return demo_prompts("train", 2, seed=0)[:4] + [RLPrompt(as_conversation("Write a haiku."))]


def _pairs(pool):
    right = [p.meta["task"].reference for p in pool[:4]]
    return [{"id": "c0", "index": 0, "task_id": "t0", "prompt": [], "a": right[0], "b": WRONG},
            {"id": "c1", "index": 1, "task_id": "t1", "prompt": [], "a": WRONG, "b": right[1]},
            {"id": "c2", "index": 2, "task_id": "t2", "prompt": [], "a": WRONG, "b": WRONG + " "},
            {"id": "c3", "index": 4, "task_id": None, "prompt": [], "a": "x", "b": "y"}]


def test_rules_prefer_the_right_answer_and_leave_the_rest_undecided():
    pool = _pool()
    labels = rules_labels(LoopConfig(), pool, _pairs(pool), round=1)
    assert [lab and (lab["chosen"] == _pairs(pool)[i]["a"]) for i, lab in enumerate(labels)] == [True, False, None,
                                                                                                  None]
    assert labels[1]["chosen"] == pool[1].meta["task"].reference and labels[1]["source"] == "rules"


def test_label_noise_flips_about_that_share_deterministically():
    pool = _pool()
    pairs = [dict(_pairs(pool)[0], id=f"c{i}") for i in range(400)]
    noisy = rules_labels(LoopConfig(label_noise=0.25), pool, pairs, round=1)
    flipped = sum(lab["chosen"] == WRONG for lab in noisy)
    assert 70 <= flipped <= 130                                   # 100 expected; binomial sd ≈ 8.7
    assert noisy == rules_labels(LoopConfig(label_noise=0.25), pool, pairs, round=1)


def test_sources_in_order_each_pair_labeled_by_the_first_that_decides(loop_files):
    pool = _pool()
    cfg = LoopConfig(feedback=("rules", f"rm:{loop_files['rm']}"))
    labels, counts = machine_labels(cfg, pool, _pairs(pool), round=1)
    assert [lab["source"] for lab in labels] == ["rules", "rules", "rm", "rm"]
    assert counts == {"rules": 2, "rm": 2, "undecided": 0}
    only_rules, counts = machine_labels(LoopConfig(feedback=("rules",)), pool, _pairs(pool), round=1)
    assert [lab["label"] for lab in only_rules] == [1.0, 1.0, 0.5, 0.5] and counts["undecided"] == 2
    assert only_rules[3]["source"] == "none"


def test_sample_gold_accuracy_counts_checkable_prompts_only():
    from rlhfkit.loop.runner import sample_gold_accuracy

    pool = _pool()
    right = pool[0].meta["task"].reference
    samples = [{"index": 0, "responses": [right, WRONG, right, right]},
               {"index": 4, "responses": ["a haiku", "another"]}]          # open prompt: not counted
    assert sample_gold_accuracy(pool, samples) == 0.75
    assert sample_gold_accuracy(pool, samples[1:]) is None


def test_a_judge_labels_only_the_pairs_it_decides_in_both_orders(monkeypatch):
    from rlhfkit.judge.backends import ScriptedBackend
    from rlhfkit.loop import feedback

    def prefers_good(conversation):     # a consistent judge: the answer containing "good" wins
        text = conversation[-1].content
        a = text.split("[Answer A]")[1].split("[Answer B]")[0]
        b = text.split("[Answer B]")[1]
        if ("good" in a) == ("good" in b):
            return "Verdict: tie"
        return "Verdict: A" if "good" in a else "Verdict: B"

    monkeypatch.setattr(feedback, "backend_from_spec", lambda spec, **kw: ScriptedBackend(prefers_good, name=spec))
    pairs = [{"id": "c0", "index": 4, "task_id": None, "prompt": [{"role": "user", "content": "Hi"}],
              "a": "bad", "b": "good"},
             {"id": "c1", "index": 4, "task_id": None, "prompt": [{"role": "user", "content": "Hi"}],
              "a": "meh", "b": "bad"}]
    labels, counts = machine_labels(LoopConfig(feedback=("judge:local:some/model",)), _pool(), pairs, round=1)
    assert counts == {"judge": 1, "undecided": 1}
    assert (labels[0]["chosen"], labels[0]["source"], labels[0]["annotator"]) == ("good", "judge", "local:some/model")
    assert labels[1]["label"] == 0.5 and labels[1]["source"] == "none"
