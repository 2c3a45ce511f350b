"""The real embedded model, end to end (slow: about a minute on 2 CPU cores)."""

import pytest
import torch

from rlhfkit.demo.pipeline import DemoSettings, run_demo
from rlhfkit.models.loading import embedded_checkpoint, load_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedded():
    try:
        embedded_checkpoint()
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"embedded model unavailable ({e}); run: bash scripts/setup.sh")
    return load_tokenizer("embedded"), load_model("embedded")


def test_embedded_checkpoint_loads_as_plain_transformers(embedded):
    from transformers import AutoModelForCausalLM

    tok, model = embedded
    again = AutoModelForCausalLM.from_pretrained(embedded_checkpoint())
    ids = tok("Hello", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, again(ids).logits)
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152


def test_demo_pipeline_on_the_embedded_model(tmp_path, embedded):
    torch.set_num_threads(2)
    settings = DemoSettings(out=tmp_path / "demo", train_per_family=8, test_per_family=2, sft_steps=3,
                            sft_batch=4, max_new_tokens=24, rounds=1, loop_prompts=8, loop_samples=2, loop_pairs=1,
                            loop_steps=2, loop_batch=2, kl_prompts=2, compare_algorithms=True, pref_prompts=12,
                            samples_per_prompt=2, rm_steps=2, rm_batch=4, dpo_losses=("dpo",), dpo_steps=2,
                            dpo_batch=4, rl_algorithms=("grpo",), rl_steps=1, rl_prompts_per_step=2,
                            rl_group_size=2, overopt_steps=0, judge_max_new_tokens=16)
    ctx = run_demo(settings)
    assert ctx.results["eval_sft"]["n"] == 8
    assert [r["round"] for r in ctx.results["loop"]["rounds"]] == [0, 1]
    assert {"preferences", "rm", "dpo", "grpo", "judge_eval"} <= set(ctx.results)
    assert ctx.results["sft"]["train_loss"] < 3.0  # a real model fine-tuning, not random init
    assert (tmp_path / "demo" / "sft" / "final" / "model.safetensors").exists()
