"""`rlhf push`: a run folder (or its model, or a loop round) becomes one folder holding the
model, its LoRA adapter, the run's records and a model card written from them; a Hub target
goes through `HfApi.upload_folder` (mocked here: the tests run offline)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from rlhfkit import __version__
from rlhfkit.cli import app
from rlhfkit.eval import model_card
from rlhfkit.eval.model_card import EMBEDDED_HUB_ID, CardFacts, front_matter, is_hub_target, lineage, render_card
from rlhfkit.loop.registry import Registry
from rlhfkit.train.identity import IDENTITY_FILE

runner = CliRunner(env={"COLUMNS": "200", "TERMINAL_WIDTH": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A finished 2-step LoRA SFT run of the tiny model: final/, final-adapter/, run.json, metrics.jsonl."""
    from rlhfkit.recipes.sft import SFTConfig, run_sft

    root = tmp_path_factory.mktemp("push")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": f"{i} {i}"}) + "\n" for i in range(6)))
    run_sft(SFTConfig(model="tiny", train_data=str(data), output_dir=str(root / "runs" / "sft"), max_steps=2,
                      batch_size=4, lora_r=4, precision="fp32", progress=False))
    return root / "runs" / "sft"


@pytest.fixture
def run_dir(lora_run, tmp_path, monkeypatch) -> Path:
    """A copy of the LoRA run in the test's own working directory, at runs/sft."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copytree(lora_run, tmp_path / "runs" / "sft")
    return Path("runs/sft")


def push(*args: str):
    return runner.invoke(app, ["push", *args])


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if "error:" in line]


def card_of(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_push_to_a_folder_writes_the_model_adapter_records_and_card(run_dir):
    result = push(str(run_dir), "--to", "./exports/sft")
    assert result.exit_code == 0, result.output
    out = Path("exports/sft")
    # The model at the top, loadable as it was saved; the adapter and the run's records beside it.
    final = load_file(run_dir / "final" / "model.safetensors")
    pushed = load_file(out / "model.safetensors")
    assert final.keys() == pushed.keys() and all((final[k] == pushed[k]).all() for k in final)
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "training" / IDENTITY_FILE).read_text())["kind"] == "sft"
    assert (out / "training" / "metrics.jsonl").read_text() == (run_dir / "metrics.jsonl").read_text()
    assert not list(Path("exports").glob(".*"))  # the atomic write left no temporary folder

    meta, body = card_of(out)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["rlhfkit", "sft", "lora"]
    assert "base_model" not in meta  # 'tiny' is no Hub model
    recorded = json.loads((run_dir / IDENTITY_FILE).read_text())
    assert recorded["data"]["train_data"]["sha256"] in body
    assert "supervised fine-tuning" in body and "2 optimizer steps" in body
    last_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]["loss"]
    assert f"| loss | {last_loss:.4g} | 2 |" in body
    assert "| lora_r | 4 |" in body
    assert 'AutoModelForCausalLM.from_pretrained("./exports/sft")' in body
    assert 'subfolder="adapter"' in body
    assert f"rlhfkit {__version__}" in body


def test_its_model_folder_pushes_the_same_run(run_dir):
    assert push(str(run_dir / "final"), "--to", "./a/model").exit_code == 0
    assert push(str(run_dir), "--to", "./b/model").exit_code == 0
    card_a, card_b = (Path(d) / "model" / "README.md" for d in "ab")
    assert card_a.read_text().replace("./a/", "./b/") == card_b.read_text()
    assert (Path("a") / "model" / "adapter").is_dir()


def test_a_non_empty_folder_is_kept_unless_overwrite(run_dir):
    out = Path("exports/sft")
    out.mkdir(parents=True)
    (out / "mine.txt").write_text("keep me")
    result = push(str(run_dir), "--to", str(out))
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert "is not empty" in result.output and "--overwrite" in result.output
    assert (out / "mine.txt").read_text() == "keep me"

    assert push(str(run_dir), "--to", str(out), "--overwrite").exit_code == 0
    assert not (out / "mine.txt").exists() and (out / "README.md").is_file()


def test_an_empty_existing_folder_is_written(run_dir):
    Path("empty").mkdir()
    assert push(str(run_dir), "--to", "empty").exit_code == 0
    assert (Path("empty") / "model.safetensors").is_file()


@pytest.mark.parametrize("target", ["runs/sft/export", "runs", "runs/sft"])
def test_a_target_overlapping_the_run_is_refused_even_with_overwrite(run_dir, target):
    before = digest(run_dir)
    result = push(str(run_dir), "--to", target, "--overwrite")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert "overlaps the run" in result.output
    assert digest(run_dir) == before


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda: None, "nope: no such run or model folder"),
    (lambda: Path("nope").write_text("x"), "nope is a file"),
    (lambda: (Path("nope").mkdir(), (Path("nope") / "notes.txt").write_text("x")), "neither a run folder"),
])
def test_a_source_that_is_no_run_is_one_error_line(run_dir, make, fragment):
    make()
    result = push("nope", "--to", "./out")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert fragment in result.output and "Traceback" not in result.output
    assert not Path("out").exists()


def test_a_run_that_has_not_finished_names_its_checkpoint(run_dir):
    shutil.rmtree(run_dir / "final")
    (run_dir / "checkpoints" / "step-000001").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000001" / "trainer_state.json").write_text('{"step": 1}')
    result = push(str(run_dir), "--to", "./out")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert "no final model yet: its latest checkpoint is step-000001" in " ".join(result.output.split())


class FakeHub:
    """HfApi's create_repo and upload_folder, recording what would have been sent."""

    calls: list = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        folder = Path(folder_path)
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self.calls.append(("upload_folder", repo_id, {**kw, "files": files,
                                                      "card": (folder / "README.md").read_text()}))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_card, "HfApi", FakeHub)
    monkeypatch.setattr(model_card, "get_token", lambda: "hf_test")
    return FakeHub


