"""OpenAICompatibleBackend against a scripted OpenAI-compatible server on 127.0.0.1.

The server answers each POST with the next entry of its script (status, headers, body,
delay) and records what it received. Backoff waits go through a recording `sleep`, so the
tests check the exact schedule without waiting for it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhfkit.judge.backends import JudgeError, OpenAICompatibleBackend, TokenBucket

SECRET = "sk-test-0123456789-secret"


def ok(content: str) -> tuple[int, dict, str, float]:
    return 200, {}, json.dumps({"choices": [{"message": {"role": "assistant",
                                                          "content": content}}]}), 0.0


@dataclass
class FakeServer:
    script: list = field(default_factory=list)
    received: list = field(default_factory=list)
    url: str = ""
    respond: object = None  # request json -> reply, used instead of the script when set

    def next_reply(self, request):
        if self.respond is not None:
            return self.respond(request)
        return self.script.pop(0) if self.script else ok("Verdict: tie")


@pytest.fixture
def server():
    fake = FakeServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            request = json.loads(body)
            fake.received.append({"path": self.path, "headers": dict(self.headers),
                                  "json": request})
            status, headers, text, delay = fake.next_reply(request)
            if delay:
                time.sleep(delay)
            data = text.encode()
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                pass

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield fake
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("RLHFKIT_TEST_JUDGE_KEY", SECRET)
    return "RLHFKIT_TEST_JUDGE_KEY"


def make_backend(server, api_key, sleeps, **kwargs):
    options = dict(api_key_env=api_key, timeout_s=2.0, max_retries=3, backoff_s=0.5,
                   jitter=0.0, sleep=sleeps.append)
    options.update(kwargs)
    return OpenAICompatibleBackend(server.url, "judge-model", **options)


def test_success_sends_messages_model_and_bearer_key(server, api_key):
    server.script = [ok("Verdict: A"), ok("Verdict: B")]
    sleeps: list[float] = []
    with make_backend(server, api_key, sleeps, max_tokens=64) as backend:
        out = backend.complete(["first?", [{"role": "system", "content": "be fair"},
                                           {"role": "user", "content": "second?"}]])
    assert out == ["Verdict: A", "Verdict: B"]
    assert backend.name == "openai:judge-model" and sleeps == []
    first, second = server.received
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["Authorization"] == f"Bearer {SECRET}"
    assert first["json"] == {"model": "judge-model", "temperature": 0.0, "max_tokens": 64,
                             "messages": [{"role": "user", "content": "first?"}]}
    assert second["json"]["messages"][0] == {"role": "system", "content": "be fair"}
    assert SECRET not in repr(backend)


def test_429_then_success_honours_retry_after(server, api_key):
    server.script = [(429, {"Retry-After": "0.02"}, '{"error": "slow down"}', 0.0), ok("done")]
    sleeps: list[float] = []
    backend = make_backend(server, api_key, sleeps, backoff_s=5.0)
    assert backend.complete(["q"]) == ["done"]
    # The server's 0.02 s, not the 5 s exponential backoff.
    assert sleeps == [0.02] and len(server.received) == 2


def test_retry_after_as_http_date_and_its_ceiling(server, api_key):
    # An HTTP date in the past means "now"; a huge delay is cut to max_backoff_s.
    server.script = [(503, {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, "", 0.0),
                     (429, {"Retry-After": "3600"}, "", 0.0), ok("done")]
    sleeps: list[float] = []
    backend = make_backend(server, api_key, sleeps, max_backoff_s=2.0)
    assert backend.complete(["q"]) == ["done"]
    assert sleeps == [0.0, 2.0]


def test_500_twice_then_success_backs_off_exponentially(server, api_key):
    server.script = [(500, {}, "oops", 0.0), (503, {}, "busy", 0.0), ok("fine")]
    sleeps: list[float] = []
    assert make_backend(server, api_key, sleeps).complete(["q"]) == ["fine"]
    assert sleeps == [0.5, 1.0]  # backoff_s · 2^k, no jitter
    assert len(server.received) == 3


def test_jitter_stays_within_its_band(server, api_key):
    server.script = [(502, {}, "", 0.0)] * 3 + [ok("x")]
    sleeps: list[float] = []
    make_backend(server, api_key, sleeps, jitter=0.5, seed=1).complete(["q"])
    for k, s in enumerate(sleeps):
        assert 0.5 * 0.5 * 2**k <= s <= 1.5 * 0.5 * 2**k


def test_timeouts_are_retried_then_raise(server, api_key):
    server.script = [(200, {}, "{}", 1.0)] * 3  # every reply arrives after the client gave up
    sleeps: list[float] = []
    backend = make_backend(server, api_key, sleeps, timeout_s=0.2, max_retries=2)
    start = time.monotonic()
    with pytest.raises(JudgeError, match=r"chat/completions failed after 3 attempts.*timed out"):
        backend.complete(["q"])
    assert time.monotonic() - start < 3.0
    assert len(server.received) == 3 and sleeps == [0.5, 1.0]


def test_connection_refused_is_retried_then_raises(api_key):
    with socket.socket() as probe:  # a port that was free a moment ago, now closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps: list[float] = []
    backend = OpenAICompatibleBackend(f"http://127.0.0.1:{port}", "m", api_key_env=api_key,
                                      max_retries=1, backoff_s=0.01, jitter=0.0,
                                      timeout_s=1.0, sleep=sleeps.append)
    with pytest.raises(JudgeError, match="connection failed") as err:
        backend.complete(["q"])
    assert sleeps == [0.01] and SECRET not in str(err.value)


def test_malformed_json_is_a_clear_error(server, api_key):
    server.script = [(200, {}, "<html>not json</html>", 0.0)]
    with pytest.raises(JudgeError) as err:
        make_backend(server, api_key, []).complete(["q"])
    message = str(err.value)
    assert server.url + "/chat/completions" in message and "HTTP 200" in message
    assert "not JSON" in message and SECRET not in message
    assert len(server.received) == 1  # a bad body is not retried


def test_json_without_content_is_a_clear_error(server, api_key):
    server.script = [(200, {}, json.dumps({"choices": []}), 0.0),
                     (200, {}, json.dumps({"choices": [{"message": {"content": None}}]}), 0.0)]
    backend = make_backend(server, api_key, [])
    with pytest.raises(JudgeError, match=r"HTTP 200\) returned JSON without "
                                         r"choices\[0\]\.message\.content.*'choices'"):
        backend.complete(["q"])
    with pytest.raises(JudgeError, match="content of type NoneType"):
        backend.complete(["q"])


def test_client_errors_fail_at_once_without_leaking_the_key(server, api_key):
    # A server that echoes the key back must not get it into the error message.
    server.script = [(401, {}, json.dumps({"error": f"bad key {SECRET}"}), 0.0)]
    sleeps: list[float] = []
    with pytest.raises(JudgeError) as err:
        make_backend(server, api_key, sleeps).complete(["q"])
    message = str(err.value)
    assert "HTTP 401" in message and f"${api_key}" in message
    assert SECRET not in message and "***" in message
    assert sleeps == [] and len(server.received) == 1


def test_retries_exhausted_on_5xx_names_url_and_status(server, api_key, caplog):
    server.script = [(500, {}, f"trace with {SECRET}", 0.0)] * 2
    with pytest.raises(JudgeError, match=r"failed after 2 attempts; last: HTTP 500") as err:
        make_backend(server, api_key, [], max_retries=1).complete(["q"])
    assert SECRET not in str(err.value)
    assert SECRET not in caplog.text  # the retry warnings are redacted too


def test_no_key_variable_sends_no_authorization(server, monkeypatch):
    monkeypatch.delenv("RLHFKIT_UNSET_KEY", raising=False)
    server.script = [ok("x")]
    OpenAICompatibleBackend(server.url, "m", api_key_env="RLHFKIT_UNSET_KEY").complete(["q"])
    assert "Authorization" not in server.received[0]["headers"]


def test_concurrent_requests_keep_their_order(server, api_key):
    # Each reply echoes its prompt, after a delay that makes later prompts finish first.
    def respond(request):
        content = request["messages"][0]["content"]
        return (*ok(f"answer to {content}")[:3], 0.05 * (8 - int(content[1:])) / 8)
    server.respond = respond
    backend = make_backend(server, api_key, [], max_concurrency=4)
    prompts = [f"q{i}" for i in range(8)]
    assert backend.complete(prompts) == [f"answer to {p}" for p in prompts]


def test_token_bucket_schedule_with_a_fake_clock():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(rate=4.0, capacity=2, clock=lambda: now[0], sleep=sleep)
    # Two tokens banked: the first two go at once, then one every 1/4 s.
    waits = [bucket.acquire() for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.0, 0.25, 0.25, 0.25])
    now[0] += 10.0  # idle time refills only up to capacity
    assert [bucket.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.25])


def test_rate_limit_spaces_real_requests(server, api_key):
    backend = make_backend(server, api_key, [], max_requests_per_s=20.0, sleep=time.sleep)
    start = time.monotonic()
    backend.complete(["q"] * 5)
    # Capacity 1: the first request goes at once, the next four wait 1/20 s each.
    assert time.monotonic() - start >= 4 / 20 - 0.01
