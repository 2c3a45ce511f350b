"""`rlhf report`: one self-contained page with the plots and tables, user text escaped, nothing
fetched from outside; the demo folder layout is read too."""

from __future__ import annotations

import base64
import json
import logging
import math
import random
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhfkit.data.errors import DataError
from rlhfkit.eval.plots import over_optimization_keys
from rlhfkit.eval.report import render_report, write_report
from rlhfkit.eval.runs import collect

EVIL = "<script>alert('pwned')</script> & <b>bold</b>"


def _jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _stage(root: Path, name: str, content: dict) -> None:
    (root / "stages").mkdir(parents=True, exist_ok=True)
    (root / "stages" / f"{name}.json").write_text(json.dumps(content, indent=2))


def _accuracy(label: str, acc: float, n: int, samples: list[dict], wall: float) -> dict:
    return {"label": label, "accuracy": acc, "ci_low": max(0.0, acc - 0.08), "ci_high": min(1.0, acc + 0.08), "n": n,
            "per_family": {"arithmetic": acc + 0.05, "format": acc - 0.05, "strings": acc, "units": acc},
            "mean_response_words": 9.5, "samples": samples, "wall_s": wall}


def make_synthetic_run(root: Path, *, with_over_optimization: bool = True) -> Path:
    """A run folder shaped like the demo's: stages/*.json, sub-runs with metrics.jsonl, an eval.json."""
    rng = random.Random(0)
    _jsonl(root / "sft" / "metrics.jsonl",
           [{"step": s, "loss": 2.5 * math.exp(-s / 25) + 0.4 + rng.gauss(0, 0.05), "grad_norm": 1 + rng.random(),
             "lr": 1e-4 * min(1, s / 6), "units": 60.0, "tokens_per_s": 6000.0} for s in range(1, 61)]
           + [{"step": s, "eval_loss": 2.0 * math.exp(-s / 25) + 0.6} for s in (20, 40, 60)])
    _jsonl(root / "rm" / "metrics.jsonl",
           [{"step": s, "loss": 0.69 - 0.2 * (1 - math.exp(-s / 15)) + rng.gauss(0, 0.02),
             "rewards/accuracy": min(1.0, 0.5 + 0.3 * (1 - math.exp(-s / 15)) + rng.gauss(0, 0.05)),
             "rewards/margin": 0.8 * (1 - math.exp(-s / 15)), "eval_accuracy": "nan"} for s in range(1, 41)])
    rows = []
    for s in range(1, 81):
        kl = 0.05 * s + rng.gauss(0, 0.1)
        row = {"step": s, "loss": rng.gauss(0, 0.1), "reward": 0.2 + 0.01 * s + rng.gauss(0, 0.05), "kl": kl,
               "entropy": 2.0 - 0.015 * s + rng.gauss(0, 0.03), "response_length": 20 + 0.3 * s + rng.gauss(0, 1)}
        if with_over_optimization:
            row["reward/proxy"] = 0.3 * math.sqrt(max(kl, 0)) + rng.gauss(0, 0.03)
            row["reward/gold"] = 0.4 + 0.25 * kl - 0.08 * kl * kl + rng.gauss(0, 0.03)
        rows.append(row)
    _jsonl(root / "grpo" / "metrics.jsonl", rows)

    samples = [{"task_id": "arithmetic-test-0000", "prompt": "What is 7 + 5?", "response": "7 + 5 = 12.\nAnswer: 12",
                "correct": True},
               {"task_id": "strings-test-0000", "prompt": "Spell 'desk' backwards.", "response": EVIL,
                "correct": False}]
    _stage(root, "data", {"train_examples": 480, "test_prompts": 125, "test_checkable": 100, "wall_s": 0.4})
    _stage(root, "eval_base", _accuracy("embedded model (before)", 0.18, 100, samples, 35.0))
    _stage(root, "sft", {"final": "sft/final", "train_loss": 0.45, "wall_s": 120.0})
    _stage(root, "eval_sft", _accuracy("after SFT", 0.46, 100, samples, 31.2))
    _stage(root, "preferences", {"train": {"pairs": 300, "ties": 40, "flipped": 25, "noise": 0.1},
                                 "test": {"pairs": 80, "ties": 9, "flipped": 0, "noise": 0.0},
                                 "sampled_accuracy": 0.41, "wall_s": 60.0})
    _stage(root, "rm", {"label": "reward model (demo)", "final": "rm/final", "eval_accuracy": 0.71,
                        "eval_ece": 0.06, "eval_pairs": 80, "train_pairs": 300, "wall_s": 55.0,
                        "histogram": {"edges": [i / 4 - 2 for i in range(17)],
                                      "chosen": [0, 1, 1, 2, 3, 5, 7, 9, 10, 9, 8, 6, 4, 3, 2, 1],
                                      "rejected": [1, 2, 4, 6, 8, 10, 9, 8, 6, 5, 3, 2, 1, 1, 0, 0]}})

    def model(name, acc, wr, lc, kl, tokens, d2, ss, ref=False):
        block = {"name": name, "path": f"runs/demo/{name}/final", "is_reference": ref,
                 "exact_match": {"accuracy": acc, "ci_low": acc - 0.09, "ci_high": acc + 0.09, "n": 100,
                                 "per_family": {"arithmetic": acc, "units": acc + 0.04}, "mean_response_words": 11.0},
                 "kl": {"mean": kl, "ci_low": kl * 0.8, "ci_high": kl * 1.2, "per_token": kl / 20,
                        "per_token_k3": kl / 22, "n_responses": 64, "n_tokens": 1300},
                 "length": {"mean_words": tokens * 0.7, "mean_tokens": tokens, "median_tokens": tokens,
                            "open_truncated": 0.1},
                 "diversity": {"distinct_1": 0.4, "distinct_2": d2, "within_prompt_self_similarity": ss,
                               "across_prompt_self_similarity": 0.1, "n_samples": 64, "n_prompts": 16},
                 "calibration": None, "reward": {"mean": acc * 2 - 0.5, "std": 0.3, "n": 125}}
        if wr is not None:
            block["win_rate"] = {"mean": wr, "ci_low": wr - 0.1, "ci_high": wr + 0.1, "n": 25, "wins": 14,
                                 "ties": 4, "losses": 7, "inconsistent": 4, "position_bias": 0.08}
            block["lc_win_rate"] = {"mean": lc, "ci_low": lc - 0.12, "ci_high": lc + 0.12, "n": 25,
                                    "length_coef": 0.6}
        return block

    evaluation = {
        "version": 1, "tasks": "demo", "prompts": {"checkable": 100, "open": 25, "sampled": 16},
        "reference": {"name": "sft", "path": "runs/demo/sft/final"},
        "judge": {"name": "local:embedded", "model": "SmolLM2-135M-Instruct", "template": "pairwise"},
        "reward_model": {"path": "runs/demo/rm/final", "num_pairs": 80, "accuracy": 0.71, "ece": 0.06},
        "models": [model("sft", 0.46, None, None, 0.0, 24.0, 0.62, 0.31, ref=True),
                   model("dpo", 0.52, 0.64, 0.58, 3.1, 31.0, 0.55, 0.38),
                   model("grpo", 0.61, 0.71, 0.69, 5.4, 27.0, 0.41, 0.52)],
        "samples": [{"id": "open-test-0000", "family": "open", "prompt": "Give me a tip for " + EVIL,
                     "answer": None, "reference": "Drink water.",
                     "responses": {"sft": {"text": "Drink water.", "correct": None},
                                   "dpo": {"text": "Stay hydrated and sleep well.", "correct": None},
                                   "grpo": {"text": "Sleep eight hours.", "correct": None}}},
                    {"id": "arithmetic-test-0000", "family": "arithmetic", "prompt": "What is 7 + 5?", "answer": "12",
                     "responses": {"sft": {"text": "Answer: 12", "correct": True},
                                   "dpo": {"text": "Answer: 13", "correct": False},
                                   "grpo": {"text": "7 + 5 = 12.\nAnswer: 12", "correct": True}}}],
        "wall_s": 90.0}
    (root / "eval").mkdir(parents=True, exist_ok=True)
    (root / "eval" / "eval.json").write_text(json.dumps(evaluation, indent=2))
    return root


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    root = make_synthetic_run(tmp_path_factory.mktemp("runs") / "demo")
    out = write_report([root], root / "report.html")
    return out.read_text()


