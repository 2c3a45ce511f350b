"""The demo pipeline end to end on the tiny model: stages, the loop, resumability, the reports."""

import json

from rlhfkit.demo.pipeline import DemoSettings, run_demo
from rlhfkit.loop.registry import Registry


def _settings(tmp_path, **kw):
    return DemoSettings(out=tmp_path / "demo", model="tiny", train_per_family=4, test_per_family=2,
                        sft_steps=2, sft_batch=2, max_new_tokens=4, precision="fp32", rounds=1, loop_prompts=4,
                        loop_samples=2, loop_pairs=1, loop_steps=2, loop_batch=2, kl_prompts=2,
                        pref_prompts=24, samples_per_prompt=2, rm_steps=2, rm_batch=2, dpo_steps=2, dpo_batch=2,
                        dpo_losses=("dpo",), rl_algorithms=("grpo",), rl_steps=1, rl_prompts_per_step=2,
                        rl_group_size=2, overopt_steps=2, **kw)


def test_quick_demo_is_sft_then_the_loop_and_its_report(tmp_path):
    ctx = run_demo(_settings(tmp_path))
    stages = sorted(p.stem for p in (tmp_path / "demo" / "stages").glob("*.json"))
    assert stages == ["data", "loop", "sft"]
    assert ctx.results["data"]["test_checkable"] == 8  # 4 checkable families × 2
    rounds = ctx.results["loop"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[0]["n"] == 8
    with Registry(tmp_path / "demo" / "loop") as reg:
        assert str(reg.model_of(0)).endswith("sft/final")
        assert reg.rounds()[1]["config"]["feedback"] == ["rules"]
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "Round 0 is the SFT model" in report and "rlhf demo --compare" in report and "<script" not in report
    assert not (tmp_path / "demo" / "comparison.html").exists()
    assert (tmp_path / "demo" / "sft" / "final").is_dir() and not (tmp_path / "demo" / "sft" / "checkpoints").exists()


def test_presets_full_is_a_larger_loop_and_compare_adds_the_algorithms(tmp_path):
    quick, full = DemoSettings.quick(tmp_path), DemoSettings.full(tmp_path)
    assert (quick.rounds, quick.test_per_family, quick.eval_base, quick.compare_algorithms) == (2, 100, False, False)
    assert (full.rounds, full.loop_prompts, full.loop_steps, full.test_per_family) == (4, 128, 24, 200)
    assert full.eval_base and not full.compare_algorithms
    # every round of --full draws fresh prompts: 4 × 128 from a pool of 4 × 200; the quick loop's pool is SFT's
    loop = full.loop_config("sft")
    assert loop.demo_per_family * 4 >= full.rounds * full.loop_prompts
    assert quick.loop_config("sft").demo_per_family == quick.train_per_family
    assert quick.loop_config("sft").demo_per_family * 4 >= quick.rounds * quick.loop_prompts  # fresh ones too
    # --full retrains SFT on all labels so far each round, one pass over them: 24, 48, 72, 96 steps
    assert (loop.init, loop.steps) == ("start", 24)
    assert [loop.for_round(r).steps for r in (1, 2, 3, 4)] == [24, 48, 72, 96]
    assert quick.loop_config("sft").init == "previous" and quick.loop_config("sft").per_round == {}
    both = DemoSettings.full(tmp_path, compare=True)
    assert both.compare_algorithms and both.rounds == 4 and both.dpo_losses == ("dpo", "ipo", "kto")
    compare = DemoSettings.compare(tmp_path)
    assert compare.compare_algorithms and compare.rounds == 2 and compare.rl_steps == 16
    assert DemoSettings.full(tmp_path, rounds=3).rounds == 3  # a keyword overrides the preset


def test_full_demo_adds_the_base_model_and_the_algorithm_comparison(tmp_path):
    ctx = run_demo(_settings(tmp_path, eval_base=True, compare_algorithms=True))
    for stage in ("data", "eval_base", "sft", "loop", "eval_sft", "preferences", "rm", "dpo", "grpo", "overopt",
                  "judge_eval"):
        assert (tmp_path / "demo" / "stages" / f"{stage}.json").exists(), stage
    assert ctx.results["eval_sft"]["n"] == 8
    comparison = (tmp_path / "demo" / "comparison.html").read_text()
    assert "Gold accuracy per stage" in comparison and "after SFT" in comparison and "<script" not in comparison
    assert "before SFT" in (tmp_path / "demo" / "report.html").read_text()
    # Finished stages keep their final model, not their resume checkpoints.
    for stage in ("sft", "rm", "dpo", "grpo"):
        folder = tmp_path / "demo" / stage
        assert (folder / "final").is_dir() and not (folder / "checkpoints").exists()


def test_demo_rerun_skips_finished_stages(tmp_path):
    run_demo(_settings(tmp_path))
    marker = tmp_path / "demo" / "stages" / "sft.json"
    before = json.loads(marker.read_text())
    loop_before = (tmp_path / "demo" / "stages" / "loop.json").read_text()
    ctx = run_demo(_settings(tmp_path))
    assert ctx.results["sft"] == before
    assert marker.read_text() == json.dumps(before, indent=2)
    assert (tmp_path / "demo" / "stages" / "loop.json").read_text() == loop_before
