"""Rollouts from a separate generation server (`rollout/remote.py`): GRPO sampling from a real
`transformers serve` process started here, with the policy handed to it after each update.

`transformers serve` returns no log-probs (see the module docstring of `rollout.remote`), so
"the server's policy follows the trainer's" is checked on what it does return: a greedy decode
of a fixed prompt under a huge repetition penalty, which never repeats a token and so spells
out the order of the most likely next tokens (the tiny model's plain greedy decode repeats one
token, whose argmax an update rarely moves). The server's must equal the trainer policy's at
every hand-off, and change with every update.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils.import_utils import is_serve_available

from rlhfkit.cli.errors import describe
from rlhfkit.config import ConfigError
from rlhfkit.data.schemas import Message
from rlhfkit.data.tokenize import render_prompt
from rlhfkit.models.loading import LoraSettings, load_model
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.policy_gradient import GRPOConfig, run_policy_gradient
from rlhfkit.rollout import remote
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.remote import GenerationServerError, RemoteSampler, TransformersServeSampler
from rlhfkit.train.metrics import read_metrics

PROMPT = (Message("user", "What is 2 + 3?"),)
# generate's settings for the probe, sent to the server through its `generation_config` field
RANKING = {"do_sample": False, "repetition_penalty": 1e4, "max_new_tokens": 16, "min_new_tokens": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """A `transformers serve` process on a free localhost port, no model pinned; its whole
    process group (the model processes it spawns) is stopped at teardown."""
    if not is_serve_available():
        pytest.skip("transformers serve needs its serving extras (openai, fastapi, uvicorn, pydantic): "
                    "pip install 'transformers[serving]'")
    port = free_port()
    cli = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(cli), "serve", "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"transformers serve exited at start: {proc.stderr.read().decode()[-500:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.skip("transformers serve did not answer /health within 120 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_grpo_samples_from_the_server_and_hands_it_each_update(server, tmp_path, monkeypatch):
    probes: list[tuple[str, str]] = []  # (server's greedy text, trainer's greedy text) at each hand-off
    samplers: list[RemoteSampler] = []
    hand_off = RemoteSampler.hand_off

    def probed(self: RemoteSampler) -> Path:
        folder = hand_off(self)
        text = render_prompt(self.tokenizer, PROMPT)
        body = {"model": str(folder), "prompt": text, "max_tokens": RANKING["max_new_tokens"],
                "generation_config": json.dumps(RANKING)}
        theirs = httpx.post(f"{server}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        ids = torch.tensor([self.tokenizer(text)["input_ids"]])
        out = self.policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **RANKING)
        ours = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        probes.append((theirs, ours))
        samplers.append(self)
        return folder

    monkeypatch.setattr(RemoteSampler, "hand_off", probed)
    # tests/recipes' one-step config (`pg_config`), for 3 steps, sampling from the server
    cfg = GRPOConfig(model="tiny", tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "run"), max_steps=3,
                     prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, batch_size=16, precision="fp32",
                     progress=False, seed=5, lr=1e-2, reward="format:[a-z]:1.0,format:[0-9]:0.5,format:[A-Z]:0.25",
                     generation_server=server, gen_batch_size=4)
    run_policy_gradient(cfg)
    sampler = samplers[0]
    assert isinstance(sampler, TransformersServeSampler)  # what `connect` found at that URL
    assert len(probes) == 3  # before each of the 3 rollouts: the initial weights, then after updates 1 and 2
    sampler.hand_off()  # and after the third update, through the same hand-off
    assert len(probes) == 4 and all(s is sampler for s in samplers)
    for k, (theirs, ours) in enumerate(probes):
        assert len(ours) >= 8, ours  # the probe spells out a ranking, not an empty string
        assert theirs == ours, f"hand-off {k}: the server decodes {theirs!r}, the trainer's policy {ours!r}"
    for k in range(1, 4):
        assert probes[k][0] != probes[k - 1][0], f"update {k} did not change the server's policy"
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["response_length"] > 0 for r in rows)
    # only the version being served is kept
    assert [p.name for p in (Path(cfg.output_dir) / "generation-server").iterdir()] == ["v000003"]


def test_sync_every_hands_off_at_the_first_rollout_and_every_nth(monkeypatch, tmp_path):
    sampler = TransformersServeSampler(tiny_causal_lm(), tiny_tokenizer(), "http://127.0.0.1:9", tmp_path, sync_every=3)
    calls = []
    monkeypatch.setattr(sampler, "hand_off", lambda: calls.append(sampler.calls))
    for _ in range(7):
        sampler.sync()
    assert calls == [0, 3, 6]


def test_an_unreachable_server_is_one_line_naming_its_url(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    sampler = TransformersServeSampler(tiny_causal_lm(), tiny_tokenizer(), url, tmp_path)
    with pytest.raises(GenerationServerError) as err:
        sampler.sync()
    line, code = describe(err.value)
    assert line.startswith(f"transformers serve {url} unreachable") and "\n" not in line and code == 1
    with pytest.raises(GenerationServerError) as err:  # asking which engine it is, before any sampler exists
        remote.connect(tiny_causal_lm(), tiny_tokenizer(), url, tmp_path)
    line, code = describe(err.value)
    assert line.startswith(f"generation server {url} unreachable") and "\n" not in line and code == 1


def test_a_response_is_its_text_retokenized_with_the_stop_token(tmp_path):
    tok = tiny_tokenizer()
    sampler = TransformersServeSampler(torch.nn.Linear(1, 1), tok, "http://127.0.0.1:9", tmp_path)
    cfg = SamplingConfig(max_new_tokens=8, stop=("##",))
    ids = tok("ab", add_special_tokens=False)["input_ids"]
    g = sampler._generation(0, [1, 2], {"text": "ab", "finish_reason": "stop"}, 3, cfg, tok.eos_token_id)
    assert g.response_ids == [*ids, tok.eos_token_id] and g.finished and sampler.mismatched == 0
    g = sampler._generation(0, [1, 2], {"text": "ab", "finish_reason": "length"}, 2, cfg, tok.eos_token_id)
    assert g.response_ids == ids and not g.finished and sampler.mismatched == 0
    g = sampler._generation(0, [1, 2], {"text": "ab##", "finish_reason": "stop"}, 4, cfg, tok.eos_token_id)
    assert g.text == "ab" and g.finished and g.response_ids == tok("ab##", add_special_tokens=False)["input_ids"]
    # the server sampled 5 tokens where the text gives 2 (+ the stop token): counted
    sampler._generation(0, [1, 2], {"text": "ab", "finish_reason": "stop"}, 5, cfg, tok.eos_token_id)
    assert sampler.mismatched == 1


def test_request_seeds_are_a_pure_function_of_seed_prompt_and_sample():
    assert remote.request_seed(0, 1, 2) == remote.request_seed(0, 1, 2)
    assert len({remote.request_seed(0, i, k) for i in range(4) for k in range(4)}) == 16


def test_a_lora_policy_is_handed_over_merged_and_earlier_versions_are_removed(tmp_path, monkeypatch):
    model = load_model("tiny", lora=LoraSettings(r=4, alpha=8), seed=0)
    with torch.no_grad():  # a trained adapter: B ≠ 0, so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    sampler = TransformersServeSampler(model, tiny_tokenizer(), "http://127.0.0.1:9", tmp_path)
    monkeypatch.setattr(sampler, "_post", lambda path, body: {})  # no server: the files only
    monkeypatch.setattr(sampler, "_load", lambda folder: None)
    (tmp_path / "v000007").mkdir()  # left by an earlier run in the same folder
    sampler.hand_off()
    folder = sampler.hand_off()
    assert [p.name for p in tmp_path.iterdir()] == ["v000001"] and not (folder / "adapter_config.json").exists()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        served = AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits
        torch.testing.assert_close(served, model(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("kw", "message"), [({"generation_server": "localhost:8000"}, "http:// or https:// URL"),
                                              ({"generation_server": "http://h:1", "sync_every": 0}, "sync_every")])
def test_bad_server_options_are_one_line(kw, message):
    with pytest.raises(ConfigError, match=message):
        GRPOConfig(model="tiny", tasks="demo", max_new_tokens=8, **kw)


def test_a_run_sampling_from_a_server_holds_no_local_copy_of_the_policy(monkeypatch, tmp_path):
    """bf16 runs decode in-process with a bf16 copy of the policy (`PolicySampler`); with a
    server the copy would only take memory, so none is made and the run's sampler is the server's."""
    from rlhfkit.recipes import online, policy_gradient

    def no_copy(*args, **kwargs):
        raise AssertionError("a local PolicySampler was built although a server samples")

    served = []
    monkeypatch.setattr(online, "PolicySampler", no_copy)
    monkeypatch.setattr(online, "connect", lambda model, tokenizer, url, folder, sync_every: served.append(url) or url)
    cfg = GRPOConfig(model="tiny", tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "run"), max_steps=1,
                     prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, batch_size=4, precision="bf16",
                     progress=False, generation_server="http://127.0.0.1:9")
    run = policy_gradient.setup_run(cfg)
    assert run.sampler == "http://127.0.0.1:9" and served == ["http://127.0.0.1:9"]
    # without a server the copy is made: the same setup reaches PolicySampler
    with pytest.raises(AssertionError, match="local PolicySampler"):
        policy_gradient.setup_run(dataclasses.replace(cfg, generation_server="", output_dir=str(tmp_path / "run2")))
