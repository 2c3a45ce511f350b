"""SFT data options reach the loss: every assistant turn or the last, per-example weights,
KTO files (undesirable rows left out), dataset splits and column renames — through `run_sft`
and metrics.jsonl only, against counts and values worked out by hand."""

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.data.schemas import as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.sft import SFTConfig, run_sft
from rlhfkit.train.metrics import read_metrics

# A 2-turn conversation; the byte-level ChatML tokenizer counts each reply as its bytes +
# "<|im_end|>" + "\n": "ab" → 4 tokens, "cd" → 4 tokens.
TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ab"},
             {"role": "user", "content": "x"}, {"role": "assistant", "content": "cd"}]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def step1(tmp_path: Path, data, **overrides) -> dict:
    cfg = SFTConfig(**{"model": "tiny", "train_data": str(data), "output_dir": str(tmp_path / "run"),
                       "max_steps": 1, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "max_grad_norm": 1e9,
                       "precision": "fp32", "progress": False, "seed": 4, **overrides})
    run_sft(cfg)
    (row,) = [r for r in read_metrics(cfg.output_dir) if "loss" in r]
    return row


@pytest.mark.parametrize("assistant_turns, units", [("all", 8), ("last", 4)])
def test_assistant_turns_all_trains_every_reply(tmp_path, assistant_turns, units):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": TWO_TURNS}])
    assert step1(tmp_path, data, assistant_turns=assistant_turns)["units"] == units


def test_assistant_turns_default_is_all():
    assert SFTConfig(train_data="x.jsonl").assistant_turns == "all"
    with pytest.raises(ConfigError):
        SFTConfig(train_data="x.jsonl", assistant_turns="first")


def nll_sum(model, prompt: str, completion: str, token_logprobs_from_logits) -> tuple[float, int]:
    enc = encode_pair(tiny_tokenizer(), as_conversation(prompt), completion)
    labels = torch.tensor([enc.labels])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([enc.input_ids])).logits
    return float(-token_logprobs_from_logits(logits, labels).sum()), int((labels != -100).sum())


@pytest.mark.parametrize("packing", [False, True])
def test_weight_scales_the_example_loss(tmp_path, packing, token_logprobs_from_logits):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Say ab.", "completion": "ab", "weight": 3.0},
                                                {"prompt": "Greet me.", "completion": "hello world"}])
    row = step1(tmp_path, data, packing=packing)
    model = tiny_causal_lm(seed=4)
    (a, n_a), (b, n_b) = (nll_sum(model, p, c, token_logprobs_from_logits)
                          for p, c in (("Say ab.", "ab"), ("Greet me.", "hello world")))
    assert (n_a, n_b) == (4, 13) and row["units"] == 17  # the normalizer is the token count, unweighted
    assert row["loss"] == pytest.approx((3.0 * a + b) / 17, abs=2e-5)
    assert row["loss"] != pytest.approx((a + b) / 17, abs=1e-3)  # the weight made a difference


def test_kto_file_trains_only_the_desirable_completions(tmp_path):
    data = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Say ab.", "completion": "ab", "label": True},
        {"prompt": "Say ab.", "completion": "a very wrong answer", "label": False}])
    row = step1(tmp_path, data)
    assert row["units"] == 4  # "ab" + <|im_end|> + "\n" only
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["train_examples"], report["skipped"]) == (1, {"undesirable (label false)": 1})


def test_data_split_and_columns_reach_the_reader(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train_sft": Dataset.from_list([{"question": "Say ab.", "answer": "ab"}]),
                 "test_sft": Dataset.from_list([{"question": "Greet me.", "answer": "hello world"}])}
                ).save_to_disk(str(tmp_path / "ds"))
    row = step1(tmp_path, tmp_path / "ds", data_split="train_sft", data_columns="prompt=question,completion=answer",
                eval_data=str(tmp_path / "ds"), eval_split="test_sft", eval_every=1)
    assert row["units"] == 4  # "ab": the train_sft split, not test_sft (13 tokens)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert (report["train_used"], report["eval_used"]) == (1, 1)


def test_bad_column_mapping_is_a_config_error():
    with pytest.raises(ConfigError, match="'data_columns': 'prompt' is not field=column"):
        SFTConfig(train_data="x.jsonl", data_columns="prompt")
