"""What every route shares: database sessions, the logged-in user, CSRF, page rendering."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, FileSystemLoader
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.membership import can_access
from rlhfkit.feedback.models import Project, User, utcnow
from rlhfkit.feedback.security import csrf_ok, csrf_token, unsign
from rlhfkit.feedback.users import last_seen, live_login, touch_interval, touch_session

SESSION_COOKIE = "rlhf_session"
# Before login there is no session to tie a CSRF token to: a random, signed cookie stands in.
ANON_COOKIE = "rlhf_anon"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The largest id a row can have on every backend: the id columns are INTEGER, 32-bit on
# PostgreSQL (64-bit on SQLite). An id in a path beyond it is answered 404 like any other id
# that names no row (app.py maps path errors to 404), never a database error.
MAX_ID = 2**31 - 1
RowId = Annotated[int, PathParam(ge=1, le=MAX_ID)]
RoundNumber = Annotated[int | None, Query(ge=1, le=MAX_ID)]

_templates_dir = Path(__file__).parent / "templates"
# autoescape=True for every template: user text is always escaped, and nothing uses |safe.
templates = Jinja2Templates(env=Environment(loader=FileSystemLoader(_templates_dir), autoescape=True))


def _number(value: float | None, digits: int = 2) -> str:
    """A statistic for display; undefined (nan/None) shows as a dash."""
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100 * value:.0f}%"


templates.env.filters["number"] = _number
templates.env.filters["percent"] = _percent


class NotAuthenticated(Exception):
    """No valid login session: pages redirect to the login form, the API answers 401."""


def database(request: Request) -> Database:
    return request.app.state.database


def secret(request: Request) -> bytes:
    return request.app.state.secret_key


def claim_lease(request: Request) -> timedelta:
    return request.app.state.claim_lease


def client_address(request: Request) -> str:
    """The client's address (uvicorn puts the proxy's X-Forwarded-For here when the proxy is
    on loopback, its default --forwarded-allow-ips)."""
    return request.client.host if request.client else "unknown"


def read_db(request: Request) -> Iterator[Session]:
    with database(request).read() as session:
        yield session


def write_db(request: Request) -> Iterator[Session]:
    """A session whose transaction takes the write lock first (SQLite BEGIN IMMEDIATE).
    Routes commit before they answer, so an acknowledged change is on disk."""
    with database(request).write() as session:
        yield session


def session_token(request: Request) -> str | None:
    return unsign(request.cookies.get(SESSION_COOKIE), secret(request))


def anon_token(request: Request) -> str | None:
    return unsign(request.cookies.get(ANON_COOKIE), secret(request))


def idle_timeout(request: Request) -> timedelta:
    return request.app.state.idle_timeout


def _live_session(request: Request) -> tuple[User, datetime] | None:
    """(the logged-in user, when their session was last seen), or None."""
    token = session_token(request)
    if token is None:
        return None
    with database(request).read() as session:
        login = live_login(session, token, idle_timeout=idle_timeout(request))
        return None if login is None else (login.user, last_seen(login))  # detached, columns loaded


def optional_user(request: Request) -> User | None:
    live = _live_session(request)
    return None if live is None else live[0]


def current_user(request: Request) -> User:
    """The logged-in user; their session's idle clock restarts (a short write at most every
    few minutes, before the route opens its own transaction)."""
    live = _live_session(request)
    if live is None:
        raise NotAuthenticated()
    user, seen = live
    if seen + touch_interval(idle_timeout(request)) < utcnow():
        touch_session(database(request), session_token(request), idle_timeout=idle_timeout(request))
    return user


def current_admin(user: User = Depends(current_user)) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=403, detail="admins only")
    return user


def page_csrf_token(request: Request) -> str:
    token = session_token(request) or anon_token(request)
    return csrf_token(token, secret(request)) if token else ""


async def csrf_protect(request: Request) -> None:
    """Every POST/PUT/PATCH/DELETE must carry the token of the caller's own session, in the
    X-CSRF-Token header (JSON API) or the csrf_token form field (HTML forms)."""
    if request.method in SAFE_METHODS:
        return
    given = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if given is None and content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()  # cached by Starlette: the route reads the same form
        value = form.get(CSRF_FIELD)
        given = value if isinstance(value, str) else None
    token = session_token(request) or anon_token(request)
    if not csrf_ok(given, token, secret(request)):
        raise HTTPException(status_code=403, detail="missing or invalid CSRF token; reload the page")


def render(request: Request, template: str, context: dict[str, Any] | None = None, *,
           user: User | None = None, status_code: int = 200, csrf_for: str | None = None) -> HTMLResponse:
    """A page; `csrf_for` is the session token its forms belong to when it is not the
    request's own (the login page that sets a fresh anonymous cookie)."""
    token = csrf_token(csrf_for, secret(request)) if csrf_for else page_csrf_token(request)
    return templates.TemplateResponse(request, template, {
        "user": user, "csrf_token": token, **(context or {})}, status_code=status_code)


def redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def login_redirect(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return redirect(f"/login?next={quote(target, safe='')}")


def safe_next(target: str | None) -> str:
    """Only a path on this site: never an absolute or protocol-relative URL (open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def error_text(error: DataError) -> str:
    """A DataError for a page: with file and line when it is about an uploaded file."""
    return str(error) if error.path else error.message


def get_project(session: Session, project_id: int) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        raise HTTPException(status_code=404, detail="no such project")
    return project


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise HTTPException(status_code=404, detail="no such account")
    return user


def get_project_for(session: Session, project_id: int, user: User) -> Project:
    """The project, when `user` may label it; else 404, the answer for a project that does
    not exist (a non-member does not learn that it does)."""
    project = session.get(Project, project_id)
    if project is None or not can_access(session, project, user):
        raise HTTPException(status_code=404, detail="no such project")
    return project
