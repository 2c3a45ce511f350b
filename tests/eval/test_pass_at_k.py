"""pass@k and majority vote by hand, and `rlhf eval --samples-per-prompt n --pass-k ...` on the tiny model
with scripted samples (a random tiny model answers nothing right)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from rlhfkit.data.schemas import as_conversation, prompt_text
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.eval import pass_at_k as pass_at_k_module
from rlhfkit.eval.evaluate import EvalConfig
from rlhfkit.eval.pass_at_k import majority_answer, majority_correct, pass_at_k, sample_scores
from rlhfkit.eval.prompts import load_eval_prompts
from rlhfkit.eval.report import write_report
from rlhfkit.rollout.generate import Generation


def test_pass_at_k_by_hand():
    # n = 5, c = 2, k = 2: 1 − C(3,2)/C(5,2) = 1 − 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # pass@1 is c/n; no correct sample gives 0; n − c < k gives 1 (every k-subset holds a correct one)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0
    # n = 4, c = 1, k = 2: 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # large n stays exact where the binomials would overflow a float: n = 2000, c = 1, k = 1000 → k/n = 0.5
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5)
    assert pass_at_k(2000, 3, 10) == pytest.approx(1 - math.comb(1997, 10) / math.comb(2000, 10))
    with pytest.raises(ValueError, match="k must be in"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="correct count"):
        pass_at_k(3, 4, 1)


def test_majority_vote_ties_go_to_the_answer_given_first():
    assert majority_answer(["7", "8", "8"]) == "8"
    assert majority_answer(["9", "7", "8", "7", "8"]) == "7"  # 7 and 8 tie; 7's first vote is earlier
    assert majority_answer([None, None, "3"]) == "3"  # no answer, no vote
    assert majority_answer([None, None]) is None
    assert majority_correct([False, True, True], ["1", "2", "2"])
    assert not majority_correct([True, False, False], ["2", "1", "1"])
    assert not majority_correct([False, False], [None, None])


def test_sample_scores_average_over_prompts():
    # prompt A: [right, wrong, wrong] (answers 5, 3, 3): pass@1 1/3, pass@2 1 − C(2,2)/C(3,2) = 2/3, vote wrong
    # prompt B: [wrong, right, right] (answers 4, 5, 5): pass@1 2/3, pass@2 1,                        vote right
    out = sample_scores([[True, False, False], [False, True, True]], [["5", "3", "3"], ["4", "5", "5"]], [2],
                        n_boot=200)
    assert out["pass_at_k"]["1"]["mean"] == pytest.approx(0.5)
    assert out["pass_at_k"]["2"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert out["majority_vote"]["mean"] == pytest.approx(0.5)
    assert (out["samples_per_prompt"], out["prompts"]) == (3, 2)
    low, high = out["majority_vote"]["ci_low"], out["majority_vote"]["ci_high"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0


def test_pass_k_must_fit_the_samples():
    with pytest.raises(ValueError, match=r"pass_k values must be in \[1, samples_per_prompt = 3\]"):
        EvalConfig(model=("tiny",), samples_per_prompt=3, pass_k=(4,))


@pytest.fixture
def scripted_samples(monkeypatch):
    """Samples of the checkable prompts: prompts 0 and 1 get [wrong, wrong, right] (one wrong answer
    twice), the others [right, wrong, other wrong] (three answers tied: the first, right, wins)."""
    gold = {prompt_text(as_conversation(p.task.prompt)): p.task.answer
            for p in load_eval_prompts("demo", n_per_family=1, seed=0) if p.checkable}

    def fake_generate(model, tokenizer, prompts, cfg, *, progress=False):
        out = []
        for i, p in enumerate(prompts):
            right = f"Answer: {gold[prompt_text(p)]}"
            texts = (["Answer: zzz", "Answer: zzz", right] if i < 2 else [right, "Answer: zzz", "Answer: yyy"])
            assert cfg.n == 3 and cfg.temperature == 1.0
            for text in texts:
                out.append(Generation(i, text, encode_prompt(tokenizer, p), [tokenizer.eos_token_id], True))
        return out

    monkeypatch.setattr(pass_at_k_module, "generate", fake_generate)


def test_cli_eval_reports_pass_at_k_and_majority_vote(tmp_path, scripted_samples, restore_root_logger):
    from rlhfkit.cli import app

    out = tmp_path / "ev"
    result = CliRunner(env={"COLUMNS": "260", "NO_COLOR": "1"}).invoke(
        app, ["eval", "--model", "tiny", "--judge", "none", "--n-per-family", "1", "--max-new-tokens", "4",
              "--samples-per-prompt", "3", "--pass-k", "2", "--sample-prompts", "1", "--n-boot", "100",
              "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    (model,) = json.loads((out / "eval.json").read_text())["models"]
    block = model["sampled_accuracy"]
    # every prompt has c = 1 of n = 3: pass@1 = 1/3, pass@2 = 1 − C(2,2)/C(3,2) = 2/3;
    # majority: prompts 0, 1 vote "zzz" (wrong), prompts 2, 3 a three-way tie won by the first, right
    assert (block["samples_per_prompt"], block["prompts"]) == (3, 4)
    assert sorted(block["pass_at_k"]) == ["1", "2"]
    assert block["pass_at_k"]["1"]["mean"] == pytest.approx(1 / 3)
    assert block["pass_at_k"]["2"]["mean"] == pytest.approx(2 / 3)
    assert block["majority_vote"]["mean"] == pytest.approx(0.5)
    assert "p@1 33.3% · p@2 66.7% · maj 50.0%" in " ".join(result.output.split())
    page = write_report([out], tmp_path / "report.html").read_text()
    assert "pass@2" in page and "66.7%" in page and "majority vote" in page

    bad = CliRunner().invoke(app, ["eval", "--model", "tiny", "--samples-per-prompt", "2", "--pass-k", "3",
                                   "--output-dir", str(tmp_path / "x")])
    assert bad.exit_code == 2
    assert "pass_k values must be in [1, samples_per_prompt = 2]" in " ".join(bad.output.split())
