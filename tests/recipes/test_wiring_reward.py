"""Wiring of the reward-model recipe's loss options to the math, through `run_reward` and its
metrics.jsonl only.

With one pair per step (batch_size = 1), the logged `rewards/chosen`, `rewards/rejected` and
`rewards/margin` are that pair's r_c, r_r and Δ = r_c − r_r, from the same forward as the
logged loss. So every step's loss can be recomputed by hand from its own Δ:

    Bradley–Terry, label l, margin m, mis-click rate ε:
        P(Δ) = (1 − ε)·σ(Δ − m) + ε·σ(−(Δ − m))
        loss = −[ l·log P  +  (1 − l)·log(1 − P) ]
    reward centering: loss = BT + c·(r_c + r_r)²

Three steps with a large learning rate make Δ move well away from its initial ~0.01, so a
recipe that ignored ε, the margin, the label or the centering coefficient (or replaced one
with a constant) logs a loss that misses the hand value by far more than the tolerance.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.data.preference_batches import collate_pairs, encode_preference_pairs
from rlhfkit.data.readers import read_preferences
from rlhfkit.losses.reward import ensemble_reduce
from rlhfkit.models.reward import load_reward_model
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes.reward import RewardConfig, run_reward
from rlhfkit.train.metrics import read_metrics

WORDS = ["sun", "cat", "map"]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def bt_by_hand(delta: float, *, label: float = 1.0, margin: float = 0.0, noise: float = 0.0) -> float:
    d = delta - margin
    p = (1 - noise) * math.exp(log_sigmoid(d)) + noise * math.exp(log_sigmoid(-d))
    not_p = (1 - noise) * math.exp(log_sigmoid(-d)) + noise * math.exp(log_sigmoid(d))
    return -(label * math.log(p) + (1 - label) * math.log(not_p))


def write_pairs(path: Path, *, label: float | None = None, margin: float | None = None,
                words=WORDS) -> Path:
    with open(path, "w") as f:
        for w in words:
            rec = {"prompt": f"Rate {w}.", "chosen": f"good {w}", "rejected": f"evil {w}"}
            if label is not None:
                rec["label"] = label
            if margin is not None:
                rec["margin"] = margin
            f.write(json.dumps(rec) + "\n")
    return path


def run_rows(tmp_path: Path, data: Path, **overrides) -> list[dict]:
    # Padded (length-grouped) batches: the pair order these checks were sized on, where Δ moves
    # well away from 0 in 3 steps. The packed layout (the default) computes the same losses on
    # the same batches (test_packed_and_padded_layouts_log_the_same_steps).
    base = dict(model="tiny", train_data=str(data), output_dir=str(tmp_path / "run"), max_steps=3, batch_size=1,
                lr=5e-2, schedule="constant", precision="fp32", progress=False, seed=1, test_fraction=0.0,
                packing=False)
    base.update(overrides)
    run_reward(RewardConfig(**base))
    rows = [r for r in read_metrics(base["output_dir"]) if "loss" in r]
    assert [r["units"] for r in rows] == [float(base["batch_size"])] * base["max_steps"]
    return rows


def delta(row: dict) -> float:
    assert row["rewards/margin"] == pytest.approx(row["rewards/chosen"] - row["rewards/rejected"], abs=1e-6)
    return row["rewards/margin"]


def assert_has_power(rows: list[dict]) -> None:
    # The hand checks below separate the right formula from a wrong one by ≈ ε·|Δ| or more.
    assert max(abs(delta(r)) for r in rows) > 0.05, [delta(r) for r in rows]


@pytest.mark.parametrize("noise", [0.0, 0.2, 0.4])
def test_label_noise_is_the_mis_click_rate_of_the_loss(tmp_path, noise):
    rows = run_rows(tmp_path, write_pairs(tmp_path / "p.jsonl"), label_noise=noise)
    assert_has_power(rows)
    for row in rows:
        assert row["loss/bradley_terry"] == pytest.approx(bt_by_hand(delta(row), noise=noise), abs=1e-6)
        assert row["loss"] == pytest.approx(row["loss/bradley_terry"], abs=1e-7)


@pytest.mark.parametrize("use_margin", [True, False])
def test_use_margin_subtracts_the_pairs_margin_inside_the_sigmoid(tmp_path, use_margin):
    # Every pair carries margin 2: −log σ(Δ − 2) when use_margin, −log σ(Δ) otherwise.
    rows = run_rows(tmp_path, write_pairs(tmp_path / "p.jsonl", margin=2.0), use_margin=use_margin)
    for row in rows:
        expected = bt_by_hand(delta(row), margin=2.0 if use_margin else 0.0)
        assert row["loss"] == pytest.approx(expected, abs=1e-6)
    if use_margin:  # Δ ≈ 0 at step 1: −log σ(−2) = 2.1269 vs ln 2
        assert rows[0]["loss"] > 2.0


def test_margin_and_noise_combine(tmp_path):
    rows = run_rows(tmp_path, write_pairs(tmp_path / "p.jsonl", margin=1.0), use_margin=True, label_noise=0.3)
    for row in rows:
        assert row["loss"] == pytest.approx(bt_by_hand(delta(row), margin=1.0, noise=0.3), abs=1e-6)


def test_a_tie_label_reaches_the_loss(tmp_path):
    # label ½: −½[log σ(Δ) + log σ(−Δ)], symmetric in Δ, minimal (ln 2) at Δ = 0.
    rows = run_rows(tmp_path, write_pairs(tmp_path / "p.jsonl", label=0.5))
    for row in rows:
        assert row["loss"] == pytest.approx(bt_by_hand(delta(row), label=0.5), abs=1e-6)
    # and a soft label 0.8: −[0.8 log σ(Δ) + 0.2 log σ(−Δ)]
    rows = run_rows(tmp_path / "soft", write_pairs(tmp_path / "q.jsonl", label=0.8))
    assert_has_power(rows)
    for row in rows:
        assert row["loss"] == pytest.approx(bt_by_hand(delta(row), label=0.8), abs=1e-6)


@pytest.mark.parametrize("coef", [0.0, 0.3])
def test_center_coef_weights_the_squared_reward_sum(tmp_path, coef):
    rows = run_rows(tmp_path, write_pairs(tmp_path / "p.jsonl"), center_coef=coef)
    for row in rows:
        rc, rr = row["rewards/chosen"], row["rewards/rejected"]
        assert row["loss/bradley_terry"] == pytest.approx(bt_by_hand(rc - rr), abs=1e-6)
        assert row["loss"] == pytest.approx(bt_by_hand(rc - rr) + coef * (rc + rr) ** 2, abs=1e-6)
        if coef:
            assert row["rewards/centering_sq"] == pytest.approx((rc + rr) ** 2, rel=1e-4, abs=1e-7)
        else:
            assert "rewards/centering_sq" not in row
    # the check has power: at some step c·(r_c + r_r)² is far above the tolerance
    assert max(0.3 * (r["rewards/chosen"] + r["rewards/rejected"]) ** 2 for r in rows) > 1e-3


@pytest.mark.parametrize("mode", ["mean", "min"])
def test_ensemble_heads_each_train_and_the_mode_combines_them(tmp_path, mode):
    # One pair, one step, 2 heads: the loss is the mean over heads of each head's BT loss, and
    # the logged rewards are the heads combined by `ensemble_mode`. Per-head rewards by hand
    # from the starting reward model (load_reward_model with the recipe's seed).
    data = write_pairs(tmp_path / "p.jsonl", words=["sun"])
    rows = run_rows(tmp_path, data, n_heads=2, ensemble_mode=mode, max_steps=1)
    tok = tiny_tokenizer()
    model = load_reward_model("tiny", n_heads=2, seed=1, pad_token_id=tok.pad_token_id)
    batch = collate_pairs(encode_preference_pairs(tok, read_preferences(data)), tok.pad_token_id, packed=False)
    with torch.no_grad():
        rewards = model(batch.sequences).double()          # (E = 2, 2B = 2): [chosen, rejected]
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    assert (chosen[0] - chosen[1]).abs() > 1e-3            # the heads differ, so mean ≠ min
    expected_loss = sum(bt_by_hand(float(c - r)) for c, r in zip(chosen, rejected)) / 2
    (row,) = rows
    assert row["loss"] == pytest.approx(expected_loss, abs=1e-6)
    assert row["rewards/chosen"] == pytest.approx(float(ensemble_reduce(chosen[:, None], mode)[0]), abs=1e-6)
    assert row["rewards/rejected"] == pytest.approx(float(ensemble_reduce(rejected[:, None], mode)[0]), abs=1e-6)
    assert row["rewards/ensemble_spread"] == pytest.approx(
        float((chosen.std() + rejected.std()) / 2), abs=1e-6)


def test_packed_and_padded_layouts_log_the_same_steps(tmp_path):
    # One micro-batch holds every pair, so both layouts train on the same batch each step: the
    # packed row with each prompt stored once (the default) logs the padded run's losses and Δ
    # step after step, through updates that move Δ far from 0.
    data = write_pairs(tmp_path / "p.jsonl")
    padded, packed = (run_rows(tmp_path / name, data, max_steps=4, batch_size=3, packing=name == "packed")
                      for name in ("padded", "packed"))
    assert max(abs(delta(r)) for r in padded) > 0.5
    for a, b in zip(padded, packed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4)
        assert delta(b) == pytest.approx(delta(a), abs=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
