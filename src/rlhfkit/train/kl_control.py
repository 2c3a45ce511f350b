"""The KL coefficient β of PPO's reward penalty: fixed, or adapted toward a target KL.

Adaptive rule (Ziegler et al., 2019, "Fine-Tuning Language Models from Human Preferences"):

    e_t = clip(KL_t / KL_target − 1, −0.2, 0.2)
    β  ← β · (1 + e_t · n_steps / horizon)

KL above target raises β (pull the policy back), below target lowers it. The clip bounds
each change, so one noisy KL estimate cannot swing β far. Both controllers expose `value`,
`update(current_kl, n_steps)` and state_dict / load_state_dict for exact resume.
"""

from __future__ import annotations

import math

_MAX_PROPORTIONAL_ERROR = 0.2


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class FixedKLController:
    """β stays at `coef`; `update` only exists so recipes treat both kinds alike."""

    def __init__(self, coef: float):
        if not _check_finite("coef", coef) >= 0.0:
            raise ValueError(f"coef must be ≥ 0, got {coef}")
        self._coef = float(coef)

    @property
    def value(self) -> float:
        return self._coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """No change; returns β."""
        return self._coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self._coef}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._coef = float(state["coef"])


class AdaptiveKLController:
    """β moved proportionally toward the value that keeps the KL near `target`.

    init_coef: starting β (> 0). target: the KL to aim for (> 0), in the units that
    `update` receives (e.g. nats per response).
    horizon: how many samples (n_steps units) a full 20 % correction is spread over (> 0).
    """

    def __init__(self, init_coef: float, target: float, horizon: int):
        if not _check_finite("init_coef", init_coef) > 0.0:
            raise ValueError(f"init_coef must be > 0, got {init_coef}")
        if not _check_finite("target", target) > 0.0:
            raise ValueError(f"target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self._target = float(target)
        self._horizon = int(horizon)
        self._coef = float(init_coef)

    @property
    def value(self) -> float:
        return self._coef

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one adjustment for `n_steps` samples observed at KL `current_kl`; returns β."""
        current_kl = _check_finite("current_kl", current_kl)
        if n_steps < 0:
            raise ValueError(f"n_steps must be ≥ 0, got {n_steps}")
        error = current_kl / self._target - 1.0
        error = min(max(error, -_MAX_PROPORTIONAL_ERROR), _MAX_PROPORTIONAL_ERROR)
        factor = 1.0 + error * n_steps / self._horizon
        if factor <= 0.0:  # only when n_steps > 5 · horizon; β must stay positive
            raise ValueError(f"n_steps={n_steps} is too large for horizon={self._horizon}: "
                             f"β would be multiplied by {factor}")
        self._coef *= factor
        return self._coef

    def state_dict(self) -> dict[str, float]:
        return {"coef": self._coef, "target": self._target, "horizon": self._horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if float(state["target"]) != self._target or int(state["horizon"]) != self._horizon:
            raise ValueError(
                f"saved controller has target={state['target']}, horizon={state['horizon']}; "
                f"this one has target={self._target}, horizon={self._horizon}: resume with "
                "the same config")
        self._coef = float(state["coef"])
