"""The FastAPI application: routers, security headers, request limits, error pages."""

from __future__ import annotations

import re
import secrets
from datetime import timedelta
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.exceptions import HTTPException
from starlette.routing import Match, Router
from starlette.types import Receive, Scope, Send

from rlhfkit.feedback.assignment import CLAIM_LEASE
from rlhfkit.feedback.db import Database, open_database
from rlhfkit.feedback.middleware import RequestGuard, SecurityHeaders
from rlhfkit.feedback.models import Setting
from rlhfkit.feedback.routes import admin, api, auth, label
from rlhfkit.feedback.throttle import LoginThrottle, PasswordChecks
from rlhfkit.feedback.users import IDLE_TIMEOUT
from rlhfkit.feedback.web import NotAuthenticated, csrf_protect, login_redirect, optional_user, render

SECURITY_HEADERS = {
    # No inline script or style anywhere, so a script that slipped into a page would not run.
    "Content-Security-Policy": ("default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; object-src 'none'; base-uri 'none'; "
                                "frame-ancestors 'none'; form-action 'self'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}
# Served over HTTPS (--secure-cookies): browsers must never try plain HTTP for a year.
HSTS = {"Strict-Transport-Security": "max-age=31536000"}
# Forms and the JSON API are small; only the two upload forms take a file (admin.MAX_UPLOAD_BYTES
# plus room for the other fields).
MAX_BODY_BYTES = 1024 * 1024
MAX_UPLOAD_BODY_BYTES = admin.MAX_UPLOAD_BYTES + MAX_BODY_BYTES
UPLOAD_PATHS = re.compile(r"/admin/projects|/admin/p/\d+/rounds")


def body_limit(path: str) -> int:
    return MAX_UPLOAD_BODY_BYTES if UPLOAD_PATHS.fullmatch(path) else MAX_BODY_BYTES


def secret_key(db: Database) -> bytes:
    """The cookie/CSRF signing key, made once and kept in the database so logins survive a
    restart."""
    with db.write() as session:
        row = session.get(Setting, "secret_key")
        if row is None:
            row = Setting(key="secret_key", value=secrets.token_hex(32))
            session.add(row)
            session.commit()
        return bytes.fromhex(row.value)


def _slash_redirect(router: Router):
    """A GET for "/path/" that names a route without its trailing slash is sent there, by a
    relative Location: Starlette's own redirect builds an absolute URL from the Host header."""
    async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
        path = "/" + scope["path"].strip("/")
        if scope["method"] in ("GET", "HEAD") and path != scope["path"] and not path.startswith(("//", "/\\")):
            target = {**scope, "path": path}
            if any(route.matches(target)[0] is not Match.NONE for route in router.routes):
                query = scope.get("query_string", b"").decode("latin-1")
                response = RedirectResponse(path + (f"?{query}" if query else ""), status_code=308)
                return await response(scope, receive, send)
        raise HTTPException(status_code=404, detail="Not Found")

    return not_found


def create_app(db: str | Database, *, cookie_secure: bool = False, claim_lease: timedelta = CLAIM_LEASE,
               login_throttle: LoginThrottle | None = None, idle_timeout: timedelta = IDLE_TIMEOUT) -> FastAPI:
    """The labeling app on database `db` (a URL, a SQLite path, or an open `Database`).

    `cookie_secure` marks cookies Secure and sends HSTS: set it when the app is served over
    HTTPS. A claimed item is held for `claim_lease`, then offered to others again. A login
    session unused for `idle_timeout` ends (besides its absolute lifetime, users.SESSION_LIFETIME).
    """
    database = db if isinstance(db, Database) else open_database(db)
    app = FastAPI(title="rlhfkit labeling", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(csrf_protect)], redirect_slashes=False)
    headers = {**SECURITY_HEADERS, **(HSTS if cookie_secure else {})}
    app.state.database = database
    app.state.secret_key = secret_key(database)
    app.state.cookie_secure = cookie_secure
    app.state.claim_lease = claim_lease
    app.state.idle_timeout = idle_timeout
    app.state.login_throttle = login_throttle or LoginThrottle()
    app.state.password_checks = PasswordChecks()

    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    for router in (auth.router, label.router, admin.router, api.router):
        app.include_router(router)
    app.router.default = _slash_redirect(app.router)
    app.add_middleware(RequestGuard, limit_for=body_limit)
    app.add_middleware(SecurityHeaders, headers=headers)

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, _exc: NotAuthenticated):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "not logged in"}, status_code=401)
        return login_redirect(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return render(request, "error.html", {"status": exc.status_code, "message": exc.detail},
                      user=optional_user(request), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        if any(e["loc"][:1] == ("path",) for e in exc.errors()):
            # An id that is not a number, or one no row can have (above 2^63 - 1): no such page.
            return await http_error(request, HTTPException(status_code=404, detail="Not Found"))
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": problems}, status_code=422)
        return render(request, "error.html", {"status": 400, "message": f"Invalid input: {problems}"},
                      user=optional_user(request), status_code=400)

    @app.exception_handler(Exception)
    async def server_error(_request: Request, _exc: Exception):
        # Runs outside every middleware (Starlette's outermost layer): the headers go on here.
        # The traceback goes to the server log only.
        return PlainTextResponse("Internal server error", status_code=500,
                                 headers={**headers, "Cache-Control": "no-store"})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        with database.read() as session:
            session.scalar(select(Setting.key).limit(1))
        return {"ok": True}

    return app
