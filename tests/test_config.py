"""Configs: YAML + overrides precedence, unknown keys with the nearest name, types, ranges,
choices, immutability, save → load."""

import dataclasses

import pytest
import yaml

from rlhfkit.config import ConfigError
from rlhfkit.recipes.sft import SFTConfig
from rlhfkit.train.engine import TrainConfig


def write_yaml(path, text):
    path.write_text(text)
    return path


def config_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_defaults():
    cfg = SFTConfig(train_data="d.jsonl")
    assert (cfg.max_steps, cfg.batch_size, cfg.precision, cfg.packing) == (100, 8, "auto", False)
    assert cfg.lr == 5e-5  # SFT overrides the shared default of 1e-5
    assert TrainConfig().lr == 1e-5


def test_layout_defaults_follow_the_measurements():
    # bench/RESULTS.md: packed pairs with their prompt stored once beat padding for DPO and the
    # reward model (demo batch and the 32–1,024 mix); SFT ties at the demo's lengths and keeps
    # length-grouped padding, whose batches the demo's SFT numbers come from.
    from rlhfkit.recipes.dpo import DPOConfig
    from rlhfkit.recipes.reward import RewardConfig

    for cfg in (DPOConfig(train_data="p.jsonl"), RewardConfig(train_data="p.jsonl")):
        assert cfg.packing and cfg.shares_prompts
    assert not SFTConfig(train_data="d.jsonl").packing


def test_override_beats_yaml_beats_default(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "train_data: d.jsonl\nlr: 1.0e-4\nmax_steps: 7\n")
    cfg = SFTConfig.load(path, overrides={"lr": 2e-4, "seed": None})
    assert cfg.lr == 2e-4        # command line over the file
    assert cfg.max_steps == 7    # file over the default
    assert cfg.batch_size == 8   # default
    assert cfg.seed == 0         # None means "flag not given": the default stays


def test_load_without_file_uses_overrides():
    cfg = SFTConfig.load(None, overrides={"train_data": "d.jsonl", "max_steps": 3})
    assert (cfg.train_data, cfg.max_steps) == ("d.jsonl", 3)


def test_yaml_strings_are_coerced(tmp_path):
    # PyYAML reads `1e-5` (no dot) as a string and quoted numbers stay strings; both are accepted.
    path = write_yaml(tmp_path / "sft.yaml", "train_data: d.jsonl\nlr: 1e-5\nmax_steps: '12'\npacking: 'no'\n")
    cfg = SFTConfig.load(path)
    assert (cfg.lr, cfg.max_steps, cfg.packing) == (1e-5, 12, False)


@pytest.mark.parametrize("typo, nearest", [("lrr", "lr"), ("max_step", "max_steps"), ("batchsize", "batch_size"),
                                           ("train_dat", "train_data")])
def test_unknown_yaml_key_names_the_nearest_field(tmp_path, typo, nearest):
    path = write_yaml(tmp_path / "sft.yaml", f"train_data: d.jsonl\n{typo}: 1\n")
    text = config_error(SFTConfig.load, path)
    assert str(path) in text
    assert f"unknown key '{typo}'" in text
    assert f"did you mean '{nearest}'?" in text


def test_unknown_key_without_a_near_name_lists_the_valid_ones():
    text = config_error(SFTConfig.from_dict, {"zzzzzzzz": 1})
    assert "valid keys:" in text and "max_steps" in text and "train_data" in text


@pytest.mark.parametrize("field, value, expected", [
    ("max_steps", "abc", "'max_steps' must be an integer, got 'abc'"),
    ("max_steps", 2.5, "'max_steps' must be an integer"),
    ("max_steps", True, "'max_steps' must be an integer"),
    ("lr", "fast", "'lr' must be a number, got 'fast'"),
    ("lr", True, "'lr' must be a number"),
    ("packing", "maybe", "'packing' must be true or false"),
    ("model", ["a", "b"], "'model' must be a string"),
    ("seed", None, "'seed' may not be empty"),
])
def test_wrong_type_names_the_field(field, value, expected):
    text = config_error(SFTConfig.from_dict, {"train_data": "d.jsonl", field: value}, source="sft.yaml")
    assert text.startswith("sft.yaml: ")
    assert expected in text


