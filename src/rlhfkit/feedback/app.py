"""The FastAPI application: routers, security headers, error pages."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.exceptions import HTTPException

from rlhfkit.feedback.db import Database, open_database
from rlhfkit.feedback.models import Setting
from rlhfkit.feedback.routes import admin, api, auth, label
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


def create_app(db: str | Database, *, cookie_secure: bool = False) -> FastAPI:
    """The labeling app on database `db` (a URL, a SQLite path, or an open `Database`).

    `cookie_secure` marks cookies Secure: set it when the app is served over HTTPS.
    """
    database = db if isinstance(db, Database) else open_database(db)
    app = FastAPI(title="rlhfkit labeling", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(csrf_protect)])
    app.state.database = database
    app.state.secret_key = secret_key(database)
    app.state.cookie_secure = cookie_secure

    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")
    for router in (auth.router, label.router, admin.router, api.router):
        app.include_router(router)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(NotAuthenticated)
    async def not_authenticated(request: Request, _exc: NotAuthenticated):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": "not logged in"}, status_code=401)
        return login_redirect(request)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return render(request, "error.html", {"status": exc.status_code, "message": exc.detail},
                      user=optional_user(request), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": problems}, status_code=422)
        return render(request, "error.html", {"status": 400, "message": f"Invalid input: {problems}"},
                      user=optional_user(request), status_code=400)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, bool]:
        with database.read() as session:
            session.scalar(select(Setting.key).limit(1))
        return {"ok": True}

    return app
