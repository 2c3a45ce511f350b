"""Rounds with settings of their own (`per_round`): another prompt pool, another feedback source,
another trainer — and which of them may still change once the loop has begun."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.registry import Registry
from rlhfkit.loop.runner import run_loop

from .conftest import write_jsonl


def test_a_round_can_change_its_prompts_feedback_and_trainer(tiny_loop, tmp_path):
    other = write_jsonl(tmp_path / "other.jsonl", [
        {"prompt": f"Spell {w} backwards.", "answer": w[::-1], "task_id": f"rev-{w}"} for w in ("cat", "dog", "owl")])
    cfg = tiny_loop(rounds=3, kl_prompts=0, per_round={2: {"prompts": other, "feedback": ["rules"], "trainer": "ipo",
                                                           "prompts_per_round": 3}})
    run_loop(cfg)
    out = tmp_path / "loop"
    with Registry(out) as reg:
        rounds = {r["round"]: r for r in reg.rounds()}
    # round 2 sampled the other pool, labeled with the checkers and trained IPO …
    r2_prompts = [json.loads(line) for line in (out / "rounds" / "r2" / "prompts.jsonl").read_text().splitlines()]
    assert sorted(p["task_id"] for p in r2_prompts) == ["rev-cat", "rev-dog", "rev-owl"]
    assert rounds[2]["config"]["feedback"] == ["rules"] and rounds[2]["config"]["trainer"] == "ipo"
    assert rounds[2]["metrics"]["feedback"]["decided_by"] == {"rules": 0, "undecided": 3}
    # … while rounds 1 and 3 kept the loop's own settings, round 3 taking the next fresh prompts of the pool
    for r in (1, 3):
        assert rounds[r]["config"]["feedback"] == [tiny_loop().feedback[0]] and rounds[r]["config"]["trainer"] == "dpo"
    def task_ids(r):
        return {json.loads(line)["task_id"] for line in (out / "rounds" / f"r{r}" / "prompts.jsonl").open()}
    first, third = task_ids(1), task_ids(3)
    assert len(first) == len(third) == 2 and not first & third
    assert all(i.startswith("add-") for i in first | third)
    page = (out / "report.html").read_text()
    assert "vary per round" in page and "feedback rules · trainer ipo" in page


def test_settings_of_rounds_not_yet_begun_may_change_but_not_of_finished_ones(tiny_loop):
    run_loop(tiny_loop(kl_prompts=0))
    with pytest.raises(ConfigError, match=r"changed: per_round 1\b"):
        run_loop(tiny_loop(kl_prompts=0, per_round={1: {"lr": 0.5}}))
    run_loop(tiny_loop(kl_prompts=0, rounds=2, per_round={2: {"lr": 0.5}}))   # round 2 had not begun
    with Registry(tiny_loop().output_dir) as reg:
        assert [r["config"]["lr"] for r in reg.rounds()] == [1e-3, 1e-3, 0.5]


@pytest.mark.parametrize(("per_round", "message"), [
    ({0: {"lr": 1}}, "per_round: round 0 — rounds with settings of their own start at 1"),
    ({"two": {"lr": 1}}, "per_round: 'two' is not a round number"),
    ({2: {"seed": 3}}, "per_round 2: 'seed' cannot change per round; a round may set prompts, "),
    ({2: {"feedback": ["human", "rules"]}},
     "per_round 2: human feedback cannot be mixed with other sources (its round waits for votes)"),
    ({2: {"lr": -1.0}}, "per_round 2: lr must be > 0"),
    ({2: ["lr"]}, "per_round 2: expected a mapping of settings, got ['lr']"),
    ("[1, 2]", "'per_round' must map round numbers to settings, got [1, 2]"),
])
def test_bad_round_settings_are_refused_with_the_round_named(per_round, message):
    with pytest.raises(ConfigError) as e:
        LoopConfig(per_round=per_round)
    assert str(e.value).startswith(message)


def test_round_settings_survive_a_save_and_the_command_line_form(tmp_path):
    cfg = LoopConfig(per_round="{3: {feedback: [human], overlap: 2}}")      # --per-round '{3: {...}}'
    assert cfg.per_round == {"3": {"feedback": ["human"], "overlap": 2}}
    assert cfg.for_round(3).feedback == ("human",) and cfg.for_round(3).overlap == 2
    assert cfg.for_round(2) is cfg
    cfg.save(tmp_path / "loop.yaml")
    assert LoopConfig.load(tmp_path / "loop.yaml") == cfg
