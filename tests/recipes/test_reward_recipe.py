"""Reward-model recipe end to end on the tiny model, its evaluation by hand, and `rlhf rm`."""

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from rlhfkit.config import ConfigError
from rlhfkit.data.schemas import PreferencePair, as_conversation
from rlhfkit.eval.reward import (
    evaluate_reward_model,
    expected_calibration_error,
    pair_calibration,
    reward_histogram,
)
from rlhfkit.models.reward import RewardModel, tiny_reward_model
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes.reward import RewardConfig, run_reward
from rlhfkit.train.metrics import read_metrics

WORDS = ["sun", "cat", "map", "red", "box", "owl", "ink", "jam"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the
    thread pool's waiting costs ten times the work itself."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write_marker_pairs(path: Path, n: int, seed: int = 0, tie_every: int = 3) -> Path:
    """Separable preferences: the chosen response says "good" where the rejected says "evil"
    (same length, same filler, same place), so only the marker word decides. Every
    `tie_every`-th record is a tie (label 0.5) between "good" and "fine", a word no clear
    pair contains: only the ties say where "fine" stands (level with "good")."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            filler = [rng.choice(WORDS) for _ in range(2)]
            k = rng.randrange(3)
            good = " ".join(filler[:k] + ["good"] + filler[k:])
            evil = " ".join(filler[:k] + ["evil"] + filler[k:])
            record = {"prompt": f"Q{i}", "chosen": good, "rejected": evil}
            if i % tie_every == 0:
                record = {"prompt": f"Q{i}", "chosen": good, "rejected": good.replace("good", "fine"),
                          "label": 0.5}
            f.write(json.dumps(record) + "\n")
    return path


def _cfg(tmp, out, **kw) -> RewardConfig:
    base = {"model": "tiny", "train_data": str(_write_marker_pairs(tmp / "prefs.jsonl", 96)),
            "output_dir": str(out), "max_steps": 24, "batch_size": 8, "lr": 3e-3, "precision": "fp32",
            "progress": False, "seed": 0, "test_fraction": 0.25, "packing": False}
    base.update(kw)
    return RewardConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    cfg = _cfg(tmp, tmp / "run")
    return {"cfg": cfg, "result": run_reward(cfg), "tmp": tmp}


# ----------------------------------------------------------------------------- training

def test_bradley_terry_learns_a_separable_preference_with_ties(trained):
    result, cfg = trained["result"], trained["cfg"]
    data = result["data"]
    assert data["train_pairs"] + data["eval_pairs"] == 96 and data["eval_pairs"] >= 12
    assert data["train_ties"] > 0 and data["eval_ties"] > 0

    # Before training: the fresh model (what the recipe starts from) does not know the marker.
    from rlhfkit.data.preference import split_by_prompt
    from rlhfkit.data.readers import read_preferences

    _, held_out = split_by_prompt(read_preferences(cfg.train_data), cfg.test_fraction, seed=cfg.seed)
    assert len(held_out) == data["eval_pairs"]
    before = evaluate_reward_model(tiny_reward_model(seed=0), tiny_tokenizer(), held_out)
    assert before["accuracy"] < 0.9

    after = result["eval"]
    assert after["num_ties"] == data["eval_ties"] and after["num_non_tie"] == data["eval_pairs"] - data["eval_ties"]
    assert after["accuracy"] > 0.9
    # Ties were learned as ties, not dropped or read as preferences: held-out "good" vs "fine"
    # rewards end up much closer than a clear pair's (a label-1 reading would widen that gap too).
    assert after["tie_mean_abs_delta"] < 0.25 * after["mean_margin"]
    assert 0 <= after["ece"] < 0.5

    metrics = [m for m in read_metrics(Path(cfg.output_dir)) if "loss" in m]
    # Fresh heads give rewards ≈ 0, so the first loss is ≈ ln 2 for clear pairs and ties alike.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
    assert metrics[-1]["loss"] < 0.35
    assert {"rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected"} <= set(metrics[-1])
    saved = json.loads((Path(cfg.output_dir) / "eval_report.json").read_text())
    assert saved["accuracy"] == after["accuracy"] and len(saved["histogram"]["edges"]) == 21


@torch.no_grad()
def test_the_final_model_reloads_as_a_plain_sequence_classifier(trained):
    from transformers import AutoModelForSequenceClassification

    final = Path(trained["result"]["final"])
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    assert model.config.num_labels == 1
    from rlhfkit.data.preference import split_by_prompt
    from rlhfkit.data.readers import read_preferences

    cfg = trained["cfg"]
    _, held_out = split_by_prompt(read_preferences(cfg.train_data), cfg.test_fraction, seed=cfg.seed)
    again = evaluate_reward_model(model, tiny_tokenizer(), held_out)
    assert again["accuracy"] == trained["result"]["eval"]["accuracy"]
    assert again["loss"] == pytest.approx(trained["result"]["eval"]["loss"], abs=1e-5)


def test_packed_pairs_sharing_their_prompt_train_as_unshared_ones(tmp_path, monkeypatch):
    # share_prompts (the default): each packed pair's prompt stored once; last-token pooling
    # reads each side's own end, so 4 steps log the unshared run's losses and gradient norms.
    from rlhfkit.data import preference_batches

    calls = []
    real = preference_batches.collate_shared_prompts
    monkeypatch.setattr(preference_batches, "collate_shared_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = {"max_steps": 4, "batch_size": 4, "packing": True, "n_heads": 2, "use_margin": True, "test_fraction": 0.0}
    run_reward(_cfg(tmp_path, tmp_path / "plain", share_prompts=False, **kw))
    assert not calls
    run_reward(_cfg(tmp_path, tmp_path / "shared", **kw))
    assert calls
    plain = {m["step"]: m for m in read_metrics(tmp_path / "plain") if "loss" in m}
    shared = {m["step"]: m for m in read_metrics(tmp_path / "shared") if "loss" in m}
    for step in (1, 2, 3, 4):
        assert shared[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-5)
        assert shared[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=1e-4)


def test_resume_with_heads_margin_noise_and_centering_gives_identical_losses(tmp_path):
    kw = {"max_steps": 4, "save_every": 2, "batch_size": 4, "packing": True, "n_heads": 2, "ensemble_mode": "min",
          "use_margin": True, "label_noise": 0.1, "center_coef": 0.01, "test_fraction": 0.0}
    full = tmp_path / "full"
    result = run_reward(_cfg(tmp_path, full, **kw))
    died = tmp_path / "died"  # a run killed right after its step-2 checkpoint
    (died / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", died / "checkpoints" / "step-000002")
    (died / "checkpoints" / "latest").write_text("step-000002\n")
    run_reward(_cfg(tmp_path, died, **kw))
    a = {m["step"]: m for m in read_metrics(full) if "loss" in m}
    b = {m["step"]: m for m in read_metrics(died) if "loss" in m}
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], abs=1e-6)
    assert a[4]["rewards/ensemble_spread"] > 0 and a[4]["rewards/centering_sq"] >= 0
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(result["final"]).num_labels == 2


def test_train_reward_model_on_a_small_export(tmp_path, train_reward_model_on_export):
    path = tmp_path / "export.jsonl"
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}"}], "chosen": "yes good", "rejected": "no",
             "label": 1.0, "margin": None, "both_bad": False, "annotator": "ann1", "source": "human"}
            for i in range(5)]
    rows.append({"prompt": "rank these", "responses": ["a", "b", "c"], "ranks": [0, 1, 1]})  # b = c tie
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = train_reward_model_on_export(str(path), steps=2, output_dir=tmp_path / "rm")
    assert result["data"]["train_pairs"] == 8 and result["data"]["train_ties"] == 1
    assert (Path(result["final"]) / "config.json").exists()


@pytest.mark.parametrize("use_margin", [False, True])
def test_margins_reach_the_loss_only_when_asked(tmp_path, use_margin):
    path = tmp_path / "margins.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}", "chosen": "good", "rejected": "evil", "margin": 2.0})
                            + "\n" for i in range(4)))
    result = run_reward(_cfg(tmp_path, tmp_path / "run", train_data=str(path), max_steps=1, batch_size=4,
                             test_fraction=0.0, use_margin=use_margin))
    # Fresh heads: r_c ≈ r_r ≈ 0 (|r| ~ 0.1), so the step-1 loss is −log σ(0 − m):
    # ln 2 = 0.693 without the margin, −log σ(−2) = 2.127 with m = 2.
    expected = -math.log(1 / (1 + math.exp(2.0))) if use_margin else math.log(2)
    assert result["metrics"]["loss"] == pytest.approx(expected, abs=0.1)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="label_noise"):
        RewardConfig(train_data="x.jsonl", label_noise=0.5)
    with pytest.raises(ConfigError, match="mean_minus_std"):
        RewardConfig(train_data="x.jsonl", ensemble_mode="mean_minus_std")
    with pytest.raises(ConfigError, match="train_data"):
        RewardConfig()


# ----------------------------------------------------------------------------- evaluation by hand

def test_expected_calibration_error_by_hand():
    # 10 bins. bin 0: {0.05 → 0}: |0 − 0.05| = 0.05;  bin 1: {0.15 → 1, 0.12 → 0}: |0.5 − 0.135| = 0.365;
    # bin 9: {0.95 → 1}: 0.05.  ECE = (1·0.05 + 2·0.365 + 1·0.05) / 4 = 0.2075
    probs = torch.tensor([0.05, 0.15, 0.12, 0.95])
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(0.2075, abs=1e-7)
    # Calibrated: 0.75 predicted, 3 of 4 happened.
    assert expected_calibration_error(torch.full((4,), 0.75), torch.tensor([1.0, 1, 1, 0])) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error(torch.zeros(0), torch.zeros(0)))


def test_pair_calibration_uses_both_orientations_by_hand():
    # Δ = [0, ln 3] → σ = [0.5, 0.75]; with the flipped copies: probs [0.5, 0.75, 0.5, 0.25],
    # labels [1, 1, 0, 0]. bin 5: {0.5 → 1, 0.5 → 0}: gap 0; bin 7: {0.75 → 1}: 0.25; bin 2: {0.25 → 0}: 0.25.
    # ECE = (0 + 0.25 + 0.25) / 4 = 0.125
    ece, table = pair_calibration(torch.tensor([0.0, math.log(3)]), torch.tensor([1.0, 1.0]))
    assert ece == pytest.approx(0.125, abs=1e-7)
    assert table["count"].tolist() == [0, 0, 1, 0, 0, 2, 0, 1, 0, 0]


def test_reward_histogram_by_hand():
    # range [0, 1], 2 bins: edges [0, 0.5, 1]; 0 → bin 0, 1 → bin 1 (last bin closed), 0.5 → bin 1.
    h = reward_histogram(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), n_bins=2)
    assert h == {"edges": [0.0, 0.5, 1.0], "chosen": [1.0, 1.0], "rejected": [0.0, 2.0]}


class _CountBangs(RewardModel):
    """A stand-in reward model: the reward of a sequence is its number of '!' tokens."""

    def __init__(self, bang_id: int):
        nn.Module.__init__(self)
        self.bang_id = bang_id
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, so the device can be read

    @property
    def n_heads(self) -> int:
        return 1

    def forward(self, batch):
        bangs = (batch.input_ids == self.bang_id).float()
        if batch.packed:
            out = torch.zeros(batch.num_examples)
            return out.index_add(0, batch.segment_ids[0], bangs[0])
        return (bangs * batch.attention_mask).sum(-1)


@pytest.mark.parametrize("packed", [True, False])
def test_evaluate_reward_model_by_hand(packed):
    tok = tiny_tokenizer()
    (bang,) = tok("!", add_special_tokens=False)["input_ids"]
    pair = lambda c, r, label=1.0: PreferencePair(as_conversation("x"), c, r, label=label)
    pairs = [pair("a!!", "a"),            # Δ = 2: right
             pair("b", "b!"),             # Δ = −1: wrong
             pair("c!", "d!", 0.5),       # tie, |Δ| = 0
             pair("e!!!", "f", 0.5)]      # tie, |Δ| = 3
    report = evaluate_reward_model(_CountBangs(bang), tok, pairs, packed=packed)
    assert report["num_pairs"] == 4 and report["num_ties"] == 2 and report["num_non_tie"] == 2
    assert report["accuracy"] == 0.5
    assert report["mean_margin"] == pytest.approx((2 - 1) / 2)
    assert report["tie_mean_abs_delta"] == pytest.approx(1.5)
    s = lambda x: 1 / (1 + math.exp(-x))
    # −log σ(2), −log σ(−1), a tie at Δ=0 costs ln 2, a tie at Δ=3 costs −½(log σ(3) + log σ(−3))
    loss = (-math.log(s(2)) - math.log(s(-1)) + math.log(2) - 0.5 * (math.log(s(3)) + math.log(s(-3)))) / 4
    assert report["loss"] == pytest.approx(loss, abs=1e-6)
    # non-tie Δ = [2, −1], labels 1: σ(2) = 0.881 (bin 8, gap 0.119) and its flip 0.119 (bin 1, gap 0.119);
    # σ(−1) = 0.269 (bin 2, gap 0.731) and its flip 0.731 (bin 7, gap 0.731) → ECE = (2·0.119 + 2·0.731)/4
    assert report["ece"] == pytest.approx((2 * (1 - s(2)) + 2 * (1 - s(-1))) / 4, abs=1e-9)
    assert sum(report["histogram"]["chosen"]) == 4 and sum(report["histogram"]["rejected"]) == 4


# ----------------------------------------------------------------------------- the `rlhf rm` commands

def test_rm_cli_eval_score_help_and_bad_data(trained, tmp_path):
    from typer.testing import CliRunner

    from rlhfkit.cli import app

    runner = CliRunner(env={"COLUMNS": "400"})  # rich wraps long paths at the terminal width
    final = trained["result"]["final"]
    help_text = runner.invoke(app, ["rm", "train", "--help"]).output
    assert "rlhf rm train --train-data prefs.jsonl" in help_text and "--n-heads" in help_text
    for command in ("eval", "score"):
        assert f"rlhf rm {command} --model runs/rm/final" in runner.invoke(app, ["rm", command, "--help"]).output

    res = runner.invoke(app, ["rm", "eval", "--model", final, "--data", trained["cfg"].train_data,
                              "--out", str(tmp_path / "report.json")])
    assert res.exit_code == 0, res.output
    assert "accuracy" in res.output and json.loads((tmp_path / "report.json").read_text())["num_pairs"] == 96

    responses = tmp_path / "responses.jsonl"
    responses.write_text(json.dumps({"prompt": "Q1", "response": "sun good cat", "id": 7}) + "\n"
                         + json.dumps({"prompt": "Q1", "response": "sun evil cat"}) + "\n")
    res = runner.invoke(app, ["rm", "score", "--model", final, "--data", str(responses),
                              "--out", str(tmp_path / "scored.jsonl")])
    assert res.exit_code == 0, res.output
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["id"] == 7 and scored[0]["reward"] > scored[1]["reward"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    res = runner.invoke(app, ["rm", "train", "--model", "tiny", "--train-data", str(bad),
                              "--output-dir", str(tmp_path / "x")])
    assert res.exit_code == 2 and "bad.jsonl:2: field 'rejected': missing" in " ".join(res.output.split())
    res = runner.invoke(app, ["rm", "eval", "--model", str(tmp_path / "nope"), "--data", trained["cfg"].train_data])
    assert res.exit_code == 2 and "no such reward model folder" in res.output
