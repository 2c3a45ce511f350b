"""Evaluating a reward model on held-out preference pairs (running it: `models.reward`).

    Δ = r(x, y_c) − r(x, y_r),    P(chosen ≻ rejected) = σ(Δ)

- accuracy: over non-tie pairs, the fraction where Δ has the sign of (label − ½);
- ties (label ½) are reported apart: how many, and the mean |Δ| the model puts between
  two responses the annotators found equally good (0 is ideal);
- calibration: the expected calibration error of σ(Δ) against the labels, over 10 equal
  bins, with both orientations of every non-tie pair (see `pair_calibration`);
- a histogram of the chosen and rejected rewards (shared bin edges) for the report;
- for an ensemble of E heads: the rewards are reduced with `losses.reward.ensemble_reduce`
  and the spread (std over heads, averaged over responses) is reported.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from rlhfkit.config import ConfigError
from rlhfkit.data.preference_batches import EncodedPair, encode_preference_pairs
from rlhfkit.data.readers import iter_records, read_preferences, read_sft
from rlhfkit.data.schemas import TIE_TOLERANCE, PreferencePair
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.io import atomic_write_text
from rlhfkit.losses.reward import ENSEMBLE_MODES, bradley_terry_loss, ensemble_reduce, ensemble_summary
from rlhfkit.models.reward import load_trained_reward_model, pair_rewards, score_responses

DEFAULT_CALIBRATION_BINS = 10
DEFAULT_HISTOGRAM_BINS = 20


# ----------------------------------------------------------------------------- pure statistics

def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_CALIBRATION_BINS
                     ) -> dict[str, Tensor]:
    """A reliability table: equal-width bins over [0, 1].

    probs: (N,) predicted probabilities of an event; labels: (N,) outcomes in [0, 1]
    (0/1, or soft). Bin k holds probabilities in [k/n, (k+1)/n); 1.0 goes in the last bin.
    Returns count (n,), mean_prob (n,), mean_label (n,) — 0 where a bin is empty.
    """
    if probs.shape != labels.shape or probs.dim() != 1:
        raise ValueError(f"probs and labels must both have shape (N,), got {tuple(probs.shape)} "
                         f"and {tuple(labels.shape)}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs, labels = probs.double(), labels.double()
    if probs.numel() and not bool(((probs >= 0) & (probs <= 1)).all()):
        raise ValueError("probs must lie in [0, 1]")
    index = (probs * n_bins).floor().long().clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add(0, index, torch.ones_like(probs))
    prob_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, index, probs)
    label_sum = torch.zeros(n_bins, dtype=torch.float64).index_add(0, index, labels)
    denom = count.clamp(min=1)
    return {"count": count, "mean_prob": prob_sum / denom, "mean_label": label_sum / denom}


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_CALIBRATION_BINS) -> float:
    """ECE = Σ_k (n_k / N) · |ȳ_k − p̄_k| over the equal-width bins of `calibration_bins`.

    probs, labels: (N,). NaN when N = 0 (calibration of nothing is undefined).
    """
    table = calibration_bins(probs, labels, n_bins)
    total = float(table["count"].sum())
    if total == 0:
        return math.nan
    gaps = (table["mean_label"] - table["mean_prob"]).abs()
    return float((table["count"] * gaps).sum() / total)


def pair_calibration(delta: Tensor, label: Tensor, n_bins: int = DEFAULT_CALIBRATION_BINS
                     ) -> tuple[float, dict[str, Tensor]]:
    """(ECE, reliability table) of P(chosen ≻ rejected) = σ(Δ) on non-tie pairs.

    delta, label: (N,). Which response of a pair is listed first is arbitrary, so every
    pair enters twice: (σ(Δ), l) and (σ(−Δ), 1 − l). With bins symmetric around ½ this
    equals the confidence form of ECE — bin the model's confidence in the response it
    prefers, compare with how often the annotators agreed — and it does not reward a model
    for predicting "chosen wins" on a set where chosen always wins.
    """
    prob = torch.sigmoid(delta.double())
    label = label.double()
    probs = torch.cat([prob, 1.0 - prob])
    labels = torch.cat([label, 1.0 - label])
    return expected_calibration_error(probs, labels, n_bins), calibration_bins(probs, labels, n_bins)


def reward_histogram(chosen: Tensor, rejected: Tensor, n_bins: int = DEFAULT_HISTOGRAM_BINS
                     ) -> dict[str, list[float]]:
    """Counts of chosen and rejected rewards over shared equal-width bins: edges (n+1,)."""
    both = torch.cat([chosen, rejected]).double()
    if both.numel() == 0:
        return {"edges": [], "chosen": [], "rejected": []}
    low, high = float(both.min()), float(both.max())
    if high - low < 1e-12:  # all equal: one bin around the value
        low, high = low - 0.5, high + 0.5
    edges = torch.linspace(low, high, n_bins + 1, dtype=torch.float64)

    def counts(x: Tensor) -> list[float]:
        index = ((x.double() - low) / (high - low) * n_bins).floor().long().clamp(0, n_bins - 1)
        return torch.bincount(index, minlength=n_bins).double().tolist()

    return {"edges": edges.tolist(), "chosen": counts(chosen), "rejected": counts(rejected)}


def evaluate_reward_model(model, tokenizer, pairs: Sequence[PreferencePair] | Sequence[EncodedPair], *,
                          ensemble_mode: str = "mean", batch_size: int = 16, packed: bool = True,
                          n_bins: int = DEFAULT_CALIBRATION_BINS,
                          histogram_bins: int = DEFAULT_HISTOGRAM_BINS) -> dict:
    """Held-out metrics of a reward model (a `RewardModel` or a plain HF sequence classifier).

    pairs: preference pairs (tokenized here) or already encoded pairs. Returns
    num_pairs, num_non_tie, num_ties, accuracy (non-tie pairs; NaN if none), ece (non-tie
    pairs), loss (Bradley–Terry with the soft labels, all pairs), mean_margin (non-tie
    pairs, in the labels' direction), tie_mean_abs_delta (NaN if no ties), reward_mean,
    reward_std, ensemble_spread (E > 1 only), n_heads, and `reliability` and `histogram`
    tables (lists) for the report.
    """
    if pairs and isinstance(pairs[0], PreferencePair):
        pairs = encode_preference_pairs(tokenizer, pairs)
    was_training = getattr(model, "training", False)
    model.eval()
    chosen_e, rejected_e = pair_rewards(model, pairs, pad_token_id(tokenizer), batch_size=batch_size,
                                        packed=packed)
    if was_training:
        model.train()
    n_heads = int(chosen_e.shape[0])
    chosen, rejected = ensemble_reduce(chosen_e, ensemble_mode), ensemble_reduce(rejected_e, ensemble_mode)
    label = torch.tensor([p.label for p in pairs], dtype=torch.float32)
    delta = chosen - rejected
    direction = label - 0.5
    tie = direction.abs() <= TIE_TOLERANCE
    non_tie = ~tie
    nan = math.nan
    report: dict = {"num_pairs": len(pairs), "num_non_tie": int(non_tie.sum()), "num_ties": int(tie.sum()),
                    "n_heads": n_heads}
    if non_tie.any():
        oriented = delta[non_tie] * direction[non_tie].sign()
        report["accuracy"] = float((oriented > 0).double().mean())
        report["mean_margin"] = float(oriented.mean())
        ece, table = pair_calibration(delta[non_tie], label[non_tie], n_bins)
        report["ece"] = ece
        report["reliability"] = {k: v.tolist() for k, v in table.items()}
    else:
        report.update(accuracy=nan, mean_margin=nan, ece=nan, reliability=None)
    report["tie_mean_abs_delta"] = float(delta[tie].abs().mean()) if tie.any() else nan
    if len(pairs):
        report["loss"] = float(bradley_terry_loss(chosen, rejected, label=label)[0].mean())
        both = torch.cat([chosen, rejected])
        report["reward_mean"] = float(both.mean())
        report["reward_std"] = float(both.std()) if both.numel() > 1 else 0.0
    else:
        report.update(loss=nan, reward_mean=nan, reward_std=nan)
    if n_heads > 1:
        spread = ensemble_summary(torch.cat([chosen_e, rejected_e], dim=1))["std"]
        report["ensemble_spread"] = float(spread.mean()) if spread.numel() else nan
    report["histogram"] = reward_histogram(chosen, rejected, histogram_bins)
    return report


SCALAR_METRICS = ("accuracy", "ece", "loss", "mean_margin", "tie_mean_abs_delta", "reward_mean",
                  "reward_std", "ensemble_spread")


def scalar_metrics(report: dict, prefix: str = "eval_") -> dict[str, float]:
    """The numbers of an `evaluate_reward_model` report worth logging per step."""
    return {prefix + k: report[k] for k in SCALAR_METRICS if k in report}


# ----------------------------------------------------------------------------- files (the `rlhf rm` commands)

def _check_ensemble_mode(mode: str, n_heads: int) -> None:
    if mode not in ENSEMBLE_MODES:
        raise ConfigError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}; got {mode!r}")
    if mode == "mean_minus_std" and n_heads < 2:
        raise ConfigError(f"ensemble mode mean_minus_std needs a model with ≥ 2 heads; this one has {n_heads}")


def evaluate_file(model: str, data: str, *, ensemble_mode: str = "mean", batch_size: int = 16) -> dict:
    """`evaluate_reward_model` of a saved reward model on a preference file."""
    pairs = read_preferences(data)
    reward_model, tokenizer = load_trained_reward_model(model)
    _check_ensemble_mode(ensemble_mode, reward_model.n_heads)
    return evaluate_reward_model(reward_model, tokenizer, pairs, ensemble_mode=ensemble_mode,
                                 batch_size=batch_size)


def score_file(model: str, data: str, out: str, *, ensemble_mode: str = "mean", batch_size: int = 16) -> int:
    """Score a JSONL of {prompt, response} (or `completion`, or `messages`) records.

    Writes each input record with `reward` added (and `rewards`, one per head, for an
    ensemble) to `out`; returns the number of records.
    """
    examples = read_sft(data)  # validates every record, errors name file:line:field
    records = [rec for rec, _ in iter_records(data)]
    reward_model, tokenizer = load_trained_reward_model(model)
    _check_ensemble_mode(ensemble_mode, reward_model.n_heads)
    members = score_responses(reward_model, tokenizer, [e.prompt for e in examples],
                              [e.response for e in examples], batch_size=batch_size)
    reduced = ensemble_reduce(members, ensemble_mode)
    lines = []
    for i, rec in enumerate(records):
        row = {**rec, "reward": float(reduced[i])}
        if members.shape[0] > 1:
            row["rewards"] = members[:, i].tolist()
        lines.append(json.dumps(row) + "\n")
    atomic_write_text(Path(out), "".join(lines))
    return len(lines)
