"""The preference losses by name: one table from a name to its function, each entry calling
its loss with explicit arguments, and every hyper-parameter's default in one place.

A recipe reads `get_preference_loss(name)` and calls `spec.compute(inputs, hyperparameters)`
with `PairLogps` (paired losses) or `FeedbackLogps` (KTO); the equations are in
`rlhfkit.losses.preference`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from rlhfkit.config import closest_names
from rlhfkit.losses.preference import (
    LossOutput,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    simpo_loss,
)

# The default of every loss hyper-parameter, per loss. β = 0.1 is the DPO paper's usual
# value (for IPO it asks for a log-ratio gap of 1/(2β) = 5 nats, for hinge a separation of
# 1/β = 10); SimPO scores mean per-token log-probs, which are ~20× smaller than sums, so it
# needs a larger β (2.0) and a margin γ with γ/β = 0.5, the SimPO paper's recommendations;
# ORPO's λ = 0.1 and KTO's unit class weights are their papers' defaults; robust DPO's
# flip rate 0.1 is a modest noise assumption (0 would be plain DPO).
LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "ipo": {"beta": 0.1},
    "hinge": {"beta": 0.1},
    "robust": {"beta": 0.1, "flip_rate": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "orpo": {"odds_ratio_weight": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
}
# Every hyper-parameter name of any loss, in first-use order.
HYPERPARAMETERS: tuple[str, ...] = tuple(dict.fromkeys(n for d in LOSS_DEFAULTS.values() for n in d))


@dataclass(frozen=True)
class PairLogps:
    """What a paired loss reads, all (B,): summed response log-probs of the policy and (for
    the losses that need one) the reference, response token counts, and the soft label."""

    policy_chosen: Tensor
    policy_rejected: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    label: Tensor | None = None
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None


@dataclass(frozen=True)
class FeedbackLogps:
    """What KTO reads: policy and reference sums (B,), the desirable flags (B,) bool, and
    the reference point z0 (a scalar, see `kto_reference_point`)."""

    policy: Tensor
    ref: Tensor
    desirable: Tensor
    kl_reference: Tensor


Hyperparameters = Mapping[str, float]


def _dpo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    return dpo_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=hp["beta"],
                    label_smoothing=hp["label_smoothing"], label=x.label)


def _ipo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    return ipo_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=hp["beta"],
                    label=x.label)


def _hinge(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    return hinge_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=hp["beta"],
                      label=x.label)


def _robust(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    return robust_dpo_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=hp["beta"],
                           flip_rate=hp["flip_rate"], label=x.label)


def _simpo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    return simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_lengths, x.rejected_lengths, beta=hp["beta"],
                      gamma=hp["gamma"], label=x.label)


def _orpo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    # The SFT term per pair: the chosen response's mean per-token NLL, −π_c/|y_c|.
    return orpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_lengths, x.rejected_lengths,
                     -x.policy_chosen / x.chosen_lengths, odds_ratio_weight=hp["odds_ratio_weight"], label=x.label)


def _kto(x: FeedbackLogps, hp: Hyperparameters) -> LossOutput:
    return kto_loss(x.policy, x.ref, x.desirable, x.kl_reference, beta=hp["beta"],
                    desirable_weight=hp["desirable_weight"], undesirable_weight=hp["undesirable_weight"])


@dataclass(frozen=True)
class PreferenceLossSpec:
    """What a recipe needs to know to call a preference loss by name."""

    name: str
    # compute(inputs, hyper-parameters): PairLogps for a paired loss, FeedbackLogps for KTO;
    # the hyper-parameters hold every name in LOSS_DEFAULTS[name] (see `with_defaults`).
    compute: Callable[..., LossOutput]
    # True when the loss needs reference-model log-probs (computed once and cached).
    needs_reference: bool
    # True for chosen/rejected pairs, False for single examples with a desirable flag.
    paired: bool
    summary: str

    @property
    def hyperparameters(self) -> tuple[str, ...]:
        return tuple(LOSS_DEFAULTS[self.name])

    def with_defaults(self, given: Mapping[str, float | None]) -> dict[str, float]:
        """This loss's hyper-parameters: the value in `given` where set (not None), else its default."""
        return {name: default if given.get(name) is None else given[name]
                for name, default in LOSS_DEFAULTS[self.name].items()}


PREFERENCE_LOSSES: dict[str, PreferenceLossSpec] = {
    spec.name: spec for spec in (
        PreferenceLossSpec("dpo", _dpo, True, True, "DPO; label_smoothing > 0 gives conservative DPO"),
        PreferenceLossSpec("ipo", _ipo, True, True, "IPO: squared loss toward a log-ratio gap of 1/(2β)"),
        PreferenceLossSpec("hinge", _hinge, True, True, "hinge / SLiC: max(0, 1 − β·h)"),
        PreferenceLossSpec("robust", _robust, True, True, "robust DPO: unbiased under a known label flip rate"),
        PreferenceLossSpec("simpo", _simpo, False, True, "SimPO: reference-free, length-normalized, target margin γ"),
        PreferenceLossSpec("orpo", _orpo, False, True, "ORPO: chosen NLL + λ·odds-ratio loss, reference-free"),
        PreferenceLossSpec("kto", _kto, True, False, "KTO: unpaired desirable / undesirable examples"),
    )
}


def get_preference_loss(name: str) -> PreferenceLossSpec:
    """The registered spec for `name`; a ValueError naming the closest valid names if none."""
    spec = PREFERENCE_LOSSES.get(name)
    if spec is not None:
        return spec
    valid = sorted(PREFERENCE_LOSSES)
    close = closest_names(name, valid, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown preference loss {name!r}.{hint} Valid names: {', '.join(valid)}")
