"""Which layout SFT, DPO and the reward model train with when `packing` is left unset.

Unset, a recipe packs on CPU with rlhfkit's own attention kernels (`train.modules.resolve_packing`)
and pads, length-grouped, otherwise; set, the user's choice holds. Each case runs one step of
the tiny model and records the `packed` argument the recipe hands its collate function.
"""

import json
from pathlib import Path

import pytest

from rlhfkit.recipes import dpo, reward, sft

PAIRS = [{"prompt": f"Say {w}.", "chosen": w, "rejected": w[::-1] + "?"} for w in ("ab", "hello", "sun", "tree")]
SFT_ROWS = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def spy_on(monkeypatch, module, name: str) -> list:
    """Replace module.name by a wrapper that records each call's `packed` argument."""
    seen: list = []
    original = getattr(module, name)

    def collate(*args, packed, **kwargs):
        seen.append(packed)
        return original(*args, packed=packed, **kwargs)

    monkeypatch.setattr(module, name, collate)
    return seen


def run_sft(tmp_path, **settings):
    cfg = sft.SFTConfig(model="tiny", train_data=write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS),
                        output_dir=str(tmp_path / "sft"), max_steps=1, batch_size=4, progress=False,
                        precision="fp32", **settings)
    sft.run_sft(cfg)


def run_dpo(tmp_path, **settings):
    cfg = dpo.DPOConfig(model="tiny", train_data=write_jsonl(tmp_path / "pairs.jsonl", PAIRS),
                        output_dir=str(tmp_path / "dpo"), max_steps=1, batch_size=4, progress=False,
                        precision="fp32", **settings)
    dpo.run_dpo(cfg)


def run_reward(tmp_path, **settings):
    cfg = reward.RewardConfig(model="tiny", train_data=write_jsonl(tmp_path / "pairs.jsonl", PAIRS),
                              output_dir=str(tmp_path / "rm"), max_steps=1, batch_size=4, progress=False,
                              precision="fp32", test_fraction=0.0, **settings)
    reward.run_reward(cfg)


RECIPES = {"sft": (sft, "collate", run_sft), "dpo": (dpo, "collate_pairs", run_dpo),
           "rm": (reward, "collate_pairs", run_reward)}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
@pytest.mark.parametrize("settings,packed", [
    ({}, True),                                   # unset, CPU, attention "auto" (fp32-matmul): packed
    ({"attention": "sdpa"}, False),               # unset, transformers' kernel: padded
    ({"packing": False}, False),                  # set: the user's choice holds
])
def test_unset_packing_packs_on_cpu_with_our_kernels(tmp_path, monkeypatch, recipe, settings, packed):
    module, collate_name, run = RECIPES[recipe]
    seen = spy_on(monkeypatch, module, collate_name)
    run(tmp_path, **settings)
    assert seen and set(seen) == {packed}
