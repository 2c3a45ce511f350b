"""Calibration of the confidence a response states ("Confidence: 80%") against its correctness."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.eval.reward import expected_calibration_error

_CONFIDENCE = re.compile(r"confidence\s*(?:level)?\s*[:=]?\s*(\d{1,3}(?:\.\d+)?)\s*%", re.IGNORECASE)


def stated_confidence(text: str) -> float | None:
    """The last 'Confidence: NN%' in a response, as a probability; None when none is stated."""
    found = _CONFIDENCE.findall(text)
    if not found:
        return None
    value = float(found[-1]) / 100.0
    return value if 0.0 <= value <= 1.0 else None


def confidence_calibration(responses: Sequence[str], correct: Sequence[bool]) -> dict[str, Any] | None:
    """ECE of stated confidence against exact-match correctness, over the responses that state
    one (None when none does)."""
    stated = [(c, float(ok)) for c, ok in ((stated_confidence(r), ok) for r, ok in zip(responses, correct))
              if c is not None]
    if not stated:
        return None
    probs = torch.tensor([s[0] for s in stated], dtype=torch.float64)
    labels = torch.tensor([s[1] for s in stated], dtype=torch.float64)
    return {"n_stated": len(stated), "ece": expected_calibration_error(probs, labels),
            "mean_confidence": float(probs.mean()), "accuracy_when_stated": float(labels.mean())}
