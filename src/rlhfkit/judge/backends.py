"""Judge backends: something that turns chat requests into assistant text.

A request is one chat conversation — a `rlhfkit.data.schemas.Conversation` (a tuple of
`Message`), or anything `as_conversation` accepts (a plain string becomes one user turn, a
list of `{"role", "content"}` dicts is kept). Messages rather than pre-rendered strings,
because an HTTP endpoint applies its own chat template and a local model applies its
tokenizer's: the backend, not the caller, knows how the conversation becomes tokens.

Every backend has
  * `name`  — who judged, stored as the annotator of AI labels (`"openai:gpt-4o"`),
  * `model` — the model behind it, part of the judge cache key,
  * `complete(requests) -> list[str]` — one completion per request, in order.

Three backends: `ScriptedBackend` (a Python function, for tests), `OpenAICompatibleBackend`
(any `/chat/completions` endpoint: vLLM, llama.cpp server, hosted APIs) and
`LocalModelBackend` (a transformers model and tokenizer, greedy decoding).

A backend that can also score answers (`ScoringBackend`: the local model, a scripted one)
has `choice_logprobs(requests, prefix, choices)`: log P(choice | request, assistant turn
starting with `prefix`) for each choice — what `PairwiseJudge(mode="logprob")` reads instead
of a generated verdict.
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, runtime_checkable

import httpx
import torch

from rlhfkit.data.schemas import Conversation, as_conversation, conversation_to_dicts
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.judge.errors import JudgeError
from rlhfkit.models.prepacked import prepacked_linears

logger = logging.getLogger(__name__)

ChatRequest = Conversation | str | Sequence[Any]

# Statuses worth another try: rate limited, or the server (or a proxy in front of it) failed.
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


@runtime_checkable
class JudgeBackend(Protocol):
    """Anything with a `name`, a `model` and a batched `complete`."""

    name: str
    model: str

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        """One assistant completion per chat request, in the order given."""
        ...


@runtime_checkable
class ScoringBackend(Protocol):
    """A backend that can score fixed answers as well as generate."""

    def choice_logprobs(self, requests: Sequence[ChatRequest], prefix: str,
                        choices: Sequence[str]) -> list[list[float]]:
        """Per request, log P(choice) for each choice, as the start of an assistant turn
        beginning with `prefix`."""
        ...


class ScriptedBackend:
    """A backend whose answers come from `fn(conversation) -> str`; for tests and dry runs.

    With `score_fn(conversation, prefix, choices) -> [log-prob per choice]` it is also a
    `ScoringBackend`. Records every conversation it is asked about in `requests`, so a test
    can count calls.
    """

    def __init__(self, fn: Callable[[Conversation], str], *, name: str = "scripted",
                 model: str = "scripted",
                 score_fn: Callable[[Conversation, str, Sequence[str]], Sequence[float]] | None = None):
        self.fn = fn
        self.name = name
        self.model = model
        self.score_fn = score_fn
        self.requests: list[Conversation] = []

    @property
    def calls(self) -> int:
        return len(self.requests)

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        conversations = [as_conversation(r) for r in requests]
        self.requests.extend(conversations)
        return [self.fn(c) for c in conversations]

    def choice_logprobs(self, requests: Sequence[ChatRequest], prefix: str,
                        choices: Sequence[str]) -> list[list[float]]:
        if self.score_fn is None:
            raise JudgeError("this scripted backend has no score_fn: it cannot score choices")
        conversations = [as_conversation(r) for r in requests]
        self.requests.extend(conversations)
        return [[float(x) for x in self.score_fn(c, prefix, choices)] for c in conversations]


class TokenBucket:
    """At most `rate` acquisitions per second on average, bursts of up to `capacity`.

    The bucket holds up to `capacity` tokens and refills at `rate` per second; `acquire`
    takes one, sleeping until one is there. Thread-safe. `clock` and `sleep` are injectable
    so the schedule can be tested without waiting.
    """

    def __init__(self, rate: float, capacity: float = 1.0, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if not rate > 0:
            raise ValueError(f"rate must be > 0 requests per second, got {rate}")
        if not capacity >= 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.capacity
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token; returns the seconds spent waiting for it."""
        waited = 0.0
        while True:
            with self._lock:
                now = self._clock()
                self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
                self._last = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return waited
                wait = (1.0 - self._tokens) / self.rate
            self._sleep(wait)
            waited += wait


