"""Wiring of the SFT recipe to its loss, through `run_sft` and metrics.jsonl only.

The recipe must train on L = −Σ_t m_t log π(y_t) / N with N the response tokens of the whole
optimizer step (`losses.sft.sft_loss`). The step-1 loss and pre-clip gradient norm are
computed here by hand from a plain forward of the same starting model, so a flipped sign, a
per-example (instead of per-token) normalization or prompt tokens counted in the loss fail.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.train.metrics import read_metrics

# Two examples of different lengths, so a per-token mean differs from a per-example mean.
EXAMPLES = [("Say ab.", "ab"), ("Greet me.", "hello world")]
# Counted tokens of one example: its response bytes + "<|im_end|>" + "\n" (byte-level tokenizer,
# ChatML); the prompt and the template's "<|im_start|>assistant\n" are not counted:
#   "ab" → 2 + 2 = 4,  "hello world" → 11 + 2 = 13,  N = 17.
RESPONSE_TOKENS = [4, 13]


def write_sft(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in EXAMPLES))
    return path


def hand_step0(seed: int, token_logprobs_from_logits) -> tuple[float, float, int]:
    """(mean NLL per response token, ‖∇ of it‖, N) from a plain forward of the start model
    (`token_logprobs_from_logits`: the conftest fixture)."""
    tok = tiny_tokenizer()
    model = tiny_causal_lm(seed=seed)
    count = 0
    nll = torch.zeros(())
    for prompt, completion in EXAMPLES:
        enc = encode_pair(tok, as_conversation(prompt), completion)
        labels = torch.tensor([enc.labels])
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits
        nll = nll - token_logprobs_from_logits(logits, labels).sum()
        count += int((labels != -100).sum())
    loss = nll / count
    loss.backward()
    norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in model.parameters() if p.grad is not None))
    return float(loss.detach()), norm, count


@pytest.mark.parametrize("packing,batch_size,grad_accum", [(False, 2, 1), (True, 2, 1), (False, 1, 2)])
def test_sft_step_loss_is_the_per_token_mean_nll_with_its_gradient(tmp_path, packing, batch_size, grad_accum,
                                                                   token_logprobs_from_logits):
    cfg = SFTConfig(model="tiny", train_data=str(write_sft(tmp_path / "sft.jsonl")),
                    output_dir=str(tmp_path / "run"), max_steps=2, batch_size=batch_size, grad_accum=grad_accum,
                    packing=packing, lr=1e-2, schedule="constant", max_grad_norm=1e9, precision="fp32",
                    progress=False, seed=4)
    run_sft(cfg)
    rows = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    expected_loss, expected_norm, n = hand_step0(cfg.seed, token_logprobs_from_logits)
    assert n == sum(RESPONSE_TOKENS) == 17
    # Every step covers both examples (2 per step), normalized by the step's 17 tokens.
    assert rows[0]["units"] == 17
    # step 1 is scored before any update: exactly the hand value (a random 288-token model
    # sits near ln 288 ≈ 5.66 nats per token; a flipped sign would log a negative loss).
    assert rows[0]["loss"] == pytest.approx(expected_loss, abs=2e-5)
    assert 4.0 < rows[0]["loss"] < 7.0
    # the gradient the optimizer got is that of the per-token mean (pre-clip norm; clipping
    # is off at max_grad_norm = 1e9). Per-example normalization would scale it by 17/2.
    assert rows[0]["grad_norm"] == pytest.approx(expected_norm, rel=1e-4)
    # Descent, not ascent: the same batch scores lower after one step on it.
    assert rows[1]["loss"] < rows[0]["loss"] - 0.05
