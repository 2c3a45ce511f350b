"""Wiring of every DPOConfig loss hyper-parameter to the math, through `run_dpo` and its
metrics.jsonl only (one optimizer step on the tiny model, fp32).

At step 1 the policy equals the reference, so every log-ratio difference h_i is 0 and each
loss has a step-1 value and gradient that depend on its hyper-parameters in closed form.
With g_i = ∇_θ h_i = ∇_θ(π_c,i − π_r,i) (the reference is a constant) and
G = ‖(1/N) Σ_i g_i‖ over the N pairs of the step, computed here from a plain forward of the
starting model:

    dpo     L = −[t·log σ(βh) + (1 − t)·log σ(−βh)],  t = 1 − ε
            L(0) = ln 2;   ∂L/∂h(0) = −β(t − ½) = −β(1 − 2ε)/2     ⇒ ‖∇‖ = β(1 − 2ε)/2 · G
    ipo     L = (h − 1/(2β))²:  L(0) = 1/(4β²);  ∂L/∂h(0) = −1/β          ⇒ ‖∇‖ = G/β
    hinge   L = max(0, 1 − βh): L(0) = 1;       ∂L/∂h(0) = −β            ⇒ ‖∇‖ = β·G
    robust  L = [(1 − ε)f(βh) − ε f(−βh)]/(1 − 2ε), f(x) = −log σ(x):
            L(0) = ln 2;  ∂L/∂h(0) = β[(1 − ε)(−½) − ε(½)]/(1 − 2ε) = −β/(2(1 − 2ε))

So each hyper-parameter is pinned by the logged step-1 loss and/or the logged pre-clip
gradient norm (clipping off: max_grad_norm = 1e9). A recipe that ignored a value or replaced
it with a constant/default logs a different number. The reference-free losses (SimPO,
ORPO), RPO's NLL weight and KTO's weights are pinned by their step-1 losses computed from
the starting model's log-probs.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.train.metrics import read_metrics

SEED = 3
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon"]
LN2 = math.log(2)


# ----------------------------------------------------------------------------- helpers


def pair_records(words=WORDS, ties=()):
    """{"prompt", "chosen", "rejected"[, "label"]}: chosen = word + " +", rejected = word;
    the words in `ties` are tied pairs (label 0.5) instead."""
    out = []
    for w in words:
        rec = {"prompt": f"Name {w}.", "chosen": f"{w} +", "rejected": w}
        if w in ties:
            rec["label"] = 0.5
        out.append(rec)
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run_step1(tmp_path: Path, records, **overrides) -> dict:
    """run_dpo for one step over all records in one micro-batch; the step-1 metrics row."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DPOConfig(model="tiny", train_data=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                    batch_size=16, lr=1e-3, precision="fp32", progress=False, seed=SEED, max_grad_norm=1e9,
                    **overrides)
    run_dpo(cfg)
    (row,) = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    return row


def encode(prompt: str, response: str):
    return encode_pair(tiny_tokenizer(), as_conversation(prompt), response)


def response_tokens(enc) -> int:
    return sum(lab != -100 for lab in enc.labels)


def sequence_logp(model, enc, token_logprobs_from_logits) -> torch.Tensor:
    """Σ log π over the response tokens, plain full-logits forward (keeps the graph);
    `token_logprobs_from_logits` is the conftest fixture, passed down by the tests."""
    logits = model(input_ids=torch.tensor([enc.input_ids])).logits
    return token_logprobs_from_logits(logits, torch.tensor([enc.labels])).sum()


def grad_norm_of(weighted: list[tuple[object, float]], token_logprobs_from_logits) -> float:
    """‖∇_θ Σ_k w_k · π(seq_k)‖ at the starting model."""
    model = tiny_causal_lm(seed=SEED)
    total = sum(w * sequence_logp(model, enc, token_logprobs_from_logits) for enc, w in weighted)
    total.backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))


def pair_gradient(words, token_logprobs_from_logits) -> float:
    """G = ‖(1/N) Σ_i ∇(π_c,i − π_r,i)‖ over the pairs of `words`."""
    n = len(words)
    weighted = []
    for w in words:
        weighted += [(encode(f"Name {w}.", f"{w} +"), 1.0 / n), (encode(f"Name {w}.", w), -1.0 / n)]
    return grad_norm_of(weighted, token_logprobs_from_logits)


@pytest.fixture(scope="module")
def G(token_logprobs_from_logits) -> float:
    return pair_gradient(WORDS, token_logprobs_from_logits)


