"""The loop end to end on the tiny model: rounds registered with their lineage, resumable,
config changes refused, more rounds added later."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.loop import runner
from rlhfkit.loop.registry import Registry, sha256_of
from rlhfkit.loop.runner import STEPS, run_loop


def test_two_rounds_register_lineage_and_report(tiny_loop, tmp_path):
    cfg = tiny_loop(rounds=2)
    events = []
    run_loop(cfg, on_event=lambda r, s, info: events.append((r, s, info["state"])))
    assert [(r, s) for r, s, state in events if state == "done"] == [
        (0, "evaluate"), (0, "register"), *[(r, s) for r in (1, 2) for s in STEPS]]
    out = tmp_path / "loop"
    with Registry(out) as reg:
        rounds = reg.rounds()
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert [r["parent_model"] for r in rounds] == [None, "tiny", "rounds/r1/model/final"]
        assert rounds[2]["model"] == "rounds/r2/model/final"
        assert rounds[2]["model_sha256"] == sha256_of(out / "rounds" / "r2" / "model" / "final")
        assert rounds[1]["config"]["trainer"] == "dpo" and rounds[1]["package_version"]
        ev = rounds[2]["metrics"]["eval"]
        assert ev["n"] == 3 and set(ev["vs_previous"]) >= {"wins", "losses", "p", "win_rate"}
        assert ev["kl_to_round0"]["n_responses"] == 2 and ev["kl_to_round0"]["per_token_k3"] >= 0
        assert rounds[1]["metrics"]["feedback"]["decided"] == 2 and rounds[1]["metrics"]["train"]["pairs"] == 2
        # every file a round produced is hashed in the registry, with its record count
        names = {(a["round"], a["name"]): a for a in reg.artifacts()}
        for name, records in (("prompts", 2), ("samples", 2), ("comparisons", 2), ("labels", 2)):
            art = names[(1, name)]
            assert art["records"] == records and art["sha256"] == sha256_of(out / art["path"])
        assert names[(2, "model")]["path"] == "rounds/r2/model/final"
    assert not list(out.rglob("checkpoints"))          # resume checkpoints go once a round is registered
    round_json = json.loads((out / "rounds" / "r2" / "round.json").read_text())
    assert round_json["parent_model"] == "rounds/r1/model/final" and round_json["artifacts"]
    page = (out / "report.html").read_text()
    assert "round 2" in page and "sign test" in page and "<script" not in page
    assert "round 2 vs round 1" in page          # every later round against every earlier one


def test_a_rerun_skips_recorded_steps_and_a_crash_resumes_at_its_step(tiny_loop, monkeypatch):
    cfg = tiny_loop()
    calls = []
    real_train = runner.step_train

    def crash_once(run, r):
        calls.append(r)
        if len(calls) == 1:
            raise RuntimeError("power cut")
        return real_train(run, r)

    monkeypatch.setattr(runner, "step_train", crash_once)
    with pytest.raises(RuntimeError, match="power cut"):
        run_loop(cfg)
    with Registry(cfg.output_dir) as reg:
        assert [s.step for s in reg.steps()] == ["evaluate", "register", "sample", "compare", "feedback"]
    for step in ("step_sample", "step_compare", "step_feedback"):
        monkeypatch.setattr(runner, step, lambda *a, step=step: pytest.fail(f"{step} ran again"))
    run_loop(cfg)
    assert calls == [1, 1]
    with Registry(cfg.output_dir) as reg:
        assert [r["round"] for r in reg.rounds()] == [0, 1]


def test_another_config_in_the_same_folder_is_refused_but_more_rounds_are_fine(tiny_loop, snapshot):
    run_loop(tiny_loop())
    with pytest.raises(ConfigError, match=r"changed: lr"):
        run_loop(tiny_loop(lr=1.0))
    before = snapshot(tiny_loop().output_dir)
    run_loop(tiny_loop(rounds=2))
    after = snapshot(tiny_loop().output_dir)
    assert after["steps"][: len(before["steps"])] == before["steps"]
    assert [r["round"] for r in after["rounds"]] == [0, 1, 2]


def test_no_decided_pair_keeps_the_parent_policy(tiny_loop):
    # the exact checkers on a random tiny model: every answer is wrong, so every pair is a tie
    cfg = tiny_loop(feedback=("rules",), kl_prompts=0)
    run_loop(cfg)
    with Registry(cfg.output_dir) as reg:
        r1 = reg.rounds()[1]
    assert r1["metrics"]["train"]["skipped"].startswith("no decided pair")
    assert r1["model"] == "tiny" and r1["metrics"]["eval"]["vs_round0"]["p"] == 1.0


@pytest.mark.parametrize("trainer", ["expert_iteration", "ipo"])
def test_other_trainers_and_training_from_the_start(tiny_loop, trainer):
    cfg = tiny_loop(trainer=trainer, init="start", rounds=2, kl_prompts=0)
    run_loop(cfg)
    with Registry(cfg.output_dir) as reg:
        r2 = reg.rounds()[2]
    assert r2["metrics"]["train"]["init"] == "tiny"          # from round 0's policy …
    assert r2["metrics"]["train"]["pairs"] == 4              # … on both rounds' labels
    assert r2["parent_model"] == "rounds/r1/model/final"
