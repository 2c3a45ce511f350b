"""Engine choices that depend on the hardware: the attention kernel used for training."""

import pytest
import torch

from rlhfkit.models.attention import NAME as FP32_MATMUL
from rlhfkit.models.attention import PACKED_SDPA
from rlhfkit.models.loading import load_model
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.train.engine import Engine, resolve_attention


def test_resolve_attention():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu) == FP32_MATMUL
    assert resolve_attention("auto", gpu) == PACKED_SDPA  # transformers' SDPA, packed rows per sequence
    assert resolve_attention("model", gpu) is None  # the model's own (SDPA / flash)
    assert resolve_attention("sdpa", cpu) == "sdpa"
    assert resolve_attention("fp32-matmul", gpu) == FP32_MATMUL


@pytest.mark.parametrize("attention,expected", [("auto", FP32_MATMUL), ("sdpa", "sdpa"), ("eager", "eager")])
def test_engine_applies_the_attention_choice(tmp_path, attention, expected):
    cfg = SFTConfig(train_data="unused.jsonl", output_dir=str(tmp_path), model="tiny", attention=attention,
                    max_steps=1, progress=False, precision="fp32")
    model = load_model("tiny")
    Engine(cfg, tmp_path).setup(TokenLogprobs(model, cfg.logprob_chunk))
    assert model.config._attn_implementation == expected


def test_a_checkpoint_trained_with_our_kernel_loads_in_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlhfkit.models.attention import register

    model = load_model("tiny")
    model.set_attn_implementation(register())
    model.save_pretrained(tmp_path)
    assert FP32_MATMUL not in (tmp_path / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path)