def _images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_has_every_plot_and_table(page):
    for heading in ("Models at a glance", "Gold accuracy per stage", "Win rates", "Reward model",
                    "Reward over-optimization", "Training curves", "Length, diversity, KL", "Sample outputs",
                    "Wall time per stage"):
        assert f">{heading}</h2>" in page, heading
    images = _images(page)
    # summary win rates, accuracy intervals, RM histogram, over-optimization, 3 training grids
    assert len(images) == 7
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    # Win-rate table: interval and W/T/L of the synthetic dpo model (0.64 ± 0.1).
    assert '64.0% <span class="ci">[54.0%, 74.0%]</span>' in page and "14 / 4 / 7" in page
    assert "after SFT" in page and "embedded model (before)" in page  # demo stage labels
    assert "71.0%" in page  # the reward model's held-out accuracy
    assert "35.0 s" in page  # wall time of a stage


def test_user_text_is_escaped(page):
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>bold</b>" not in page


def test_the_page_needs_nothing_from_outside(page):
    assert not re.search(r"https?://", page)
    assert not re.search(r"<(link|iframe|object|embed)\b", page, re.IGNORECASE)
    assert "@import" not in page and "url(" not in page
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', page))


def test_over_optimization_needs_proxy_gold_and_kl(tmp_path):
    root = make_synthetic_run(tmp_path / "run", with_over_optimization=False)
    data = collect([root])
    assert [r.label for r in data.training] == ["sft", "rm", "grpo"]  # pipeline order
    assert all(over_optimization_keys(r) is None for r in data.training)
    page = render_report(data)
    assert "Reward over-optimization" not in page and "Training curves" in page
    grpo = next(r for r in data.training if r.label == "grpo")
    grpo.rows[0]["reward/proxy"], grpo.rows[0]["gold_accuracy"] = 0.1, 0.5
    assert over_optimization_keys(grpo) == ("reward/proxy", "gold_accuracy")


