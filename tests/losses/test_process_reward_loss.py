"""The per-step BCE of process reward models, by hand."""

import math

import pytest
import torch

from rlhfkit.losses.process_reward import step_bce_loss

LN3 = math.log(3.0)


def _case():
    logits = torch.tensor([[0.0, LN3], [-LN3, 5.0]], requires_grad=True)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logits, labels, mask


def test_per_step_values_and_metrics_by_hand():
    logits, labels, mask = _case()
    loss, m = step_bce_loss(logits, labels, mask)
    # softplus(z) − y·z: ln 2 (z=0, y=1), ln(1 + 3) (z=ln 3, y=0), ln(1 + 1/3) (z=−ln 3, y=0), masked → 0
    expected = torch.tensor([[math.log(2.0), math.log(4.0)], [math.log(4 / 3), 0.0]])
    assert torch.allclose(loss, expected, atol=1e-6)
    # σ(z) > ½ against the label: row 0 both wrong (0 is not > 0; ln 3 predicts 1 for label 0), row 1 right
    assert m["steps/correct"].tolist() == [0.0, 1.0]
    assert m["steps/count"].tolist() == [2.0, 1.0]
    assert m["steps/positive"].tolist() == [1.0, 0.0]
    assert torch.allclose(m["steps/prob"], torch.tensor([0.5 + 0.75, 0.25]))


def test_gradient_is_sigmoid_minus_label_on_real_steps_only():
    logits, labels, mask = _case()
    loss, _ = step_bce_loss(logits, labels, mask)
    loss.sum().backward()
    assert torch.allclose(logits.grad, torch.tensor([[-0.5, 0.75], [0.25, 0.0]]), atol=1e-6)


def test_bad_labels_and_shapes_are_errors():
    logits, labels, mask = _case()
    with pytest.raises(ValueError, match="0 or 1"):
        step_bce_loss(logits, torch.tensor([[0.5, 0.0], [0.0, 1.0]]), mask)
    with pytest.raises(ValueError, match="same"):
        step_bce_loss(logits, labels[:, :1], mask)
