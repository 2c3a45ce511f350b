"""Evaluation prompts without a checker, judged: each round's greedy answers against round 0's and
the previous round's, in both orders, with a judge scripted so the expected counts follow by hand."""

from __future__ import annotations

import json

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.data.schemas import as_conversation
from rlhfkit.judge.backends import ScriptedBackend
from rlhfkit.judge.pairwise import PairwiseJudge
from rlhfkit.loop import evaluate, feedback
from rlhfkit.loop.evaluate import judged
from rlhfkit.loop.registry import Registry
from rlhfkit.loop.runner import run_loop, write_loop_report
from rlhfkit.rollout.prompts import RLPrompt

from .conftest import write_jsonl


def _answers(conversation) -> tuple[str, str]:
    text = conversation[-1].content
    a = text.split("[Answer A]")[1].split("[Answer B]")[0]
    b = text.split("[Answer B]")[1].split("\n\nThink briefly")[0]     # the template's instructions follow B
    return a.strip(), b.strip()


def prefers_good(conversation) -> str:           # consistent: the answer containing "good" wins
    a, b = _answers(conversation)
    if ("good" in a) == ("good" in b):
        return "Verdict: tie"
    return "Verdict: A" if "good" in a else "Verdict: B"


def prefers_longer(conversation) -> str:         # consistent, and decides most pairs of real answers
    a, b = _answers(conversation)
    return "Verdict: tie" if len(a) == len(b) else ("Verdict: A" if len(a) > len(b) else "Verdict: B")


def test_judged_counts_wins_losses_ties_and_agreeing_orders():
    judge = PairwiseJudge(ScriptedBackend(prefers_good), both_orders=True)
    prompts = [RLPrompt(as_conversation(f"q{i}")) for i in range(4)]
    block = judged(judge, prompts, ["good", "bad", "same", "meh"], ["bad", "good", "same", "bad"])
    assert {k: block[k] for k in ("n", "wins", "losses", "ties", "identical", "p", "win_rate", "orders_agree")} == {
        "n": 4, "wins": 1, "losses": 1, "ties": 2, "identical": 1, "p": 1.0, "win_rate": 0.5, "orders_agree": 1.0}
    assert len(judge.backend.requests) == 6                  # 3 differing pairs × 2 orders; "same" is not asked
    first = PairwiseJudge(ScriptedBackend(lambda c: "Verdict: A"), both_orders=True)   # pure position bias
    block = judged(first, prompts[:2], ["good", "x"], ["bad", "y"])
    assert (block["wins"], block["losses"], block["ties"], block["orders_agree"]) == (0, 0, 2, 0.0)
    with pytest.raises(ValueError, match="3 prompts, 2 and 2 answers"):
        judged(judge, prompts[:3], ["a", "b"], ["a", "b"])


@pytest.fixture
def open_eval(loop_files, tmp_path):
    """3 checkable evaluation prompts (the tiny loop's) + 2 open ones."""
    rows = [json.loads(line) for line in open(loop_files["eval"])]
    rows += [{"prompt": "Write a line about the sea.", "task_id": "open-sea"},
             {"prompt": "Name a colour you like.", "task_id": "open-colour"}]
    return write_jsonl(tmp_path / "eval_open.jsonl", rows)


def test_open_prompts_are_judged_against_round_0_and_the_previous_round(tiny_loop, open_eval, monkeypatch, tmp_path):
    # The tiny random model answers every open prompt with "", so each round's greedy answers are
    # scripted (round r: "a" × (r+1) and "b" × max(1, 3 − 2r)); the judge prefers the longer answer.
    monkeypatch.setattr(feedback, "backend_from_spec", lambda spec, **kw: ScriptedBackend(prefers_longer, name=spec))
    scripted = {0: ["a", "bbb"], 1: ["aa", "b"], 2: ["aaa", "b"]}
    calls = []

    def greedy(model, tokenizer, prompts, **kw):
        calls.append([p.id for p in prompts])
        return scripted[len(calls) - 1]

    monkeypatch.setattr(evaluate, "greedy_answers", greedy)
    cfg = tiny_loop(rounds=2, eval_tasks=open_eval, eval_judge="judge:local:some/judge", kl_prompts=0)
    run_loop(cfg)
    assert calls == [["open-sea", "open-colour"]] * 3          # only the open prompts, once per round
    out = tmp_path / "loop"
    assert json.loads((out / "rounds" / "r1" / "eval.json").read_text())["open_responses"] == ["aa", "b"]
    with Registry(out) as reg:
        ev = {r["round"]: r["metrics"]["eval"] for r in reg.rounds()}
    assert ev[0]["n"] == 3 and "judge_vs_round0" not in ev[0]      # the checkable ones keep their exact match
    counts = {(r, key): tuple(ev[r][key][k] for k in ("wins", "losses", "ties", "identical"))
              for r, key in ((1, "judge_vs_round0"), (1, "judge_vs_previous"), (2, "judge_vs_round0"),
                             (2, "judge_vs_previous"))}
    assert counts == {(1, "judge_vs_round0"): (1, 1, 0, 0),      # aa > a, b < bbb
                      (1, "judge_vs_previous"): (1, 1, 0, 0),     # round 0 is round 1's previous round
                      (2, "judge_vs_round0"): (1, 1, 0, 0),      # aaa > a, b < bbb
                      (2, "judge_vs_previous"): (1, 0, 1, 1)}    # aaa > aa, b = b (not asked)
    assert ev[2]["judge_vs_previous"]["win_rate"] == 0.75 and ev[2]["judge_vs_previous"]["orders_agree"] == 1.0
    assert ev[2]["judge_vs_round0"]["judge"] == "local:some/judge"
    page = write_loop_report(out).read_text()
    assert "Open prompts, judged" in page and "+1 / −0 / =1" in page


def test_a_judge_alone_evaluates_a_loop_without_checkable_prompts(tiny_loop, tmp_path, monkeypatch):
    monkeypatch.setattr(feedback, "backend_from_spec", lambda spec, **kw: ScriptedBackend(prefers_longer, name=spec))
    only_open = write_jsonl(tmp_path / "open.jsonl", [{"prompt": f"Say something about {w}."} for w in ("rain", "sun")])
    with pytest.raises(ConfigError, match="has no checkable prompt .* name a judge with --eval-judge"):
        run_loop(tiny_loop(eval_tasks=only_open, kl_prompts=0))
    cfg = tiny_loop(output_dir=str(tmp_path / "judged"), eval_tasks=only_open, eval_judge="judge", kl_prompts=0)
    run_loop(cfg)
    with Registry(cfg.output_dir) as reg:
        ev = reg.rounds()[1]["metrics"]["eval"]
    assert ev["accuracy"] is None and ev["n"] == 0 and "vs_round0" not in ev
    assert ev["judge_vs_round0"]["n"] == 2
    assert "Open prompts, judged" in write_loop_report(cfg.output_dir).read_text()


def test_eval_judge_must_name_a_judge(tiny_loop):
    with pytest.raises(ConfigError, match="eval_judge 'rules' must be judge, judge:local:PATH or judge:URL"):
        tiny_loop(eval_judge="rules")
