"""Engine choices that depend on the hardware: the attention kernel used for training."""

import torch

from rlhfkit.models.loading import load_model
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.train.engine import EAGER_CPU_MAX_LENGTH, Engine, resolve_attention


def test_resolve_attention():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention("auto", cpu, 512) == "eager"
    assert resolve_attention("auto", cpu, EAGER_CPU_MAX_LENGTH + 1) is None  # memory: keep the model's own
    assert resolve_attention("auto", gpu, 512) is None
    assert resolve_attention("sdpa", cpu, 512) == "sdpa"


def test_engine_applies_the_attention_choice(tmp_path):
    for attention, expected in (("auto", "eager"), ("sdpa", "sdpa")):
        cfg = SFTConfig(train_data="unused.jsonl", output_dir=str(tmp_path / attention), model="tiny",
                        attention=attention, max_steps=1, progress=False, precision="fp32")
        model = load_model("tiny")
        Engine(cfg, tmp_path / attention).setup(TokenLogprobs(model, cfg.logprob_chunk))
        assert model.config._attn_implementation == expected
