"""Rollouts from a separate generation server: vLLM or `transformers serve`, over their HTTP APIs.

    trainer ──save v000k (atomic)──▶ run folder ◀──reads by path── server
       │   vLLM: POST /collective_rpc reload_weights(weights_path=…/v000k), /reset_prefix_cache
       │   transformers serve: POST /reset, POST /load_model {"model": ".../v000k"}
       └── POST /v1/completions ──▶ vLLM: token ids + their log-probs · transformers serve: text

A `RemoteSampler` has `PolicySampler`'s interface (`sync`, `generate`), so an online recipe
samples from the server instead of its own copy of the policy. `connect` asks the server
which engine it is (`GET /v1/models`: vLLM names itself the owner of its model) and returns
the sampler for it. Every `sync_every` rollouts the policy is saved to a new versioned folder
and handed to the server through that engine's own mechanism; the previous version's folder
is deleted. The server must see the trainer's files (same machine or a shared file system)
and serve this run only.

**vLLM** (`vllm serve MODEL`, started with `VLLM_SERVER_DEV_MODE=1`, which opens its
`/collective_rpc` endpoint): the weights are reloaded in place from the folder by the
workers' `reload_weights` (vLLM's layerwise reload), then the prefix cache is emptied (its
key/value blocks were computed by the old weights). Prompts are sent as token ids, so the
server conditions on exactly the trainer's; each response comes back as the sampled token
ids (`return_token_ids`) with the log-prob of each (`logprobs: 0`): no re-tokenization, and
the sampler's log-probs are kept on the Generation, so the rollout can log how far the
sampler's distribution is from the trainer's (`rollout_metrics`: `sampler/kl`). After every
hand-off the server's log-probs of a fixed probe sequence are compared with the trainer's
(`handoff_gap`, a warning above `HANDOFF_WARN_NATS`): a hand-off that did not take is seen at
once. vLLM reports raw log-probs (temperature 1) unless started with
`--logprobs-mode processed_logprobs`; the trainer's are at the sampling temperature, so for
sampling at τ ≠ 1 start it so. Known limit: vLLM's CPU build keeps a pre-packed copy of a
tied LM head, which an in-place reload leaves stale (models with `tie_word_embeddings`; the
hand-off check warns of it); its GPU builds read the shared weight.

**`transformers serve`** (5.25, started without a model argument; `/reset` stops every
model it runs) returns text only: no token ids, no log-probs (`logprobs`, `n`, `echo` are
accepted and ignored), the text decoded with special tokens skipped. The response's token ids
are the text re-tokenized, plus the tokenizer's end-of-sequence id when the server stopped at
a stop token. Where that count differs from the server's own (`usage.completion_tokens`: a
byte sequence that is not valid UTF-8, a special token inside the text, another split of the
same text) the trainer learns from tokens the server did not sample exactly; such responses
are counted in `mismatched`. One response per request: `samples_per_prompt` requests per
prompt, each with its own seed (a pure function of the sampling seed, the prompt and the
sample), sent concurrently.

Either way, old log-probs are never taken from the sampler (see `rollout.rollout`): the
trainer recomputes those of the returned tokens, so the update's ratio is exact for them. The
sampler's own log-probs (vLLM) serve the gap's correction instead: the critic-free recipes
weight each token by min(π_old/μ, C) (`losses.policy.truncated_importance_weights`).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from rlhfkit.data.schemas import Conversation, Message
from rlhfkit.data.tokenize import encode_prompt, pad_token_id, render_prompt
from rlhfkit.io import atomic_dir
from rlhfkit.ops.logprobs import gather_logprobs
from rlhfkit.rollout.generate import Generation, SamplingConfig, finish_generation, stop_token_ids

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0  # a request waits for the ones queued before it
HANDOFF_WARN_NATS = 0.25  # mean |server − trainer| log-prob on the probe above which a hand-off is called suspect
PROBE = ((Message("user", "Name three colours and one animal."),), "Red, green and blue; a fox.")  # prompt, response


class GenerationServerError(ConnectionError):
    """The generation server cannot be reached or refused a request; the message is one line naming its URL."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The server's seed for one request: a pure function of (sampling seed, prompt, sample)."""
    digest = hashlib.sha256(f"{seed}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RemoteSampler:
    """The generation engine of an online run when it is a separate server process (base class).

    model: the policy's causal LM (the trainer's; a LoRA model is merged into a copy before
    saving). weights_dir: where the versioned folders go (`v000000`, `v000001`, …; only the
    one being served is kept). sync_every: hand the weights over at the first `sync` and then
    at every `sync_every`-th (the recipe calls `sync` before each rollout); between two
    hand-offs the server samples from a policy up to `sync_every − 1` updates old, and the
    trainer's recomputed old log-probs do not correct for that lag.
    """

    engine = "generation server"
    start_hint = "start one with `vllm serve MODEL` (VLLM_SERVER_DEV_MODE=1) or `transformers serve`"

    def __init__(self, model: torch.nn.Module, tokenizer, url: str, weights_dir: Path, *, sync_every: int = 1):
        self.policy = model
        self.tokenizer = tokenizer
        self.url = url.rstrip("/")
        self.weights_dir = Path(weights_dir)
        self.sync_every = sync_every
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)
        self.served: Path | None = None  # the folder the server samples from
        self.calls = 0
        self.syncs = 0

    # ------------------------------------------------------------------ the weight hand-off
    def sync(self) -> None:
        """Before a rollout: hand the current weights to the server at the first call and every
        `sync_every` calls after it."""
        if self.calls % self.sync_every == 0:
            self.hand_off()
        self.calls += 1

    @torch.no_grad()
    def hand_off(self) -> Path:
        """Save the policy to the next version's folder (atomically), make the server serve it,
        delete the earlier versions; returns the new folder."""
        folder = (self.weights_dir / f"v{self.syncs:06d}").resolve()
        model = self.policy
        if hasattr(model, "merge_and_unload"):  # a PEFT model saves only its adapter
            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        self._serve(folder)
        self.served = folder
        for old in self.weights_dir.glob("v[0-9]*"):  # earlier versions, a resumed run's predecessor's too
            if old.resolve() != folder:
                shutil.rmtree(old, ignore_errors=True)
        self.syncs += 1
        return folder

    def _serve(self, folder: Path) -> None:
        """Make the server sample from the weights in `folder` (the engine's own mechanism)."""
        raise NotImplementedError

    def generate(self, tokenizer, prompts: list[Conversation], cfg: SamplingConfig, *,
                 progress: bool = False) -> list[Generation]:
        """n responses for each prompt, in prompt order (prompt i's samples at i·n … i·n+n−1),
        from the folder handed over last. `progress` is accepted for `PolicySampler`'s signature."""
        raise NotImplementedError

    def _served_or_raise(self) -> Path:
        if self.served is None:
            raise RuntimeError(f"{type(self).__name__}.generate before the first sync: the server holds no policy yet")
        return self.served

    # ------------------------------------------------------------------ HTTP
    def _complete(self, body: dict) -> tuple[list[dict], dict]:
        """POST /v1/completions: (choices, usage)."""
        data = self._post("/v1/completions", body)
        try:
            choices = list(data["choices"])
            if not choices:
                raise KeyError("choices")
            return choices, data.get("usage", {})
        except (KeyError, TypeError):
            raise GenerationServerError(f"{self.engine} {self.url} answered /v1/completions without "
                                        f"choices: {str(data)[:200]}") from None

    def _post(self, path: str, body: dict | None) -> dict:
        try:
            response = self.client.post(path, json=body) if body is not None else self.client.post(path)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        self._raise_for_status(response, path)
        return response.json() if response.content else {}

    def _raise_for_status(self, response: httpx.Response, path: str) -> None:
        if response.status_code >= 400:
            response.read()
            detail = " ".join(response.text.split())[:300]
            raise GenerationServerError(f"{self.engine} {self.url} refused {path} "
                                        f"(HTTP {response.status_code}): {detail}")

    def _unreachable(self, e: httpx.TransportError) -> GenerationServerError:
        reason = " ".join(str(e).split()) or type(e).__name__
        return GenerationServerError(f"{self.engine} {self.url} unreachable ({reason}); {self.start_hint}")

    def served_models(self) -> list[dict]:
        """The server's `GET /v1/models` entries (`id`, `owned_by`, …)."""
        try:
            response = self.client.get("/v1/models", timeout=30)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        self._raise_for_status(response, "/v1/models")
        try:
            return [m for m in response.json().get("data", []) if isinstance(m, dict)]
        except (ValueError, AttributeError):
            return []

    def close(self) -> None:
        self.client.close()


