"""Rollouts from a separate generation server: `transformers serve` over its OpenAI-compatible API.

    trainer ──save v000k (atomic)──▶ run folder ◀──loads by path── server
       │   POST /reset, POST /load_model {"model": ".../v000k"}        │
       └── POST /v1/completions {"model": ".../v000k", "prompt": …} ──▶ text

`RemoteSampler` has `PolicySampler`'s interface (`sync`, `generate`), so an online recipe
samples from the server instead of its own copy of the policy. The weight hand-off is the
server's own mechanism: a request names its model, and a local folder is a model. Every
`sync_every` rollouts the policy is saved to a new versioned folder, the server is told to
stop its models (`/reset`) and load that folder (`/load_model`), and the previous version's
folder is deleted; every request of the next rollouts names the new folder. The server must
see the trainer's files (same machine or a shared file system), must be started without a
model argument (a pinned server refuses other models) and must serve this run only (`/reset`
stops all its models).

What `transformers serve` (5.25) returns, and what follows:
- text only: no token ids, no log-probs (`logprobs`, `n`, `echo` are accepted and ignored by
  /v1/completions; /v1/chat/completions ignores `logprobs`/`top_logprobs`), the text decoded
  with special tokens skipped. The response's token ids are the text re-tokenized, plus the
  tokenizer's end-of-sequence id when the server stopped at a stop token. Where that count
  differs from the server's own (`usage.completion_tokens`: a byte sequence that is not valid
  UTF-8, a special token inside the text, another split of the same text) the trainer learns
  from tokens the server did not sample exactly; such responses are counted in `mismatched`.
- one response per request: `samples_per_prompt` requests per prompt, each with its own
  seed (a pure function of the sampling seed, the prompt and the sample), sent concurrently.
Log-probs are never taken from the sampler (see `rollout.rollout`): the trainer recomputes
the old log-probs of the returned tokens, so the update's ratio is exact for them.
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

from rlhfkit.data.schemas import Conversation
from rlhfkit.data.tokenize import pad_token_id, render_prompt
from rlhfkit.io import atomic_dir
from rlhfkit.rollout.generate import Generation, SamplingConfig, stop_token_ids

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 600.0  # a request waits for the ones queued before it (the server runs one at a time)


class GenerationServerError(ConnectionError):
    """The generation server cannot be reached or refused a request; the message is one line naming its URL."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


def request_seed(seed: int, prompt: int, sample: int) -> int:
    """The server's torch seed for one response: a pure function of (sampling seed, prompt, sample)."""
    digest = hashlib.sha256(f"{seed}/{prompt}/{sample}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RemoteSampler:
    """The generation engine of an online run, when it is a separate `transformers serve` process.

    model: the policy's causal LM (the trainer's; a LoRA model is merged into a copy before
    saving). weights_dir: where the versioned folders go (`v000000`, `v000001`, …; only the
    one being served is kept). sync_every: hand the weights over at the first `sync` and then
    at every `sync_every`-th (the recipe calls `sync` before each rollout); between two
    hand-offs the server samples from a policy up to `sync_every − 1` updates old, and the
    trainer's recomputed old log-probs do not correct for that lag.
    """

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
        self.mismatched = 0  # responses whose re-tokenized length differs from the server's

    # ------------------------------------------------------------------ the weight hand-off
    def sync(self) -> None:
        """Before a rollout: hand the current weights to the server at the first call and every
        `sync_every` calls after it."""
        if self.calls % self.sync_every == 0:
            self.hand_off()
        self.calls += 1

    @torch.no_grad()
    def hand_off(self) -> Path:
        """Save the policy to the next version's folder (atomically), make the server load it,
        delete the earlier versions; returns the new folder."""
        folder = (self.weights_dir / f"v{self.syncs:06d}").resolve()
        model = self.policy
        if hasattr(model, "merge_and_unload"):  # a PEFT model saves only its adapter
            model = copy.deepcopy(model).merge_and_unload()
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
        self._post("/reset", {})  # stops the previous version's process, freeing its memory
        self._load(folder)
        self.served = folder
        for old in self.weights_dir.glob("v[0-9]*"):  # earlier versions, a resumed run's predecessor's too
            if old.resolve() != folder:
                shutil.rmtree(old, ignore_errors=True)
        self.syncs += 1
        return folder

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
                        raise GenerationServerError(f"generation server {self.url} could not load {folder}: "
                                                    f"{' '.join(str(event.get('message', 'no reason given')).split())}")
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        raise GenerationServerError(f"generation server {self.url} ended /load_model of {folder} without 'ready'")

    # ------------------------------------------------------------------ sampling
    def generate(self, tokenizer, prompts: list[Conversation], cfg: SamplingConfig, *,
                 progress: bool = False) -> list[Generation]:
        """n responses for each prompt, in prompt order (prompt i's samples at i·n … i·n+n−1),
        from the folder handed over last. `progress` is accepted for `PolicySampler`'s signature."""
        if self.served is None:
            raise RuntimeError("RemoteSampler.generate before the first sync: the server holds no policy yet")
        texts = [render_prompt(tokenizer, p) for p in prompts]
        # What the server conditions on: its tokenizer's ids of the prompt text (special tokens added as it adds them).
        prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
        stop_ids, eos = stop_token_ids(tokenizer), tokenizer.eos_token_id
        settings = json.dumps({"do_sample": cfg.temperature > 0, "top_k": cfg.top_k, "eos_token_id": stop_ids,
                               "pad_token_id": pad_token_id(tokenizer)})
        jobs = [(i, k) for i in range(len(prompts)) for k in range(cfg.n)]

        def one(job: tuple[int, int]) -> Generation:
            i, k = job
            body = {"model": str(self.served), "prompt": texts[i], "max_tokens": cfg.max_new_tokens,
                    "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": request_seed(cfg.seed, i, k),
                    "generation_config": settings}
            if cfg.stop:
                body["stop"] = list(cfg.stop)
            choice, usage = self._complete(body)
            return self._generation(i, prompt_ids[i], choice, int(usage.get("completion_tokens", -1)), cfg, eos)

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
                            "%d; such responses are counted in RemoteSampler.mismatched", len(response),
                            server_tokens)
        if not response:  # an all-special-token response: its text is empty
            response = [eos]
        return Generation(index, text.strip(), list(prompt_ids), response, stopped)

    # ------------------------------------------------------------------ HTTP
    def _complete(self, body: dict) -> tuple[dict, dict]:
        data = self._post("/v1/completions", body)
        try:
            return data["choices"][0], data.get("usage", {})
        except (KeyError, IndexError, TypeError):
            raise GenerationServerError(f"generation server {self.url} answered /v1/completions without "
                                        f"choices: {str(data)[:200]}") from None

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self.client.post(path, json=body)
        except httpx.TransportError as e:
            raise self._unreachable(e) from None
        self._raise_for_status(response, path)
        return response.json()

    def _raise_for_status(self, response: httpx.Response, path: str) -> None:
        if response.status_code >= 400:
            response.read()
            detail = " ".join(response.text.split())[:300]
            raise GenerationServerError(f"generation server {self.url} refused {path} "
                                        f"(HTTP {response.status_code}): {detail}")

    def _unreachable(self, e: httpx.TransportError) -> GenerationServerError:
        reason = " ".join(str(e).split()) or type(e).__name__
        return GenerationServerError(f"generation server {self.url} unreachable ({reason}); start one with "
                                     "`transformers serve --port PORT` (no model argument)")

    def close(self) -> None:
        self.client.close()