def test_wrong_type_in_yaml_file(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "train_data: d.jsonl\nmax_steps: abc\n")
    text = config_error(SFTConfig.load, path)
    assert str(path) in text and "'max_steps'" in text and "'abc'" in text


@pytest.mark.parametrize("field, value, expected", [
    ("max_steps", 0, "max_steps must be ≥ 1"),
    ("batch_size", 0, "batch_size must be ≥ 1"),
    ("grad_accum", 0, "grad_accum must be ≥ 1"),
    ("lr", 0.0, "lr must be > 0"),
    ("max_length", 4, "max_length must be ≥ 8"),
    ("min_lr_ratio", 1.5, "min_lr_ratio must be in [0, 1]"),
    ("lora_r", -1, "lora_r must be ≥ 0"),
])
def test_range_checks(field, value, expected):
    assert expected in config_error(SFTConfig, train_data="d.jsonl", **{field: value})


def test_range_check_from_yaml(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "train_data: d.jsonl\nmax_steps: 0\n")
    assert "max_steps must be ≥ 1" in config_error(SFTConfig.load, path)


def test_sft_needs_train_data():
    assert "train_data is required" in config_error(SFTConfig)


@pytest.mark.parametrize("field, value", [("precision", "bf32"), ("schedule", "Cosine"), ("tracker", "mlflow")])
def test_choices(field, value):
    text = config_error(SFTConfig, train_data="d.jsonl", **{field: value})
    assert f"'{field}' must be one of" in text and repr(value) in text


def test_precision_choices_listed():
    text = config_error(SFTConfig, train_data="d.jsonl", precision="bf32")
    assert "auto, bf16, fp16, fp32" in text


def test_frozen():
    cfg = SFTConfig(train_data="d.jsonl")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]
    assert cfg.lr == 5e-5


def test_replace_returns_a_new_validated_config():
    cfg = SFTConfig(train_data="d.jsonl")
    changed = cfg.replace(max_steps=5)
    assert (cfg.max_steps, changed.max_steps) == (100, 5)
    with pytest.raises(ConfigError):
        cfg.replace(max_steps=0)


def test_save_then_load_round_trips(tmp_path):
    cfg = SFTConfig(train_data="d.jsonl", lr=3e-4, max_steps=11, precision="fp32", packing=False,
                    model="tiny", output_dir=str(tmp_path / "run"))
    path = tmp_path / "run" / "config.yaml"
    cfg.save(path)
    saved = yaml.safe_load(path.read_text())
    assert next(iter(saved)) == "recipe" and saved["recipe"] == "sft"
    assert SFTConfig.load(path) == cfg


def test_saved_file_accepts_overrides(tmp_path):
    path = tmp_path / "config.yaml"
    SFTConfig(train_data="d.jsonl", max_steps=11).save(path)
    assert SFTConfig.load(path, overrides={"max_steps": 20}).max_steps == 20


def test_recipe_key_is_accepted_on_load(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "recipe: sft\ntrain_data: d.jsonl\n")
    assert SFTConfig.load(path).train_data == "d.jsonl"


def test_missing_config_file(tmp_path):
    assert "config file not found" in config_error(SFTConfig.load, tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "train_data: [unclosed\n")
    text = config_error(SFTConfig.load, path)
    assert str(path) in text and "not valid YAML" in text


def test_yaml_top_level_must_be_a_mapping(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "- lr\n- 1\n")
    assert "top level must be a mapping" in config_error(SFTConfig.load, path)


def test_empty_yaml_file_means_all_defaults(tmp_path):
    path = write_yaml(tmp_path / "sft.yaml", "")
    assert SFTConfig.load(path, overrides={"train_data": "d.jsonl"}) == SFTConfig(train_data="d.jsonl")


def test_help_of():
    assert SFTConfig.help_of("lr") == "peak learning rate (AdamW)"
    with pytest.raises(KeyError):
        SFTConfig.help_of("nope")


def test_a_recipe_key_naming_another_recipe_is_an_error(tmp_path):
    path = write_yaml(tmp_path / "dpo.yaml", "recipe: dpo\ntrain_data: d.jsonl\n")
    with pytest.raises(ConfigError, match="its recipe: line says 'dpo', but this config is for 'sft'"):
        SFTConfig.load(path)