def connect(model: torch.nn.Module, tokenizer, url: str, weights_dir: Path, *, sync_every: int = 1) -> RemoteSampler:
    """The sampler for the server at `url`: `VLLMSampler` when `GET /v1/models` names vLLM as the
    owner of a model, else `TransformersServeSampler`."""
    probe = RemoteSampler(model, tokenizer, url, weights_dir, sync_every=sync_every)
    try:
        served = probe.served_models()
    finally:
        probe.close()
    if any(m.get("owned_by") == "vllm" for m in served):
        sampler = VLLMSampler(model, tokenizer, url, weights_dir, sync_every=sync_every)
        sampler.model_id = str(served[0].get("id", ""))
        return sampler
    return TransformersServeSampler(model, tokenizer, url, weights_dir, sync_every=sync_every)


class VLLMSampler(RemoteSampler):
    """Sampling from a vLLM OpenAI-compatible server (see the module docstring)."""

    engine = "vLLM server"
    start_hint = "start it with `VLLM_SERVER_DEV_MODE=1 vllm serve MODEL` on a port the trainer reaches"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_id: str | None = None  # the name the server serves its model under (`connect` sets it)
        self.handoff_gap: float | None = None  # mean |server − trainer| log-prob on PROBE at the last hand-off
        self._warned_gap = False

    def _serve(self, folder: Path) -> None:
        if self.model_id is None:
            self.model_id = str((self.served_models() or [{}])[0].get("id", ""))
        try:
            self._post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": str(folder)}})
        except GenerationServerError as e:
            if "HTTP 404" in str(e):
                raise GenerationServerError(f"{self.engine} {self.url} has no /collective_rpc endpoint, which "
                                            "reloads the weights: start it with VLLM_SERVER_DEV_MODE=1") from None
            raise
        self._post("/reset_prefix_cache", None)  # cached key/values were computed by the old weights
        self._check_hand_off()

    @torch.no_grad()
    def _check_hand_off(self) -> None:
        """Compare the server's log-probs of PROBE with the trainer policy's (`handoff_gap`)."""
        ids = probe_ids(self.tokenizer)
        theirs = torch.tensor(self.sequence_logprobs(ids))
        ours = trainer_logprobs(self.policy, ids)
        self.handoff_gap = float((theirs - ours).abs().mean())
        log.info("%s: hand-off %d, probe log-prob gap %.2e nats", self.engine, self.syncs, self.handoff_gap)
        if self.handoff_gap > HANDOFF_WARN_NATS and not self._warned_gap:
            self._warned_gap = True
            log.warning("%s: after the hand-off its log-probs of a probe sequence differ from the trainer's by "
                        "%.3f nats per token on average (bf16 against fp32 gives ≈ 0.06–0.08 on SmolLM2-135M; a "
                        "tied LM head on vLLM's CPU build is not reloaded): the rollouts may come from stale "
                        "weights", self.engine, self.handoff_gap)

    def sequence_logprobs(self, ids: list[int]) -> list[float]:
        """The served model's log p(ids[t] | ids[<t]) for t = 1 … len−1 (its prompt log-probs)."""
        choices, _ = self._complete({"model": self.model_id, "prompt": list(ids), "max_tokens": 1,
                                     "prompt_logprobs": 0, "temperature": 0.0})
        entries = choices[0].get("prompt_logprobs") or []
        try:
            return [float(entries[t][str(ids[t])]["logprob"]) for t in range(1, len(ids))]
        except (IndexError, KeyError, TypeError):
            raise GenerationServerError(f"{self.engine} {self.url} answered prompt_logprobs without the "
                                        f"prompt's tokens: {str(entries)[:200]}") from None

    def generate(self, tokenizer, prompts: list[Conversation], cfg: SamplingConfig, *,
                 progress: bool = False) -> list[Generation]:
        self._served_or_raise()
        prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
        stop_ids = stop_token_ids(tokenizer)

        def one(i: int) -> list[Generation]:
            body = {"model": self.model_id, "prompt": prompt_ids[i], "n": cfg.n, "max_tokens": cfg.max_new_tokens,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": request_seed(cfg.seed, i, 0),
                    "stop_token_ids": stop_ids, "logprobs": 0, "return_token_ids": True}
            if cfg.top_k > 0:
                body["top_k"] = cfg.top_k
            if cfg.stop:
                body["stop"] = list(cfg.stop)
            choices, _ = self._complete(body)
            if len(choices) != cfg.n:
                raise GenerationServerError(f"{self.engine} {self.url} returned {len(choices)} responses "
                                            f"for n = {cfg.n}")
            return [self._generation(i, prompt_ids[i], c, stop_ids, cfg) for c in sorted(choices, key=_index)]

        with ThreadPoolExecutor(max_workers=max(1, min(cfg.batch_size, len(prompts)))) as pool:
            return [g for group in pool.map(one, range(len(prompts))) for g in group]

    def _generation(self, index: int, prompt_ids: list[int], choice: dict, stop_ids: list[int],
                    cfg: SamplingConfig) -> Generation:
        tokens = choice.get("token_ids")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if not tokens or logprobs is None or len(logprobs) != len(tokens):
            raise GenerationServerError(f"{self.engine} {self.url} returned a response without its token ids "
                                        "and their log-probs (vLLM ≥ 0.10.2 returns them)")
        return finish_generation(self.tokenizer, index, prompt_ids, [int(t) for t in tokens], stop_ids, cfg.stop,
                                 [float(x) for x in logprobs])