def _retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """The delay a `Retry-After` header asks for: seconds, or an HTTP date; None if absent
    or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class OpenAICompatibleBackend:
    """A judge behind any OpenAI-compatible `POST {base_url}/chat/completions` endpoint.

    Each request is sent as `{"model", "messages", "temperature", "max_tokens"}` and the
    answer read from `choices[0].message.content`.

    Reliability: a request that times out, cannot connect, or gets 429 / 408 / 409 / 425 /
    any 5xx is retried up to `max_retries` times. The wait before retry k (k = 0, 1, ...)
    is the server's `Retry-After` when it sends one (seconds or an HTTP date; capped at
    `max_backoff_s`), else `backoff_s · 2^k` capped at `max_backoff_s`, times a random factor
    in [1 - jitter, 1 + jitter] so that parallel clients do not retry in lockstep. Other 4xx
    statuses (bad request, auth) fail at once.
    Every attempt, retries included, first takes a token from a token bucket refilled at
    `max_requests_per_s` per second, burst 1 (no limit when None).

    The API key is read from the environment variable `api_key_env` at construction and
    sent as `Authorization: Bearer <key>`; when the variable is unset no header is sent
    (local servers need none). The key never appears in a log line or an error message.

    Up to `max_concurrency` requests are in flight at once (a thread pool); results keep
    the order of the requests.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = "OPENAI_API_KEY",
                 timeout_s: float = 60.0, max_retries: int = 5, backoff_s: float = 1.0,
                 max_backoff_s: float = 60.0, jitter: float = 0.25,
                 max_requests_per_s: float | None = None, max_concurrency: int = 1,
                 temperature: float = 0.0, max_tokens: int = 512, name: str | None = None,
                 sleep: Callable[[float], None] = time.sleep, seed: int | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")
        if not 0 <= jitter <= 1:
            raise ValueError(f"jitter must be in [0, 1], got {jitter}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.name = name or f"openai:{model}"
        self.api_key_env = api_key_env
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.jitter = float(jitter)
        self.max_concurrency = int(max_concurrency)
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rate_limit = (TokenBucket(max_requests_per_s, sleep=sleep)
                            if max_requests_per_s is not None else None)
        self.__api_key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Content-Type": "application/json"}
        if self.__api_key:
            headers["Authorization"] = f"Bearer {self.__api_key}"
        self._client = httpx.Client(headers=headers, timeout=self.timeout_s)

    def __repr__(self) -> str:  # the default repr would show nothing secret, but be explicit
        return f"OpenAICompatibleBackend(url={self.url!r}, model={self.model!r})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> OpenAICompatibleBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        conversations = [as_conversation(r) for r in requests]
        if self.max_concurrency == 1 or len(conversations) <= 1:
            return [self._complete_one(c) for c in conversations]
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(conversations))) as pool:
            return list(pool.map(self._complete_one, conversations))

    # -- one request, with retries ----------------------------------------------------------

    def _redact(self, text: str) -> str:
        return text.replace(self.__api_key, "***") if self.__api_key else text

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server knows best, within our own ceiling
            return min(retry_after, self.max_backoff_s)
        base = min(self.max_backoff_s, self.backoff_s * 2.0 ** attempt)
        return base * self._rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def _complete_one(self, conversation: Conversation) -> str:
        payload = {"model": self.model, "messages": conversation_to_dicts(conversation),
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        last_problem = ""
        for attempt in range(self.max_retries + 1):
            if self._rate_limit is not None:
                self._rate_limit.acquire()
            retry_after = None
            try:
                response = self._client.post(self.url, json=payload)
            except httpx.TimeoutException:
                last_problem = f"timed out after {self.timeout_s:g} s"
            except httpx.TransportError as err:
                last_problem = f"connection failed ({type(err).__name__}: {self._redact(str(err))})"
            else:
                status = response.status_code
                if status < 400:
                    return self._read_content(response)
                body = self._redact(response.text[:300])
                if status not in RETRYABLE_STATUS and status < 500:
                    hint = ""
                    if status in (401, 403):
                        hint = (f" (check the API key in ${self.api_key_env})" if self.api_key_env
                                else " (this endpoint needs an API key: set api_key_env)")
                    raise JudgeError(f"POST {self.url} returned HTTP {status}{hint}: {body}")
                last_problem = f"HTTP {status}: {body}"
                retry_after = _retry_after_seconds(response.headers.get("retry-after"))
            if attempt == self.max_retries:
                break
            delay = self._backoff(attempt, retry_after)
            logger.warning("judge request to %s failed (%s); retry %d/%d in %.2f s",
                           self.url, last_problem, attempt + 1, self.max_retries, delay)
            self._sleep(delay)
        raise JudgeError(f"POST {self.url} failed after {self.max_retries + 1} attempts; "
                         f"last: {last_problem}")

    def _read_content(self, response: httpx.Response) -> str:
        where = f"POST {self.url} (HTTP {response.status_code})"
        try:
            body = response.json()
        except ValueError:
            snippet = self._redact(response.text[:200])
            raise JudgeError(f"{where} returned a body that is not JSON: {snippet!r}") from None
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            shape = sorted(body) if isinstance(body, dict) else type(body).__name__
            raise JudgeError(f"{where} returned JSON without choices[0].message.content "
                             f"(top-level keys: {shape})") from None
        if not isinstance(content, str):
            raise JudgeError(f"{where} returned choices[0].message.content of type "
                             f"{type(content).__name__}, expected text")
        return content


class LocalModelBackend:
    """A judge that is a local transformers causal LM: chat template, batched greedy decoding.

    Requests are rendered with `tokenizer.apply_chat_template(..., add_generation_prompt=True)`,
    left-padded (so every row's last prompt token sits at the same position and generation
    continues right after it), and decoded greedily in batches of `batch_size`. Only the new
    tokens are decoded. The generation engine will replace the internals; the interface stays.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 256,
                 batch_size: int = 8, name: str | None = None):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the judge tokenizer has no chat template; "
                             "set tokenizer.chat_template")
        self.hf_model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        config = getattr(model, "config", None)
        self.model = (getattr(config, "_name_or_path", None) or type(model).__name__)
        self.name = name or f"local:{self.model}"

    def choice_logprobs(self, requests: Sequence[ChatRequest], prefix: str,
                        choices: Sequence[str]) -> list[list[float]]:
        """log P(choice | rendered request + `prefix`) summed over the choice's tokens, for each
        choice: one forward per batch and choice, no generation."""
        base = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        suffixes = []
        for c in choices:
            joint = self.tokenizer(prefix + c, add_special_tokens=False)["input_ids"]
            if joint[:len(base)] != base or len(joint) == len(base):
                raise JudgeError(f"the tokenizer merges the prefix {prefix!r} with the choice {c!r}; pick a "
                                 "prefix that ends where a token ends")
            suffixes.append(joint[len(base):])
        contexts = [self.tokenizer(self.tokenizer.apply_chat_template(
                        conversation_to_dicts(as_conversation(r)), add_generation_prompt=True, tokenize=False),
                        add_special_tokens=False)["input_ids"] + base for r in requests]
        pad_id = pad_token_id(self.tokenizer)
        device = next(self.hf_model.parameters()).device
        out = [[0.0] * len(choices) for _ in requests]
        was_training = self.hf_model.training
        self.hf_model.eval()
        try:
            for start in range(0, len(contexts), self.batch_size):
                for k, suffix in enumerate(suffixes):
                    rows = [ctx + suffix for ctx in contexts[start:start + self.batch_size]]
                    width = max(len(r) for r in rows)
                    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                    for i, r in enumerate(rows):  # left padding: every row ends with the choice
                        input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
                        attention_mask[i, width - len(r):] = 1
                    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() does
                    with torch.no_grad():
                        logits = self.hf_model(input_ids=input_ids.to(device),
                                               attention_mask=attention_mask.to(device),
                                               position_ids=position_ids.to(device)).logits
                    n = len(suffix)  # logits at t predict token t + 1
                    logp = torch.log_softmax(logits[:, -n - 1:-1].float(), dim=-1)
                    target = torch.tensor(suffix, device=logp.device).expand(len(rows), n)
                    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)
                    for i, v in enumerate(picked.tolist()):
                        out[start + i][k] = v
        finally:
            self.hf_model.train(was_training)
        return out

    def complete(self, requests: Sequence[ChatRequest]) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(
                     conversation_to_dicts(as_conversation(r)),
                     add_generation_prompt=True, tokenize=False)
                 for r in requests]
        pad_id = pad_token_id(self.tokenizer)
        device = next(self.hf_model.parameters()).device
        completions: list[str] = []
        was_training = self.hf_model.training
        self.hf_model.eval()
        try:
            with torch.no_grad(), prepacked_linears(self.hf_model, rows=min(self.batch_size, len(texts))):
                for start in range(0, len(texts), self.batch_size):
                    chunk = texts[start:start + self.batch_size]
                    # The chat template already wrote the special tokens (BOS etc.).
                    encoded = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
                    width = max(len(ids) for ids in encoded)
                    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
                    for row, ids in enumerate(encoded):
                        if ids:
                            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                            attention_mask[row, width - len(ids):] = 1
                    output = self.hf_model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id)
                    new_tokens = output[:, width:]
                    completions.extend(
                        self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            self.hf_model.train(was_training)
        return completions
