"""DPO and reward-model recipes read the split and the column names they are given, and DPO
on an SFT file says it is SFT data (not "use --loss kto")."""

import json
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.recipes.dpo import DPOConfig, run_dpo
from rlhfkit.recipes.reward import RewardConfig, read_splits
from rlhfkit.train.metrics import read_metrics


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dpo_config(tmp_path: Path, data, **overrides) -> DPOConfig:
    return DPOConfig(**{"model": "tiny", "train_data": str(data), "output_dir": str(tmp_path / "run"),
                        "max_steps": 1, "batch_size": 8, "precision": "fp32", "progress": False, "seed": 3,
                        **overrides})


def save_prefs(path: Path) -> Path:
    """A DatasetDict with UltraFeedback-binarized split names and its own column names:
    3 pairs in train_prefs, 1 in test_prefs."""
    from datasets import Dataset, DatasetDict

    def rows(words):
        return [{"question": f"Name {w}.", "good": f"{w}!", "bad": w} for w in words]

    DatasetDict({"train_prefs": Dataset.from_list(rows(["cat", "dog", "owl"])),
                 "test_prefs": Dataset.from_list(rows(["elk"]))}).save_to_disk(str(path))
    return path


COLUMNS = "prompt=question,chosen=good,rejected=bad"


def test_dpo_reads_the_named_split_with_renamed_columns(tmp_path):
    data = save_prefs(tmp_path / "uf")
    run_dpo(dpo_config(tmp_path, data, data_split="train_prefs", data_columns=COLUMNS))
    (row,) = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert row["units"] == 3  # the pairs of train_prefs, one step over all of them


def test_dpo_without_the_split_names_the_available_ones(tmp_path):
    data = save_prefs(tmp_path / "uf")
    with pytest.raises(DataError, match="split 'train' not found; available: train_prefs, test_prefs"):
        run_dpo(dpo_config(tmp_path, data, data_columns=COLUMNS))


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_on_sft_data_says_it_is_sft_data(tmp_path, loss):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "Say ab.", "completion": "ab"}])
    with pytest.raises(DataError) as info:
        run_dpo(dpo_config(tmp_path, data, loss=loss))
    message = str(info.value)
    assert message.startswith(f"{data}:1: this looks like SFT data (prompt + completion, messages, ...), "
                              "not preference pairs: DPO and reward models need prompt + chosen + rejected")
    assert "\n" not in message


def test_reward_model_reads_the_named_splits(tmp_path):
    data = save_prefs(tmp_path / "uf")
    cfg = RewardConfig(train_data=str(data), eval_data=str(data), data_split="train_prefs",
                       eval_split="test_prefs", data_columns=COLUMNS)
    train, held_out, _ = read_splits(cfg)
    assert sorted(p.chosen for p in train) == ["cat!", "dog!", "owl!"]
    assert [p.chosen for p in held_out] == ["elk!"]


@pytest.mark.parametrize("config", [DPOConfig, RewardConfig])
def test_split_and_columns_fields_are_shared(config):
    cfg = config(train_data="x.jsonl")
    assert (cfg.data_split, cfg.eval_split, cfg.data_columns) == ("train", "", "")
    with pytest.raises(ConfigError, match="'data_columns'"):
        config(train_data="x.jsonl", data_columns="chosen")
