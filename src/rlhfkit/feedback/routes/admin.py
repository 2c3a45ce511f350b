"""The admin's pages: projects, rounds, accounts, the dashboard and export."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.data.errors import DataError
from rlhfkit.feedback import accounts, audit, membership
from rlhfkit.feedback import projects as project_service
from rlhfkit.feedback import users as user_service
from rlhfkit.feedback.assignment import claim_counts, release_claims
from rlhfkit.feedback.export import FORMATS, export_records, to_jsonl
from rlhfkit.feedback.imports import import_round
from rlhfkit.feedback.models import ANNOTATOR, ROLES, Project, Round, User, Vote
from rlhfkit.feedback.passwords import MIN_PASSWORD
from rlhfkit.feedback.quality import flagged_annotators, project_report
from rlhfkit.feedback.records import CandidateSet, read_stream
from rlhfkit.feedback.web import (
    RoundNumber,
    RowId,
    current_admin,
    database,
    error_text,
    get_project,
    get_user,
    read_db,
    redirect,
    render,
    write_db,
)

router = APIRouter(prefix="/admin")
MAX_UPLOAD_BYTES = 50 * 1024 * 1024
AUDIT_ROWS = 20  # the latest audit entries on the admin page; `rlhf label audit` shows them all


def _read_upload(upload: UploadFile | None) -> list[tuple[int, CandidateSet]] | None:
    """(line number, record) for an uploaded JSONL file, or None when no file was chosen.

    Starlette keeps the upload in a temporary file: it is read one line at a time, and every
    problem (encoding, nesting, types, a repeated id) is one `file:line: field: problem` line."""
    if upload is None or not upload.filename:
        return None
    upload.file.seek(0, 2)
    if upload.file.tell() > MAX_UPLOAD_BYTES:
        raise DataError(f"file larger than {MAX_UPLOAD_BYTES // 2**20} MiB", path=upload.filename)
    upload.file.seek(0)
    return read_stream(upload.file, path=upload.filename)


def _import_upload(request: Request, admin: User, project: Project, upload: UploadFile,
                   records: list[tuple[int, CandidateSet]], model_version: str) -> Round:
    """The upload as the project's next round, staged and written in chunks (imports.py), so
    annotators keep voting while it goes in; its audit row commits with the round."""
    def record_import(session: Session, new_round: Round) -> None:
        audit.record(session, admin, "round.import", f"project:{project.name}", round=new_round.number,
                     items=len(records), model_version=new_round.model_version, via="web")

    return import_round(database(request), project.id, [c for _, c in records], model_version or None,
                        source=upload.filename, lines=[n for n, _ in records], on_publish=record_import)


def _home(request: Request, db: Session, admin: User, *, error: str | None = None, status_code: int = 200):
    rows = [{"project": p,
             "item_count": project_service.item_count(db, p.id),
             "vote_count": db.scalar(select(func.count(Vote.id)).where(Vote.project_id == p.id))}
            for p in db.scalars(select(Project).order_by(Project.name))]
    entries = audit.latest(db, limit=AUDIT_ROWS)
    names = audit.actor_names(db, entries)
    log = [{"at": audit.when(e).strftime("%Y-%m-%d %H:%M:%S"), "actor": names[e.actor], "action": e.action,
            "target": e.target, "detail": json.dumps(e.detail, ensure_ascii=False, sort_keys=True)} for e in entries]
    return render(request, "admin_home.html", {"rows": rows, "users": user_service.list_users(db),
                                               "roles": ROLES, "error": error, "min_password": MIN_PASSWORD,
                                               "audit": log}, user=admin, status_code=status_code)


@router.get("")
def home(request: Request, admin: User = Depends(current_admin), db: Session = Depends(read_db)):
    return _home(request, db, admin)


@router.post("/users")
def create_user(request: Request, username: str = Form(""), password: str = Form(""),
                role: str = Form(ANNOTATOR), admin: User = Depends(current_admin),
                db: Session = Depends(write_db)):
    try:
        user = user_service.create_user(db, username, password, role)
        audit.record(db, admin, "user.create", f"user:{user.username}", role=role)
    except DataError as e:
        db.rollback()
        return _home(request, db, admin, error=error_text(e), status_code=400)
    db.commit()
    return redirect("/admin")


def _account_action(request: Request, db: Session, admin: User, user_id: int, action: str,
                    change: Callable[[Session, User], Any], *, refuse_self: str | None = None):
    """`change` applied to the account `user_id`, with its audit row (the CLI's action name) in
    the same transaction; a DataError re-renders the admin page with its one-line message."""
    user = get_user(db, user_id)
    try:
        if refuse_self:
            accounts.refuse_self(admin, user, refuse_self)
        result = change(db, user)
        audit.record(db, admin, action, f"user:{user.username}", via="web",
                     **({"sessions_ended": result} if isinstance(result, int) else {}))
    except DataError as e:
        db.rollback()
        return _home(request, db, admin, error=error_text(e), status_code=400)
    db.commit()
    return redirect("/admin")


@router.post("/users/{user_id}/deactivate")
def deactivate_user(request: Request, user_id: RowId, admin: User = Depends(current_admin),
                    db: Session = Depends(write_db)):
    return _account_action(request, db, admin, user_id, "user.deactivate", accounts.deactivate,
                           refuse_self="deactivate your own account")


@router.post("/users/{user_id}/activate")
def activate_user(request: Request, user_id: RowId, admin: User = Depends(current_admin),
                  db: Session = Depends(write_db)):
    return _account_action(request, db, admin, user_id, "user.activate", accounts.activate)


@router.post("/users/{user_id}/password")
def reset_password(request: Request, user_id: RowId, password: str = Form(""),
                   admin: User = Depends(current_admin), db: Session = Depends(write_db)):
    return _account_action(request, db, admin, user_id, "user.password_reset",
                           lambda session, user: accounts.reset_password(session, user, password))


@router.post("/users/{user_id}/revoke-sessions")
def revoke_sessions(request: Request, user_id: RowId, admin: User = Depends(current_admin),
                    db: Session = Depends(write_db)):
    return _account_action(request, db, admin, user_id, "user.sessions_revoked", accounts.revoke_sessions,
                           refuse_self="revoke your own sessions (log out instead)")


@router.post("/projects")
def create_project(request: Request, name: str = Form(""), overlap: int = Form(2),
                   guidelines: str = Form(""), model_version: str = Form(""),
                   file: UploadFile | None = File(None), admin: User = Depends(current_admin),
                   db: Session = Depends(read_db)):
    # No write transaction is held while the upload is read and imported: the project is
    # created in one short transaction, the round goes in chunks (a failed import leaves the
    # project, empty, with the error shown).
    try:
        records = _read_upload(file)
        with database(request).write() as session:
            project = project_service.create_project(session, name, overlap=overlap, guidelines_md=guidelines,
                                                     open_to_all=True)  # restrict: dashboard, `label members`
            audit.record(session, admin, "project.create", f"project:{project.name}", overlap=overlap)
            session.commit()
        if records:
            _import_upload(request, admin, project, file, records, model_version)
    except DataError as e:
        return _home(request, db, admin, error=error_text(e), status_code=400)
    return redirect(f"/admin/p/{project.id}")


def _dashboard(request: Request, db: Session, admin: User, project: Project, round_number: int | None,
               *, error: str | None = None, status_code: int = 200):
    report = project_report(db, project, round_number)
    running, expired = claim_counts(db, project)
    return render(request, "dashboard.html", {"project": project, "report": report, "formats": FORMATS,
                                              "claims": {"running": running, "expired": expired},
                                              "members": membership.member_names(db, project),
                                              "access": membership.access_summary(db, project),
                                              "error": error}, user=admin, status_code=status_code)


@router.get("/p/{project_id}")
def dashboard(request: Request, project_id: RowId, round: RoundNumber = None,
              admin: User = Depends(current_admin), db: Session = Depends(read_db)):
    return _dashboard(request, db, admin, get_project(db, project_id), round)


@router.post("/p/{project_id}/rounds")
def add_round(request: Request, project_id: RowId, model_version: str = Form(""),
              file: UploadFile | None = File(None), admin: User = Depends(current_admin),
              db: Session = Depends(read_db)):
    project = get_project(db, project_id)
    try:
        records = _read_upload(file)
        if not records:
            raise DataError("choose a JSONL file of prompts and responses", field="file")
        _import_upload(request, admin, project, file, records, model_version)
    except DataError as e:
        return _dashboard(request, db, admin, project, None, error=error_text(e), status_code=400)
    return redirect(f"/admin/p/{project_id}")


@router.post("/p/{project_id}/settings")
def update_settings(request: Request, project_id: RowId, overlap: int = Form(...), guidelines: str = Form(""),
                    admin: User = Depends(current_admin), db: Session = Depends(write_db)):
    project = get_project(db, project_id)
    try:
        project_service.validate_overlap(overlap)
    except DataError as e:
        db.rollback()
        return _dashboard(request, db, admin, project, None, error=error_text(e), status_code=400)
    audit.record(db, admin, "project.settings", f"project:{project.name}", overlap=[project.overlap, overlap],
                 guidelines_changed=project.guidelines_md != guidelines)
    project.overlap = overlap
    project.guidelines_md = guidelines
    db.commit()
    return redirect(f"/admin/p/{project_id}")


@router.post("/p/{project_id}/members")
def members(request: Request, project_id: RowId, add: str = Form(""), remove: str = Form(""),
            access: str = Form(""), admin: User = Depends(current_admin), db: Session = Depends(write_db)):
    """Add members, take members off (their claims are released), open or restrict the project."""
    project = get_project(db, project_id)
    try:
        detail = membership.change_access(db, project, add=membership.parse_names(add),
                                          remove=membership.parse_names(remove),
                                          open_to_all=membership.parse_access(access))
        if detail is not None:
            audit.record(db, admin, "project.members", f"project:{project.name}", **detail, via="web")
    except DataError as e:
        db.rollback()
        return _dashboard(request, db, admin, project, None, error=error_text(e), status_code=400)
    db.commit()
    return redirect(f"/admin/p/{project_id}")


@router.post("/p/{project_id}/release")
def release(request: Request, project_id: RowId, username: str = Form(""), admin: User = Depends(current_admin),
            db: Session = Depends(write_db)):
    """Expire the running claims of the project (of one annotator when a username is given)."""
    project = get_project(db, project_id)
    annotator = user_service.find_user(db, username) if username.strip() else None
    if username.strip() and annotator is None:
        return _dashboard(request, db, admin, project, None, error=f"no account named {username!r}", status_code=400)
    count = release_claims(db, project, annotator)
    audit.record(db, admin, "claims.release", f"project:{project.name}", count=count,
                 annotator=annotator.username if annotator else None)
    db.commit()
    return redirect(f"/admin/p/{project_id}")


@router.get("/p/{project_id}/export")
def export(request: Request, project_id: RowId, format: str = "pairs", round: RoundNumber = None,
           exclude_flagged: bool = False, admin: User = Depends(current_admin), db: Session = Depends(read_db)):
    if format not in FORMATS:
        raise HTTPException(status_code=400, detail=f"format must be one of {', '.join(FORMATS)}")
    project = get_project(db, project_id)
    excluded = flagged_annotators(db, project) if exclude_flagged else set()
    records = export_records(db, project, format=format, rounds=None if round is None else [round],
                             exclude_annotators=excluded)
    with database(request).write() as log:  # recorded before the data leaves; see audit.py
        audit.record(log, admin, "export", f"project:{project.name}", format=format, rows=len(records),
                     round=round, exclude_flagged=exclude_flagged, via="web")
        log.commit()
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", project.name).strip("-") or "project"
    return Response(to_jsonl(records), media_type="application/x-ndjson",
                    headers={"Content-Disposition": f'attachment; filename="{slug}-{format}.jsonl"'})