def probe_ids(tokenizer) -> list[int]:
    """The token ids of PROBE (its prompt rendered with the chat template, then the response)."""
    prompt, response = PROBE
    return tokenizer(render_prompt(tokenizer, prompt) + response, add_special_tokens=False)["input_ids"]


def _index(choice: dict) -> int:
    return int(choice.get("index", 0))


@torch.no_grad()
def trainer_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """(len−1,) fp32 log p(ids[t] | ids[<t]) under the trainer's model, t = 1 … len−1."""
    was_training = model.training
    model.eval()
    x = torch.tensor([ids], device=next(model.parameters()).device)
    out = gather_logprobs(model, x[:, :-1], x[:, 1:])
    model.train(was_training)
    return out[0].cpu()


class TransformersServeSampler(RemoteSampler):
    """Sampling from `transformers serve` (see the module docstring: text only, re-tokenized)."""

    engine = "transformers serve"
    start_hint = "start one with `transformers serve --port PORT` (no model argument)"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mismatched = 0  # responses whose re-tokenized length differs from the server's

    def _serve(self, folder: Path) -> None:
        self._post("/reset", {})  # stops the previous version's process, freeing its memory
        self._load(folder)

    def _load(self, folder: Path) -> None:
        """POST /load_model and read its progress events until the model is ready."""
        try:
            with self.client.stream("POST", "/load_model", json={"model": str(folder)}) as response:
                self._raise_for_status(response, "/load_model")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[len("data:"):])
                    if event.get("status") == "ready":
                        return
                    if event.get("status") == "error":
                        raise GenerationServerError(f"{self.engine} {self.url} could not load {folder}: "
                                                    f"{' '.join(str(event.get('message', 'no reason given')).split())}")
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        raise GenerationServerError(f"{self.engine} {self.url} ended /load_model of {folder} without 'ready'")

    def generate(self, tokenizer, prompts: list[Conversation], cfg: SamplingConfig, *,
                 progress: bool = False) -> list[Generation]:
        served = self._served_or_raise()
        texts = [render_prompt(tokenizer, p) for p in prompts]
        # What the server conditions on: its tokenizer's ids of the prompt text (special tokens added as it adds them).
        prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
        stop_ids, eos = stop_token_ids(tokenizer), tokenizer.eos_token_id
        settings = json.dumps({"do_sample": cfg.temperature > 0, "top_k": cfg.top_k, "eos_token_id": stop_ids,
                               "pad_token_id": pad_token_id(tokenizer)})
        jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.n)]

        def one(job: tuple[int, int]) -> Generation:
            i, k = job
            body = {"model": str(served), "prompt": texts[i], "max_tokens": cfg.max_new_tokens,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": request_seed(cfg.seed, i, k),
                    "generation_config": settings}
            if cfg.stop:
                body["stop"] = list(cfg.stop)
            choices, usage = self._complete(body)
            return self._generation(i, prompt_ids[i], choices[0], int(usage.get("completion_tokens", -1)), cfg, eos)

        with ThreadPoolExecutor(max_workers=max(1, min(cfg.batch_size, len(jobs)))) as pool:
            return list(pool.map(one, jobs))

    def _generation(self, index: int, prompt_ids: list[int], choice: dict, server_tokens: int,
                    cfg: SamplingConfig, eos: int) -> Generation:
        text = choice.get("text", "")
        stopped = choice.get("finish_reason") == "stop"
        response = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        stop_string = next((s for s in cfg.stop if s in text), None)
        if stopped and stop_string is None:
            response = response + [eos]  # ended at a stop token, which the server's text leaves out
        if stop_string is not None:
            text = text[:text.index(stop_string)]
        if len(response) != server_tokens or not response:
            self.mismatched += 1
            if self.mismatched == 1:
                log.warning("generation server: a response re-tokenizes to %d tokens where the server sampled "
                            "%d; such responses are counted in TransformersServeSampler.mismatched", len(response),
                            server_tokens)
        if not response:  # an all-special-token response: its text is empty
            response = [eos]
        return Generation(index, text.strip(), list(prompt_ids), response, stopped)