@pytest.fixture(scope="module")
def start_logps(token_logprobs_from_logits):
    """(π_c, π_r, |y_c|, |y_r|) per pair of WORDS, float64, from the starting model."""
    model = tiny_causal_lm(seed=SEED)
    rows = []
    with torch.no_grad():
        for w in WORDS:
            c, r = encode(f"Name {w}.", f"{w} +"), encode(f"Name {w}.", w)
            rows.append([float(sequence_logp(model, c, token_logprobs_from_logits)),
                         float(sequence_logp(model, r, token_logprobs_from_logits)),
                         response_tokens(c), response_tokens(r)])
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, 0], t[:, 1], t[:, 2], t[:, 3]


# ----------------------------------------------------------------------------- β, ε, flip rate

# (loss, config values, step-1 loss, gradient norm / G). None = the per-loss default
# (LOSS_DEFAULTS: β = 0.1, ε = 0, flip rate 0.1), pinned too.
STEP1 = [
    ("dpo", {}, LN2, 0.1 / 2),                                          # β(1 − 2ε)/2, β = .1, ε = 0
    ("dpo", {"beta": 0.4}, LN2, 0.4 / 2),                               # 4× the β = 0.1 gradient
    ("dpo", {"label_smoothing": 0.25}, LN2, 0.1 * 0.5 / 2),             # (1 − 2·0.25) = ½
    ("dpo", {"beta": 0.4, "label_smoothing": 0.1}, LN2, 0.4 * 0.8 / 2),
    ("dpo", {"beta": 0.4, "label_smoothing": 0.5}, LN2, 0.0),           # ε = ½ erases the label
    ("ipo", {}, 1 / (4 * 0.1 ** 2), 1 / 0.1),                           # (1/(2β))² = 25, 1/β = 10
    ("ipo", {"beta": 0.25}, 4.0, 4.0),                                  # 2² = 4, 1/β = 4
    ("ipo", {"beta": 0.5}, 1.0, 2.0),
    ("hinge", {}, 1.0, 0.1),
    ("hinge", {"beta": 0.3}, 1.0, 0.3),
    ("robust", {}, LN2, 0.1 / (2 * (1 - 2 * 0.1))),                     # β/(2(1 − 2ε)) = 0.0625
    ("robust", {"beta": 0.2, "flip_rate": 0.3}, LN2, 0.2 / (2 * (1 - 2 * 0.3))),  # 0.25
]


@pytest.mark.parametrize("loss,hyper,expected_loss,factor", STEP1,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in h.items()) or 'defaults'}"
                              for n, h, _, _ in STEP1])