def test_a_hub_target_uploads_the_same_folder(run_dir, fake_hub):
    result = push(str(run_dir), "--to", "me/sft-model", "--private", "-m", "first push")
    assert result.exit_code == 0, result.output
    assert "https://huggingface.co/me/sft-model/commit/abc" in result.output
    (_, repo, create), (_, repo2, upload) = fake_hub.calls
    assert repo == repo2 == "me/sft-model" and create["private"] is True and create["exist_ok"] is True
    assert upload["commit_message"] == "first push"
    assert {"README.md", "model.safetensors", "config.json", "adapter/adapter_config.json",
            "training/run.json"} <= set(upload["files"])
    assert 'from_pretrained("me/sft-model")' in upload["card"]
    assert not Path("me").exists()


def test_a_hub_failure_is_one_error_line(run_dir, fake_hub, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, *, repo_id, folder_path, **kw):
        response = httpx2.Response(403, request=httpx2.Request("POST", "https://huggingface.co/api/models"))
        raise HfHubHTTPError("403 Forbidden: you may not write to me/sft-model\nmore detail", response=response)

    monkeypatch.setattr(FakeHub, "upload_folder", refuse)
    result = push(str(run_dir), "--to", "me/sft-model")
    assert result.exit_code == 2 and error_lines(result) == [
        "error: push to the Hub repo me/sft-model failed: 403 Forbidden: you may not write to me/sft-model"]


def test_offline_or_without_a_token_a_hub_target_fails_at_once(run_dir, fake_hub, monkeypatch):
    monkeypatch.setattr(model_card, "get_token", lambda: None)
    result = push(str(run_dir), "--to", "me/sft-model")
    assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
    assert "no Hugging Face token" in result.output and "--to ./me/sft-model" in result.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = push(str(run_dir), "--to", "me/sft-model")
    assert result.exit_code == 2 and "HF_HUB_OFFLINE" in result.output
    assert fake_hub.calls == []


def test_which_targets_are_hub_repos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exports").mkdir()
    assert is_hub_target("me/model")
    for local in ("./me/model", "out", "runs/x", "a/b/c", "exports/model", "/abs/model", "~/model", "me/bad name"):
        assert not is_hub_target(local), local


def _fake_run(folder: Path, kind: str, model: str) -> Path:
    (folder / "final").mkdir(parents=True)
    (folder / "final" / "config.json").write_text("{}")
    (folder / IDENTITY_FILE).write_text(json.dumps({"kind": kind, "config": {"model": model}, "data": {}}))
    return folder / "final"


def test_lineage_follows_run_folders_back_to_the_hub_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sft = _fake_run(tmp_path / "runs" / "sft", "sft", "Org/Base-1B")
    dpo = _fake_run(tmp_path / "runs" / "dpo", "dpo", str(sft.resolve()))
    assert lineage(str(dpo)) == [("runs/dpo/final", "dpo"), ("runs/sft/final", "sft"), ("Org/Base-1B", None)]
    facts = CardFacts(kind="dpo", config={"loss": "ipo", "model": str(dpo)}, lineage=lineage(str(dpo)),
                      data={"train_data": {"path": "Org/prefs", "sha256": None},
                            "eval_data": {"path": "test.jsonl", "sha256": "ab" * 32}})
    meta = front_matter(facts)
    assert meta["base_model"] == "Org/Base-1B" and meta["datasets"] == ["Org/prefs"]
    assert meta["tags"] == ["rlhfkit", "dpo", "ipo"]
    card = render_card(facts, where="me/x")
    assert "**IPO**" in card and "1/(2β)" in card
    assert "Started from `runs/dpo/final` (from the `dpo` recipe), trained from `runs/sft/final`" in card
    assert "`" + "ab" * 32 + "`" in card


@pytest.mark.parametrize(("origin", "base"), [("embedded", EMBEDDED_HUB_ID), ("tiny", None), ("Org/M", "Org/M"),
                                              ("runs/gone/final", None), ("gpt2", None)])
def test_base_model_is_a_hub_id_or_nothing(origin, base):
    assert front_matter(CardFacts(kind="sft", lineage=[(origin, None)])).get("base_model") == base


def test_a_loop_round_is_pushed_from_the_registry(run_dir):
    loop = Path("runs/loop")
    shutil.copytree(run_dir, loop / "rounds" / "r1" / "model")
    with Registry(loop) as reg:
        reg.register_round(0, parent_model=None, model="tiny", config={}, package_version=__version__, metrics={})
        reg.register_round(1, parent_model="tiny", model=str(loop / "rounds" / "r1" / "model" / "final"), config={},
                           package_version=__version__, metrics={})
    result = push(str(loop), "--round", "1", "--to", "./r1")
    assert result.exit_code == 0, result.output
    meta, body = card_of(Path("r1"))
    assert meta["tags"][:2] == ["rlhfkit", "sft"] and (Path("r1") / "adapter").is_dir()

    for args, fragment in [([], "is a loop folder: choose the round to push with --round N"),
                           (["--round", "0"], "trained no model of its own"),
                           (["--round", "7"], "has no round 7; registered rounds: 0, 1")]:
        result = push(str(loop), *args, "--to", "./other")
        assert result.exit_code == 2 and len(error_lines(result)) == 1, result.output
        assert fragment in result.output
    result = push(str(run_dir), "--round", "1", "--to", "./other")
    assert result.exit_code == 2 and "--round is for a loop folder" in result.output
