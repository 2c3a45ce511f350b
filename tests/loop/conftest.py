"""A tiny loop: the random tiny policy, a few prompts with exact answers, and a tiny reward
model (trained one step) as the machine feedback that always decides a pair."""

from __future__ import annotations

import json

import pytest

from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.registry import Registry
from rlhfkit.recipes.reward import RewardConfig, run_reward


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="session")
def loop_files(tmp_path_factory):
    """{"prompts", "eval", "rm"}: 12 training prompts, 3 evaluation prompts, a tiny reward model."""
    root = tmp_path_factory.mktemp("loop-files")
    prompts = write_jsonl(root / "prompts.jsonl", [
        {"prompt": f"What is {a} plus {b}?", "answer": str(a + b), "task_id": f"add-{a}-{b}"}
        for a in range(3) for b in range(4)])
    evals = write_jsonl(root / "eval.jsonl", [
        {"prompt": f"What is {a} times 2?", "answer": str(2 * a), "task_id": f"mul-{a}"} for a in range(3)])
    pairs = write_jsonl(root / "pairs.jsonl", [{"prompt": "Say hi", "chosen": "hi there", "rejected": "no"}] * 4)
    rm = run_reward(RewardConfig(model="tiny", train_data=pairs, output_dir=str(root / "rm"), max_steps=1,
                                 batch_size=4, test_fraction=0.0, progress=False, precision="fp32"))
    return {"prompts": prompts, "eval": evals, "rm": rm["final"]}


@pytest.fixture
def tiny_loop(loop_files, tmp_path):
    """make(**overrides) → a LoopConfig of the tiny loop in tmp_path/loop (2 prompts × 2 samples a
    round, 1 pair each, reward-model feedback, 2 DPO steps)."""
    def make(**overrides) -> LoopConfig:
        fields = dict(output_dir=str(tmp_path / "loop"), policy="tiny", rounds=1, prompts=loop_files["prompts"],
                      eval_tasks=loop_files["eval"], prompts_per_round=2, samples_per_prompt=2, pairs_per_prompt=1,
                      feedback=(f"rm:{loop_files['rm']}",), steps=2, batch_size=2, max_new_tokens=4, kl_prompts=2,
                      precision="fp32", lr=1e-3)
        fields.update(overrides)
        return LoopConfig(**fields)
    return make


def registry_snapshot(run_dir) -> dict:
    """Everything in a loop's registry but times: what two runs of the same loop must agree on."""
    with Registry(run_dir) as reg:
        return {"steps": [(s.round, s.step, s.status, s.outputs) for s in reg.steps()],
                "artifacts": reg.artifacts(), "rounds": reg.rounds()}


@pytest.fixture(scope="session")
def snapshot():
    """registry_snapshot(run_dir) as a fixture."""
    return registry_snapshot

