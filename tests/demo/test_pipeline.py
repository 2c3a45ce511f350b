"""The demo pipeline end to end on the tiny model: stages, resumability, the report."""

import json

from rlhfkit.demo.pipeline import DemoSettings, run_demo


def _settings(tmp_path):
    return DemoSettings(out=tmp_path / "demo", model="tiny", train_per_family=4, test_per_family=2,
                        sft_steps=2, sft_batch=2, max_new_tokens=4, precision="fp32",
                        pref_prompts=24, samples_per_prompt=2, rm_steps=2, rm_batch=2, dpo_steps=2, dpo_batch=2,
                        dpo_losses=("dpo",), rl_algorithms=("grpo",), rl_steps=1, rl_prompts_per_step=2,
                        rl_group_size=2, overopt_steps=2)


def test_demo_runs_all_stages_and_writes_a_report(tmp_path):
    ctx = run_demo(_settings(tmp_path))
    for stage in ("data", "eval_base", "sft", "eval_sft", "preferences", "rm", "dpo", "grpo", "overopt", "judge_eval"):
        assert (tmp_path / "demo" / "stages" / f"{stage}.json").exists(), stage
    assert ctx.results["data"]["test_checkable"] == 8  # 4 checkable families × 2
    assert ctx.results["eval_sft"]["n"] == 8
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "Gold accuracy per stage" in report and "after SFT" in report
    assert "<script" not in report  # self-contained, static
    # Finished stages keep their final model, not their resume checkpoints.
    for stage in ("sft", "rm", "dpo", "grpo"):
        folder = tmp_path / "demo" / stage
        assert (folder / "final").is_dir() and not (folder / "checkpoints").exists()


def test_demo_rerun_skips_finished_stages(tmp_path):
    run_demo(_settings(tmp_path))
    marker = tmp_path / "demo" / "stages" / "sft.json"
    before = json.loads(marker.read_text())
    ctx = run_demo(_settings(tmp_path))
    assert ctx.results["sft"] == before
    assert marker.read_text() == json.dumps(before, indent=2)
