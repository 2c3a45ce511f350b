"""`to_device`: the one `.to(device)` of the typed batch and rollout containers."""

from dataclasses import dataclass

import torch

from rlhfkit.data.batches import LMBatch, to_device
from rlhfkit.data.preference_batches import PreferenceBatch


def _lm_batch() -> LMBatch:
    ids = torch.tensor([[5, 6, 7]])
    return LMBatch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([[6, 7, -100]]))


def test_nested_batches_optional_tensors_and_dicts_all_move():
    batch = PreferenceBatch(sequences=_lm_batch(), response_lengths=torch.tensor([2]), label=torch.tensor([1.0]),
                            margin=torch.tensor([0.0]), ref_logps=None)
    moved = batch.to("meta")
    assert moved.sequences.input_ids.device.type == "meta"       # a nested batch moves as a whole
    assert moved.label.device.type == "meta" and moved.margin.device.type == "meta"
    assert moved.ref_logps is None                                # None stays None
    assert batch.label.device.type == "cpu"                       # a copy: the original is untouched

    @dataclass(frozen=True)
    class Holder:
        scores: dict
        name: str

    held = to_device(Holder(scores={"gold": torch.zeros(2)}, name="x"), "meta")
    assert held.scores["gold"].device.type == "meta" and held.name == "x"
