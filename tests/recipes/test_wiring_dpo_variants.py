"""Wiring of the newer DPO-family options through `run_dpo` (one step, tiny model, fp32), as in
test_wiring_dpo.py: at step 1 the policy is the reference, so every reward r = β(π − ref) is 0 and
each loss's step-1 value and gradient follow from its equation. With g_i = ∇(π_c,i − π_r,i) and
G = ‖mean_i g_i‖:

    apo_zero   1 − σ(r_c) + σ(r_r):           L = 1,       ∂L/∂r_c = −¼, ∂L/∂r_r = ¼  ⇒ ‖∇‖ = β/4 · G
    apo_down   σ(r_c) + 1 − σ(r_c − r_r):     L = 1,       ∂L/∂r_c = 0,  ∂L/∂r_r = ¼  ⇒ β/4 · ‖mean ∇π_r‖
    bco_pair   −log σ(r_c − δ) − log σ(δ − r_r), δ = 0:  L = 2 ln 2, ∂ = ∓½          ⇒ β/2 · G
    nca_pair   −log σ(r_c) − ½log σ(−r_c) − ½log σ(−r_r): L = 2 ln 2, ∂ = −¼, ¼      ⇒ β/4 · G
    exo_pair   KL(Bern(σ(r_c − r_r)) ‖ Bern(1 − ε)): L = −ln 2 − ½ ln(ε(1 − ε)),
               ∂L/∂(r_c − r_r) = −¼ ln((1 − ε)/ε)                                  ⇒ β/4 · ln((1 − ε)/ε) · G
    ipo + ipo_average: h = π_c/|y_c| − π_r/|y_r| − (same for ref): L = 1/(4β²),
               ∇L = −(1/β) mean_i(∇π_c,i/|y_c,i| − ∇π_r,i/|y_r,i|)
    nll_reduction=token: the preferred NLL is Σ(−π_c)/Σ|y_c| over the step's single micro-batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.train.metrics import read_metrics

SEED = 3
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon"]
LN2 = math.log(2)


def chosen_text(w: str, varied: bool) -> str:
    """w + " +"; with `varied`, 1 to 3 " +" so that the chosen responses differ in length."""
    return w + " +" * (1 + WORDS.index(w) % 3 if varied else 1)


def run_step1(tmp_path: Path, varied: bool = False, **overrides) -> dict:
    records = [{"prompt": f"Name {w}.", "chosen": chosen_text(w, varied), "rejected": w} for w in WORDS]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = DPOConfig(model="tiny", train_data=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                    batch_size=16, lr=1e-3, precision="fp32", progress=False, seed=SEED, max_grad_norm=1e9,
                    **overrides)
    run_dpo(cfg)
    (row,) = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    return row


def encoded(w: str, varied: bool = False):
    tok = tiny_tokenizer()
    return (encode_pair(tok, as_conversation(f"Name {w}."), chosen_text(w, varied)),
            encode_pair(tok, as_conversation(f"Name {w}."), w))


def logp(model, enc, token_logprobs_from_logits) -> torch.Tensor:
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits
    return token_logprobs_from_logits(logits, torch.tensor([enc.labels])).sum()


def tokens(enc) -> int:
    return sum(lab != -100 for lab in enc.labels)


def grad_norm(weights, token_logprobs_from_logits) -> float:
    """‖∇ Σ_i [w_c(i)·π_c,i + w_r(i)·π_r,i]‖ at the starting model; weights(c, r) → (w_c, w_r)."""
    model = tiny_causal_lm(seed=SEED)
    total = 0.0
    for w in WORDS:
        c, r = encoded(w)
        w_c, w_r = weights(c, r)
        total = total + w_c * logp(model, c, token_logprobs_from_logits)
        total = total + w_r * logp(model, r, token_logprobs_from_logits)
    total.backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))


N = len(WORDS)
EPS = 1e-3
# (loss, overrides, step-1 loss, β-factor, gradient weights per pair (w_c, w_r) before the factor)
CASES = [
    ("apo_zero", {}, 1.0, 0.1 / 4, lambda c, r: (1 / N, -1 / N)),
    ("apo_zero", {"beta": 0.4}, 1.0, 0.4 / 4, lambda c, r: (1 / N, -1 / N)),
    ("apo_down", {"beta": 0.4}, 1.0, 0.4 / 4, lambda c, r: (0.0, 1 / N)),
    ("bco_pair", {"beta": 0.4}, 2 * LN2, 0.4 / 2, lambda c, r: (1 / N, -1 / N)),
    ("nca_pair", {"beta": 0.4}, 2 * LN2, 0.4 / 4, lambda c, r: (1 / N, -1 / N)),
    ("exo_pair", {}, -LN2 - 0.5 * math.log(EPS * (1 - EPS)), 0.1 / 4 * math.log((1 - EPS) / EPS),
     lambda c, r: (1 / N, -1 / N)),
    ("exo_pair", {"beta": 0.4, "label_smoothing": 0.2}, -LN2 - 0.5 * math.log(0.16), 0.4 / 4 * math.log(4),
     lambda c, r: (1 / N, -1 / N)),
    ("ipo", {"beta": 0.5, "ipo_average": True}, 1.0, 1 / 0.5,
     lambda c, r: (1 / (N * tokens(c)), -1 / (N * tokens(r)))),
]


@pytest.mark.parametrize("loss,hyper,expected_loss,factor,weights", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[1].items()) or 'defaults'}" for c in CASES])
def test_step1_loss_and_gradient_of_the_new_losses(tmp_path, token_logprobs_from_logits, loss, hyper, expected_loss,
                                                   factor, weights):
    row = run_step1(tmp_path, loss=loss, **hyper)
    assert row["units"] == N
    assert row["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(factor * grad_norm(weights, token_logprobs_from_logits), rel=1e-3)


def test_token_nll_reduction_reaches_rpo_and_orpo(tmp_path, token_logprobs_from_logits):
    model = tiny_causal_lm(seed=SEED)
    with torch.no_grad():
        sums = [(float(logp(model, c, token_logprobs_from_logits)), tokens(c))
                for c, _ in (encoded(w, varied=True) for w in WORDS)]
    token_mean = -sum(s for s, _ in sums) / sum(n for _, n in sums)
    sequence_mean = sum(-s / n for s, n in sums) / N
    assert token_mean != pytest.approx(sequence_mean, abs=1e-3)  # the two would not tell a mix-up apart
    row = run_step1(tmp_path / "rpo", varied=True, nll_weight=0.7, nll_reduction="token")
    assert row["nll/preferred"] == pytest.approx(token_mean, abs=1e-4)
    assert row["loss"] == pytest.approx(LN2 + 0.7 * token_mean, abs=1e-4)
    row = run_step1(tmp_path / "orpo", varied=True, loss="orpo", nll_reduction="token")
    assert row["orpo/nll"] == pytest.approx(token_mean, abs=1e-4)