def test_non_numbers_in_metrics_are_skipped(tmp_path):
    root = make_synthetic_run(tmp_path / "run")
    rm = next(r for r in collect([root]).training if r.label == "rm")
    assert "eval_accuracy" not in rm.keys()  # logged as the string "nan" only
    assert rm.series("rewards/margin")[0][:3] == [1.0, 2.0, 3.0]


def test_several_runs_are_labelled_by_folder(tmp_path):
    a = make_synthetic_run(tmp_path / "a")
    single = tmp_path / "ppo"
    _jsonl(single / "metrics.jsonl", [{"step": 1, "loss": 1.0, "kl": 0.1}, {"step": 2, "loss": 0.5, "kl": 0.2}])
    (single / "eval.json").write_text((a / "eval" / "eval.json").read_text())
    data = collect([a, single])
    labels = [r.label for r in data.training]
    assert labels == ["a/sft", "a/rm", "a/grpo", "ppo"]
    assert [source for source, _ in data.evals] == ["a/eval", "ppo"]
    page = render_report(data)  # two evals: each model row names its eval
    assert "dpo (a/eval)" in page and "dpo (ppo)" in page


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="no such run folder"):
        collect([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="nothing to report"):
        collect([tmp_path / "empty"])
    _jsonl(tmp_path / "broken" / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    with open(tmp_path / "broken" / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl:2"):
        collect([tmp_path / "broken"])


def test_cli_report_writes_into_the_run_folder(tmp_path):
    from rlhfkit.cli import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        run = tmp_path / "grpo"
        _jsonl(run / "metrics.jsonl", [{"step": s, "loss": 1 / s, "reward": s / 10} for s in range(1, 6)])
        result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, ["report", str(run)])
        assert result.exit_code == 0, result.output
        assert (run / "report.html").is_file() and "report.html" in result.output
        missing = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(app, ["report", str(tmp_path / "nope")])
        assert missing.exit_code == 2 and "no such run folder" in missing.output
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
