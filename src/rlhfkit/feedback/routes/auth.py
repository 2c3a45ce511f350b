"""Login and logout.

A login is checked in three steps, none holding the database write lock while scrypt runs:
the throttle (a blocked account or client gets 429 and no password check at all), the
password check (a few at a time, in worker threads: `PasswordChecks`), then a short write
transaction that stores the new session.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Depends, Form, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from rlhfkit.feedback import users
from rlhfkit.feedback.db import Database
from rlhfkit.feedback.models import User, username_key
from rlhfkit.feedback.security import new_token, sign
from rlhfkit.feedback.throttle import Busy
from rlhfkit.feedback.web import (
    ANON_COOKIE,
    SESSION_COOKIE,
    anon_token,
    client_address,
    database,
    optional_user,
    redirect,
    render,
    safe_next,
    secret,
    session_token,
    write_db,
)

router = APIRouter()


def _set_cookie(request: Request, response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="lax",
                        secure=request.app.state.cookie_secure, path="/")


@router.get("/")
def home(request: Request):
    user = optional_user(request)
    if user is None:
        return redirect("/login")
    return redirect("/admin" if user.is_admin else "/projects")


@router.get("/login")
def login_form(request: Request, next: str = "/"):
    if optional_user(request) is not None:
        return redirect(safe_next(next))
    token = anon_token(request)
    fresh = token is None
    if fresh:
        token = new_token()
    response = render(request, "login.html", {"next": safe_next(next), "error": None}, csrf_for=token)
    if fresh:
        _set_cookie(request, response, ANON_COOKIE, sign(token, secret(request)), max_age=None)
    return response


def _login_error(request: Request, next: str, message: str, status_code: int, retry_after: int | None = None):
    response = render(request, "login.html", {"next": safe_next(next), "error": message}, status_code=status_code)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


def _start_session(db: Database, user: User, idle_timeout: timedelta) -> str:
    """Store the new session, and delete the rows of sessions that have ended (anyone's): an
    indexed delete in the login's own short write, never in a vote's."""
    with db.write() as session:
        users.purge_expired_sessions(session, idle_timeout=idle_timeout)
        token = users.start_session(session, user)
        session.commit()
    return token


@router.post("/login")
async def login(request: Request, username: str = Form(""), password: str = Form(""), next: str = Form("/")):
    throttle, account, client = request.app.state.login_throttle, username_key(username), client_address(request)
    wait = throttle.retry_after(account, client)
    if wait:
        return _login_error(request, next, f"Too many failed logins: try again in {wait} seconds.", 429, wait)
    try:
        user = await request.app.state.password_checks.run(
            lambda: users.authenticate(database(request), username, password))
    except Busy:
        return _login_error(request, next, "The server is busy: try again in a moment.", 503, 1)
    if user is None:
        throttle.failed(account, client)
        return _login_error(request, next, "Wrong username or password.", 401)
    throttle.succeeded(account)
    token = await run_in_threadpool(_start_session, database(request), user, request.app.state.idle_timeout)
    target = safe_next(next)
    response = redirect(target if target != "/" else ("/admin" if user.is_admin else "/projects"))
    _set_cookie(request, response, SESSION_COOKIE, sign(token, secret(request)),
                max_age=int(users.SESSION_LIFETIME.total_seconds()))
    response.delete_cookie(ANON_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, db: Session = Depends(write_db)):
    token = session_token(request)
    if token is not None:
        users.end_session(db, token)
        db.commit()
    response = redirect("/login")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
