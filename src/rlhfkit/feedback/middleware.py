"""ASGI middleware: security headers on every response, and a guard on request bodies.

The guard runs before any route or parser sees a body:

- size: a body larger than its route's limit is refused with 413, on its Content-Length
  when it declares one and on the bytes actually received otherwise (chunked uploads), so a
  200 MB body is never read into memory, let alone parsed;
- text: a urlencoded form, a JSON body and the text fields of a multipart form must be UTF-8
  with no lone surrogate (a JSON "\\ud800"), else 400. Starlette would otherwise decode a
  form as latin-1 (mojibake in the database) and a lone surrogate would fail later, as a 500,
  when it is written or rendered.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

FORM = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"
JSON = "application/json"
_FILENAME = re.compile(rb";\s*filename\*?=", re.IGNORECASE)


class SecurityHeaders:
    """Adds `headers` to every response that does not set them, and `Cache-Control: no-store`
    to every page (not to /static/)."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]):
        self.app, self.headers = app, headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self.headers.items():
                    headers.setdefault(name, value)
                if not static:
                    headers.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _TooLarge(Exception):
    pass


def _refusal(scope: Scope, status: int, message: str) -> Response:
    if scope["path"].startswith("/api/"):
        return JSONResponse({"detail": message}, status_code=status)
    return PlainTextResponse(message, status_code=status)


def _content_type(headers: Headers) -> tuple[str, dict[bytes, bytes]]:
    kind, params = parse_options_header(headers.get("content-type", ""))
    return kind.decode("latin-1").lower(), params


def form_text_problem(body: bytes) -> tuple[str | None, bytes]:
    """(why a urlencoded body is not UTF-8 text, or None; the body as percent-encoded ASCII)."""
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return "form fields must be UTF-8 text", body
    return None, body if body.isascii() else urlencode(pairs).encode("ascii")


def json_text_problem(body: bytes) -> str | None:
    """Why a JSON body is not UTF-8 text, or None (invalid JSON is left to the route's parser)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "a JSON body must be UTF-8"
    try:
        json.dumps(json.loads(text), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "text must not contain lone surrogates (\\ud800-\\udfff)"
    except RecursionError:
        return "the JSON body is nested too deeply"
    except ValueError:
        return None
    return None


class _MultipartText:
    """Follows a multipart body as it streams by and notes a text field (a part without a
    filename) that is not UTF-8. Parse errors are left to Starlette's own parser."""

    def __init__(self, boundary: bytes, limit: int):
        self.bad, self.limit = False, limit
        self._headers, self._field, self._is_file = b"", bytearray(), False
        self._parser: MultipartParser | None = MultipartParser(boundary, callbacks={
            "on_part_begin": self._begin, "on_header_value": self._header, "on_headers_finished": self._headers_done,
            "on_part_data": self._data, "on_part_end": self._end})

    def _begin(self) -> None:
        self._headers, self._field, self._is_file = b"", bytearray(), False

    def _header(self, data: bytes, start: int, end: int) -> None:
        self._headers += data[start:end] + b";"

    def _headers_done(self) -> None:
        self._is_file = _FILENAME.search(self._headers) is not None

    def _data(self, data: bytes, start: int, end: int) -> None:
        if not self._is_file and len(self._field) <= self.limit:
            self._field += data[start:end]

    def _end(self) -> None:
        if not self._is_file:
            try:
                self._field.decode("utf-8")
            except UnicodeDecodeError:
                self.bad = True

    def feed(self, chunk: bytes) -> None:
        if self._parser is not None:
            try:
                self._parser.write(chunk)
            except Exception:  # noqa: BLE001 — malformed multipart: Starlette reports it
                self._parser = None


class RequestGuard:
    """Body size limits (`limit_for(path)` bytes) and text checks, before parsing."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        headers = Headers(scope=scope)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            status = 413 if declared.isdigit() else 400
            return await _refusal(scope, status, f"request body over {limit} bytes")(scope, receive, send)
        kind, params = _content_type(headers)
        if kind in (FORM, JSON):
            return await self._buffered(scope, receive, send, limit, kind)
        checker = _MultipartText(params[b"boundary"], limit) if kind == MULTIPART and b"boundary" in params else None
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, f"request body over {limit} bytes")
                if checker is not None:
                    checker.feed(message.get("body", b""))
                    if checker.bad:
                        raise HTTPException(400, "form fields must be UTF-8 text")
            return message

        await self.app(scope, counted, send)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, limit: int, kind: str) -> None:
        """A form or JSON body (small by nature): read it whole, check it, hand it on."""
        try:
            body = await _read_body(receive, limit)
        except _TooLarge:
            return await _refusal(scope, 413, f"request body over {limit} bytes")(scope, receive, send)
        if body is None:  # the client went away mid-body: nothing to answer, and no half form to act on
            return None
        if kind == FORM:
            problem, body = form_text_problem(body)
        else:
            problem = json_text_problem(body)
        if problem is not None:
            return await _refusal(scope, 400, problem)(scope, receive, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None when the client disconnected first."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)