def test_step1_loss_and_gradient_follow_the_loss_hyperparameters(tmp_path, G, loss, hyper, expected_loss, factor):
    row = run_step1(tmp_path, pair_records(), loss=loss, **hyper)
    assert row["units"] == len(WORDS)
    assert row["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(factor * G, rel=1e-3, abs=1e-6)


def test_dpo_gradient_ratios_between_betas_and_smoothings_are_exact(tmp_path):
    # The brief's check without any hand gradient: β 0.1 → 0.4 multiplies the step-1
    # gradient by exactly 4; ε 0 → 0.25 multiplies it by 1 − 2ε = ½.
    norms = {}
    for beta, eps in ((0.1, 0.0), (0.4, 0.0), (0.1, 0.25)):
        norms[beta, eps] = run_step1(tmp_path / f"{beta}-{eps}", pair_records(), beta=beta,
                                     label_smoothing=eps)["grad_norm"]
    assert norms[0.4, 0.0] / norms[0.1, 0.0] == pytest.approx(4.0, rel=1e-4)
    assert norms[0.1, 0.25] / norms[0.1, 0.0] == pytest.approx(0.5, rel=1e-4)


# ----------------------------------------------------------------------------- ties


@pytest.mark.parametrize("ties", ["keep", "drop"])
def test_tied_pairs_reach_the_loss_as_label_one_half_or_are_dropped(tmp_path, ties, token_logprobs_from_logits):
    # 4 clear pairs + 2 ties (label ½). A tie has t = ½, so ∂L/∂h(0) = −β(t − ½) = 0: it adds
    # no gradient but counts in the normalizer. With G4 = ‖(1/4) Σ_clear g_i‖:
    #   keep: 6 units, ‖∇‖ = (β/2)·(4/6)·G4        drop: 4 units, ‖∇‖ = (β/2)·G4
    clear, tied = WORDS[:4], WORDS[4:]
    row = run_step1(tmp_path, pair_records(WORDS, ties=tied), ties=ties, beta=0.2)
    g4 = pair_gradient(clear, token_logprobs_from_logits)
    units = 6 if ties == "keep" else 4
    assert row["units"] == units
    assert row["loss"] == pytest.approx(LN2, rel=1e-5)
    assert row["grad_norm"] == pytest.approx(0.2 / 2 * (4 / units) * g4, rel=1e-3)


# ----------------------------------------------------------------------------- reference-free


@pytest.mark.parametrize("hyper,beta,gamma", [({}, 2.0, 1.0), ({"beta": 1.0, "simpo_margin": 0.3}, 1.0, 0.3)],
                         ids=["defaults", "beta=1-gamma=0.3"])
def test_simpo_beta_and_gamma_reach_the_loss(tmp_path, start_logps, hyper, beta, gamma):
    # L = mean −log σ(β·(π_c/|y_c| − π_r/|y_r|) − γ) from the starting model's log-probs.
    pc, pr, nc, nr = start_logps
    expected = float(-F.logsigmoid(beta * (pc / nc - pr / nr) - gamma).mean())
    row = run_step1(tmp_path, pair_records(), loss="simpo", **hyper)
    assert row["loss"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("weight", [None, 0.7])
def test_orpo_odds_ratio_weight_reaches_the_loss(tmp_path, start_logps, weight):
    # L = mean(−π_c/|y_c|) + λ·mean(−log σ(o_c − o_r)),  o = log p − log(1 − p),  log p = π/|y|
    pc, pr, nc, nr = start_logps
    lam = 0.1 if weight is None else weight

    def odds(x):
        return x - torch.log1p(-torch.exp(x))
    nll = float((-pc / nc).mean())
    odds_ratio = float(-F.logsigmoid(odds(pc / nc) - odds(pr / nr)).mean())
    row = run_step1(tmp_path, pair_records(), loss="orpo",
                    **({} if weight is None else {"odds_ratio_weight": weight}))
    assert row["orpo/nll"] == pytest.approx(nll, abs=1e-4)
    assert row["orpo/odds_ratio_loss"] == pytest.approx(odds_ratio, abs=1e-4)
    assert row["loss"] == pytest.approx(nll + lam * odds_ratio, abs=1e-4)


# ----------------------------------------------------------------------------- RPO


@pytest.mark.parametrize("alpha", [0.7, 2.0])
def test_nll_weight_adds_alpha_times_the_chosen_mean_nll(tmp_path, start_logps, alpha):
    # At step 1 DPO is ln 2, so L = ln 2 + α · mean_i(−π_c,i / |y_c,i|).
    pc, _, nc, _ = start_logps
    nll = float((-pc / nc).mean())
    row = run_step1(tmp_path, pair_records(), nll_weight=alpha)
    assert row["nll/preferred"] == pytest.approx(nll, abs=1e-4)
    assert row["loss"] == pytest.approx(LN2 + alpha * nll, abs=1e-4)


# ----------------------------------------------------------------------------- KTO

KTO_RECORDS = [  # 4 desirable, 2 undesirable: unbalanced, so swapping λ_D and λ_U shows
    {"prompt": f"Name {w}.", "completion": f"{w} +" if good else w, "label": good}
    for w, good in zip(WORDS, [True, True, False, True, False, True])]


@pytest.mark.parametrize("hyper,beta,w_d,w_u", [
    ({}, 0.1, 1.0, 1.0),
    ({"beta": 0.3, "desirable_weight": 2.0, "undesirable_weight": 0.5}, 0.3, 2.0, 0.5),
], ids=["defaults", "beta=0.3-wD=2-wU=0.5"])
def test_kto_beta_and_class_weights_reach_loss_and_gradient(tmp_path, hyper, beta, w_d, w_u,
                                                           token_logprobs_from_logits):
    # At step 1, r = π − ref = 0 and z0 = max(0, 0) = 0 (detached):
    #   desirable   ℓ = λ_D − λ_D σ(β(r − z0)):  ℓ(0) = λ_D/2,  ∂ℓ/∂r = −λ_D β/4
    #   undesirable ℓ = λ_U − λ_U σ(β(z0 − r)):  ℓ(0) = λ_U/2,  ∂ℓ/∂r = +λ_U β/4
    # L = (4·λ_D/2 + 2·λ_U/2)/6;  ∇L = (β/4)(1/6)[Σ_U λ_U ∇π − Σ_D λ_D ∇π]
    row = run_step1(tmp_path, KTO_RECORDS, loss="kto", **hyper)
    assert row["units"] == 6
    assert row["loss"] == pytest.approx((4 * w_d / 2 + 2 * w_u / 2) / 6, rel=1e-5)
    weighted = [(encode(r["prompt"], r["completion"]), (-w_d if r["label"] else w_u) * beta / 4 / 6)
                for r in KTO_RECORDS]
    assert row["grad_norm"] == pytest.approx(grad_norm_of(weighted, token_logprobs_from_logits), rel=1e-3)
