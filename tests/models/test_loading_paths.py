"""`models.loading`: every wrong `--model` is one ModelNotFound line, found without the network
when the name is a path, and with at most one quick hub request when it is a hub id."""

import json

import pytest

from rlhfkit.models import loading
from rlhfkit.models.loading import ModelNotFound, load_model, load_tokenizer, looks_like_path, resolve_model_path


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any hub request fails the test unless a test installs its own answer."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise AssertionError(f"asked the hub about {repo_id}")

    monkeypatch.setattr(loading.HfApi, "model_info", model_info)
    loading._check_hub.cache_clear()
    return calls


@pytest.mark.parametrize("name", ["runs/nope", "./model", "../x", "/abs/model", "~/model", "a/b/c",
                                  "model.safetensors"])
def test_a_missing_path_fails_at_once_without_asking_the_hub(name):
    with pytest.raises(ModelNotFound, match=f"^no such model folder: {name}$".replace(".", r"\.")):
        resolve_model_path(name)


def test_owner_name_is_a_path_when_owner_is_a_local_folder(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert looks_like_path("checkpoints/final")
    assert not looks_like_path("HuggingFaceTB/SmolLM2-135M")
    assert not looks_like_path("gpt2")


def test_a_folder_without_config_json_is_not_a_model(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(ModelNotFound, match="^'data' is a folder but not a model: it has no config.json$"):
        load_tokenizer("data")


def test_a_run_folder_points_at_its_final_model(tmp_path):
    (tmp_path / "runs" / "sft" / "final").mkdir(parents=True)
    (tmp_path / "runs" / "sft" / "final" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match="its final/ folder is one: --model runs/sft/final"):
        load_model("runs/sft")


def test_a_file_is_not_a_model_folder(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotFound, match="^model 'weights.bin' is a file, not a model folder"):
        load_model("weights.bin")


def test_a_model_folder_without_a_tokenizer_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelNotFound) as e:
        load_tokenizer("m")
    assert str(e.value).startswith("cannot load the tokenizer of model 'm': ")
    assert "\n" not in str(e.value)


def test_a_hub_id_offline_and_not_cached_fails_without_a_request(monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFound, match="not a local folder and not in the Hugging Face cache "
                                            r"\(HF_HUB_OFFLINE is set\)"):
        load_tokenizer("someone/some-model")
    assert no_network == []


def test_a_hub_id_with_no_network_is_one_request_then_one_line(monkeypatch):
    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(kwargs.get("timeout"))
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(loading.HfApi, "model_info", unreachable)
    with pytest.raises(ModelNotFound, match=r"the hub cannot be reached \(ConnectionError\); pass a local model "
                                            "folder or set up network access"):
        load_model("someone/some-model")
    assert len(calls) == 1 and calls[0] is not None  # one request, with a timeout


def test_a_hub_id_in_the_cache_loads_from_the_cache_folder(monkeypatch, tmp_path, no_network):
    snapshot = tmp_path / "hf-cache" / "snapshot"  # what snapshot_download returns for a cached id
    monkeypatch.setattr(loading, "snapshot_download",
                        lambda repo_id, local_files_only: str(snapshot) if local_files_only else None)
    assert resolve_model_path("someone/some-model") == str(snapshot)
    assert no_network == []


def test_an_invalid_name_is_no_such_folder():
    with pytest.raises(ModelNotFound, match="^no such model folder: my model$"):
        resolve_model_path("my model")


def test_a_lora_adapter_starts_from_its_seed_alone():
    """Every process of a distributed run (and a rerun) must start from the same adapter:
    its initial weights depend on `seed`, not on what the global RNG did before."""
    import torch

    from rlhfkit.models.loading import LoraSettings

    def adapter(seed: int, noise: int):
        torch.manual_seed(noise)
        torch.rand(noise + 1)  # a different global RNG state each time
        model = load_model("tiny", lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")), seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, again, other = adapter(3, 1), adapter(3, 7), adapter(4, 1)
    assert first and all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)
