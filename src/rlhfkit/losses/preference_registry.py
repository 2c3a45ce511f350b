"""The preference losses by name: one table from a name to its function, each entry calling
its loss with explicit arguments, and every hyper-parameter's default in one place.

A recipe reads `get_preference_loss(name)` and calls `spec.compute(inputs, hyperparameters)`
with `PairLogps` (paired losses) or `FeedbackLogps` (KTO); the equations are in
`rlhfkit.losses.preference` and `rlhfkit.losses.preference_variants`. `check_hyperparameters`
validates a loss's values with one-line errors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

from rlhfkit.config import closest_names
from rlhfkit.losses.preference import (
    NLL_REDUCTIONS,
    LossOutput,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    preferred_nll,
    robust_dpo_loss,
    simpo_loss,
)
from rlhfkit.losses.preference_variants import (
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    bco_reward_shift,
    exo_pair_loss,
    nca_pair_loss,
)

# The default of every loss hyper-parameter, per loss. β = 0.1 is the DPO paper's usual
# value (for IPO it asks for a log-ratio gap of 1/(2β) = 5 nats, for hinge a separation of
# 1/β = 10); SimPO scores mean per-token log-probs, which are ~20× smaller than sums, so it
# needs a larger β (2.0) and a margin γ with γ/β = 0.5, the SimPO paper's recommendations;
# ORPO's λ = 0.1 and KTO's unit class weights are their papers' defaults; robust DPO's
# flip rate 0.1 is a modest noise assumption (0 would be plain DPO).
# IPO sums log-probs by default (ipo_average False): it is what every other loss here reads,
# β = 0.1 then asks for a 5-nat gap per response (per token, averaged, 5 nats is a huge gap:
# raise β with ipo_average, TRL's choice for IPO), and earlier runs stay
# reproducible. ORPO's NLL term is a mean of per-sequence averages by default ("sequence", what
# every pair's own loss is); "token" is the batch's token-level mean, the ORPO paper's SFT loss.
# APO, BCO and NCA use DPO's β; EXO's ε = 1e-3 keeps its target near the hard label (log ε finite).
LOSS_DEFAULTS: dict[str, dict[str, float | bool | str]] = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "ipo": {"beta": 0.1, "ipo_average": False},
    "hinge": {"beta": 0.1},
    "robust": {"beta": 0.1, "flip_rate": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "orpo": {"odds_ratio_weight": 0.1, "nll_reduction": "sequence"},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
    "apo_zero": {"beta": 0.1},
    "apo_down": {"beta": 0.1},
    "bco_pair": {"beta": 0.1},
    "nca_pair": {"beta": 0.1},
    "exo_pair": {"beta": 0.1, "label_smoothing": 1e-3},
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


Hyperparameters = Mapping[str, float | bool | str]


def _with_reference(loss, *extra: str):
    """The adapter of a loss called as loss(π_c, π_r, ref_c, ref_r, beta=β, label=…, **extra)."""
    def adapter(x: PairLogps, hp: Hyperparameters) -> LossOutput:
        return loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=hp["beta"],
                    label=x.label, **{name: hp[name] for name in extra})
    adapter.__name__ = f"_{loss.__name__}"
    return adapter


_dpo = _with_reference(dpo_loss, "label_smoothing")


def _ipo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    if hp.get("ipo_average", False):  # per-token averages of the policy and the reference alike
        return ipo_loss(x.policy_chosen / x.chosen_lengths, x.policy_rejected / x.rejected_lengths,
                        x.ref_chosen / x.chosen_lengths, x.ref_rejected / x.rejected_lengths, beta=hp["beta"],
                        label=x.label)
    return ipo_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, beta=hp["beta"],
                    label=x.label)


_hinge = _with_reference(hinge_loss)
_robust = _with_reference(robust_dpo_loss, "flip_rate")


def _simpo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    return simpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_lengths, x.rejected_lengths, beta=hp["beta"],
                      gamma=hp["gamma"], label=x.label)


def _orpo(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    # The SFT term on the chosen responses (whatever the label): "sequence" −π_c/|y_c| per pair,
    # "token" Σ−π_c / Σ|y_c| over the batch (see `preferred_nll`).
    nll = preferred_nll(x.policy_chosen, x.policy_rejected, x.chosen_lengths, x.rejected_lengths,
                        reduction=str(hp.get("nll_reduction", "sequence")))
    return orpo_loss(x.policy_chosen, x.policy_rejected, x.chosen_lengths, x.rejected_lengths, nll,
                     odds_ratio_weight=hp["odds_ratio_weight"], label=x.label)


_apo_zero = _with_reference(apo_zero_loss)
_apo_down = _with_reference(apo_down_loss)


def _bco_pair(x: PairLogps, hp: Hyperparameters) -> LossOutput:
    # δ from this batch alone (no state kept between steps, so a resumed run computes the same δ).
    delta = bco_reward_shift(hp["beta"] * (x.policy_chosen - x.ref_chosen),
                             hp["beta"] * (x.policy_rejected - x.ref_rejected))
    return bco_pair_loss(x.policy_chosen, x.policy_rejected, x.ref_chosen, x.ref_rejected, delta, beta=hp["beta"],
                         label=x.label)


_nca_pair = _with_reference(nca_pair_loss)
_exo_pair = _with_reference(exo_pair_loss, "label_smoothing")


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

    def with_defaults(self, given: Mapping[str, float | bool | str | None]) -> dict[str, float | bool | str]:
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
        PreferenceLossSpec("apo_zero", _apo_zero, True, True, "APO-zero: chosen likelihood up, rejected down"),
        PreferenceLossSpec("apo_down", _apo_down, True, True, "APO-down: both likelihoods down, rejected faster"),
        PreferenceLossSpec("bco_pair", _bco_pair, True, True, "BCO on pairs: each response classified against δ"),
        PreferenceLossSpec("nca_pair", _nca_pair, True, True, "NCA on pairs: absolute rewards, chosen kept up"),
        PreferenceLossSpec("exo_pair", _exo_pair, True, True, "EXO on pairs: reverse KL to the smoothed label"),
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


# name → (lowest, highest, lowest included, highest included) of every bounded numeric hyper-parameter
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "beta": (0.0, math.inf, False, False), "odds_ratio_weight": (0.0, math.inf, False, False),
    "desirable_weight": (0.0, math.inf, False, False), "undesirable_weight": (0.0, math.inf, False, False),
    "label_smoothing": (0.0, 0.5, True, True), "flip_rate": (0.0, 0.5, True, False),
    "gamma": (0.0, math.inf, True, False),
}
# Losses whose hyper-parameter has a narrower range than the shared one above.
_NARROWER: dict[tuple[str, str], tuple[float, float, bool, bool]] = {
    ("exo_pair", "label_smoothing"): (0.0, 0.5, False, True),  # log ε: ε = 0 has no finite loss
}


def check_hyperparameters(name: str, hyperparameters: Hyperparameters, *, field_of: Callable[[str], str] = str,
                          error: type[ValueError] = ValueError) -> None:
    """Raise `error` (a ValueError; one line, naming the field as `field_of` spells it) when a
    value of loss `name` is out of range or not one of its choices."""
    for hp, value in hyperparameters.items():
        default = LOSS_DEFAULTS[name][hp]
        if isinstance(default, str):
            if value not in NLL_REDUCTIONS:
                raise error(f"{field_of(hp)} must be one of {', '.join(NLL_REDUCTIONS)}, got {value!r}")
            continue
        if isinstance(default, bool):
            continue
        low, high, low_in, high_in = _NARROWER.get((name, hp), _RANGES.get(hp, (-math.inf, math.inf, False, False)))
        if not ((low <= value if low_in else low < value) and (value <= high if high_in else value < high)):
            if high == math.inf:
                raise error(f"{field_of(hp)} must be {'≥' if low_in else '>'} {low:g}, got {value}")
            raise error(f"{field_of(hp)} must be in {'[' if low_in else '('}{low:g}, {high:g}"
                             f"{']' if high_in else ')'} for loss '{name}', got {value}")
