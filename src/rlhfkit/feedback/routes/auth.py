"""Login and logout."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Form, Request
from sqlalchemy.orm import Session

from rlhfkit.feedback import users
from rlhfkit.feedback.security import new_token, sign
from rlhfkit.feedback.web import (
    ANON_COOKIE,
    SESSION_COOKIE,
    anon_token,
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


@router.post("/login")
def login(request: Request, username: str = Form(""), password: str = Form(""), next: str = Form("/"),
          db: Session = Depends(write_db)):
    user = users.authenticate(db, username, password)
    if user is None:
        return render(request, "login.html", {"next": safe_next(next), "error": "Wrong username or password."},
                      status_code=401)
    token = users.start_session(db, user)
    db.commit()
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
