"""sft → dpo → rm with their default run folders, in one working directory, as a newcomer types
them: each command writes its own folder, none resumes or touches another's, each ends naming
its model and the next commands, and rerunning the finished SFT trains nothing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from typer.testing import CliRunner

from rlhfkit.cli import app
from rlhfkit.train.metrics import read_metrics

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rlhf(*args: str) -> list[str]:
    """Run `rlhf ARGS`; its output lines (it must succeed)."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def tail(lines: list[str], start: str) -> list[str]:
    """The closing lines, from the one starting with `start`."""
    i = next(i for i, line in enumerate(lines) if line.startswith(start))
    return lines[i:]


def test_sft_dpo_rm_with_default_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("sft.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"{i} {i}"}) + "\n"
                                         for i in range(8)))
    Path("prefs.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}", "chosen": f"{i}",
                                                       "rejected": f"{i + 1} no"}) + "\n" for i in range(10)))
    steps = ["--max-steps", "2"]

    sft_out = rlhf("sft", "--model", "tiny", "--train-data", "sft.jsonl", *steps)
    sft_final = Path("runs/sft/final")
    assert (sft_final / "config.json").is_file()
    sft_before = tree_digest(Path("runs/sft"))
    sft_end = tail(sft_out, "model:")
    assert sft_end == ["model: runs/sft/final",
                       "next:  rlhf dpo --model runs/sft/final --train-data PAIRS",
                       "       rlhf eval --model runs/sft/final --reference tiny",
                       "       rlhf push runs/sft --to DIR"]

    dpo_out = rlhf("dpo", "--model", "runs/sft/final", "--train-data", "prefs.jsonl", *steps)
    rm_out = rlhf("rm", "train", "--model", "runs/sft/final", "--train-data", "prefs.jsonl", *steps)
    assert tail(dpo_out, "model:")[0] == "model: runs/dpo/final"
    assert tail(rm_out, "reward model:")[:3] == [
        "reward model: runs/rm/final",
        "next:  rlhf rm eval --model runs/rm/final --data HELD_OUT_PAIRS",
        "       rlhf ppo --model runs/sft/final --prompts PROMPTS --reward rm:runs/rm/final"]

    # Three folders, one run each, each from step 0: nothing resumed, replaced or moved aside.
    assert sorted(p.name for p in Path("runs").iterdir()) == ["dpo", "rm", "sft"]
    for name, kind in (("sft", "sft"), ("dpo", "dpo"), ("rm", "rm")):
        run = Path("runs") / name
        recorded = json.loads((run / "run.json").read_text())
        assert recorded["kind"] == kind and recorded["finished_step"] == 2
        assert [row["step"] for row in read_metrics(run) if "loss" in row] == [1, 2]
        assert (run / "final" / "config.json").is_file()
        assert not list(run.glob("replaced-*"))
    sft_path = str(sft_final.resolve())
    assert json.loads(Path("runs/dpo/run.json").read_text())["config"]["model"] == sft_path
    assert json.loads(Path("runs/rm/run.json").read_text())["config"]["model"] == sft_path
    assert tree_digest(Path("runs/sft")) == sft_before  # its two consumers left the SFT run as it was

    # The same SFT command again: the run finished, so nothing trains and nothing is rewritten.
    again = rlhf("sft", "--model", "tiny", "--train-data", "sft.jsonl", *steps)
    assert "holds a finished sft run" in " ".join(" ".join(again).split())
    assert tail(again, "model:") == sft_end
    assert tree_digest(Path("runs/sft")) == sft_before
