"""`rlhf label ...`: run the labeling app, manage accounts, import rounds, export votes."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

import typer

from rlhfkit.cli.errors import fail
from rlhfkit.cli.help_format import App
from rlhfkit.cli.label_accounts import add_account_commands
from rlhfkit.cli.label_ops import DB_OPTION, add_commands, in_transaction, parse_moment
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.feedback import audit
from rlhfkit.feedback.assignment import CLAIM_LEASE, release_claims
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.export import FORMATS, export_records, write_jsonl
from rlhfkit.feedback.imports import import_round as import_round_in_chunks
from rlhfkit.feedback.models import ADMIN, ANNOTATOR
from rlhfkit.feedback.passwords import MIN_PASSWORD
from rlhfkit.feedback.projects import create_project, find_project
from rlhfkit.feedback.quality import flagged_annotators
from rlhfkit.feedback.records import read_numbered_file
from rlhfkit.feedback.users import IDLE_TIMEOUT, create_user, find_user

label_app = App(
    help="Collect human preference labels in the browser and export them for training.",
    no_args_is_help=True, rich_markup_mode="markdown",
)

PASSWORD_OPTION = typer.Option(..., "--password", prompt=True, hide_input=True, confirmation_prompt=True,
                               envvar="RLHFKIT_PASSWORD",
                               help=f"Asked for when not given (min. {MIN_PASSWORD} characters, not a common "
                                    "password, not the username).")


@label_app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Address to bind; keep the loopback default "
                                                     "unless a proxy with HTTPS is in front."),
          port: int = typer.Option(8000, help="Port to listen on."),
          db: str = DB_OPTION,
          secure_cookies: bool = typer.Option(False, help="Mark cookies Secure and send HSTS (serving over HTTPS)."),
          claim_lease_minutes: float = typer.Option(
              CLAIM_LEASE.total_seconds() / 60, min=1,
              help="How long a claimed item stays with its annotator unanswered before others get it."),
          idle_timeout_hours: float = typer.Option(
              IDLE_TIMEOUT.total_seconds() / 3600, min=0.05,
              help="A login session unused this long ends (it also ends 7 days after login)."),
          log_level: str = typer.Option("info", help="uvicorn log level.")) -> None:
    """Run the labeling web app.

    Example: `rlhf label serve --db feedback.db --port 8000`, then open http://127.0.0.1:8000
    """
    import uvicorn  # noqa: PLC0415 — the server, only for this command

    from rlhfkit.feedback.app import create_app  # noqa: PLC0415 — pulls in fastapi: +0.6 s on every `rlhf` start

    try:
        is_loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        is_loopback = host == "localhost"
    if not is_loopback:
        typer.secho(f"warning: listening on {host}, reachable from other machines; use HTTPS "
                    "(a reverse proxy) and --secure-cookies", fg="yellow", err=True)
    app = create_app(db, cookie_secure=secure_cookies, claim_lease=timedelta(minutes=claim_lease_minutes),
                     idle_timeout=timedelta(hours=idle_timeout_hours))
    uvicorn.run(app, host=host, port=port, log_level=log_level, workers=1)


def _add_user(db: str, username: str, password: str, role: str) -> None:
    def change(session) -> None:
        user = create_user(session, username, password, role)
        audit.record(session, audit.CLI, "user.create", f"user:{user.username}", role=role)

    in_transaction(db, change)
    typer.echo(f"created {role} {username!r}")


@label_app.command("create-admin")
def create_admin(username: str = typer.Argument(..., help="Login name."),
                 password: str = PASSWORD_OPTION, db: str = DB_OPTION) -> None:
    """Create an admin account (manages projects, annotators, export).

    Example: `rlhf label create-admin alice --db feedback.db`
    """
    _add_user(db, username, password, ADMIN)


@label_app.command("add-annotator")
def add_annotator(username: str = typer.Argument(..., help="Login name."),
                  password: str = PASSWORD_OPTION, db: str = DB_OPTION) -> None:
    """Create an annotator account (labels items, sees only their own votes).

    Example: `rlhf label add-annotator bob --db feedback.db`
    """
    _add_user(db, username, password, ANNOTATOR)


@label_app.command("import")
def import_round(path: Path = typer.Argument(..., help="JSONL: {prompt, responses, gold?, model_version?, id?}."),
                 project: str = typer.Option(..., "--project", help="Project name; created if new."),
                 model_version: str | None = typer.Option(None, help="Model version the responses came from."),
                 overlap: int = typer.Option(2, help="Annotators per item, for a new project."),
                 guidelines: Path | None = typer.Option(None, help="Markdown guidelines, for a new project."),
                 db: str = DB_OPTION) -> None:
    """Import prompts with candidate responses as the next round of a project.

    Example: `rlhf label import candidates.jsonl --project helpfulness --model-version sft-v1 --db feedback.db`
    """
    database = open_database(db)
    try:
        lines, records = read_numbered_file(path)  # checked whole before any write
        with database.write() as session:
            target = find_project(session, project)
            if target is None:
                text = guidelines.read_text(encoding="utf-8") if guidelines else ""
                target = create_project(session, project, overlap=overlap, guidelines_md=text,
                                        open_to_all=True)  # restrict: `rlhf label members`
                audit.record(session, audit.CLI, "project.create", f"project:{target.name}", overlap=overlap)
                session.commit()
                typer.echo(f"created project {project!r} (overlap {overlap})")

        def record_import(session, new_round) -> None:
            audit.record(session, audit.CLI, "round.import", f"project:{target.name}", round=new_round.number,
                         items=len(records), model_version=new_round.model_version, via="cli", file=str(path))

        # staged and written in chunks: annotators keep voting while a large file goes in
        new_round = import_round_in_chunks(database, target.id, records, model_version, source=str(path),
                                           lines=lines, on_publish=record_import)
        typer.echo(f"round {new_round.number}: {len(records)} items "
                   f"(model version {new_round.model_version or 'not given'})")
    except DataError as e:
        fail(str(e))
    finally:
        database.close()


def _project(session, name: str):
    """The project called `name`, or one `error:` line."""
    target = find_project(session, name)
    if target is None:
        fail(f"no project named {name!r}")
    return target


@label_app.command("release")
def release(project: str = typer.Option(..., "--project", help="Project name."),
            annotator: str | None = typer.Option(None, "--annotator", help="Only this annotator's claims."),
            db: str = DB_OPTION) -> None:
    """Release claimed, unanswered items so that other annotators get them now.

    Example: `rlhf label release --project helpfulness --annotator bob --db feedback.db`
    (claims also expire by themselves: see `rlhf label serve --claim-lease-minutes`)
    """
    def change(session) -> int:
        target = _project(session, project)
        user = find_user(session, annotator) if annotator else None
        if annotator and user is None:
            fail(f"no account named {annotator!r}")
        count = release_claims(session, target, user)
        audit.record(session, audit.CLI, "claims.release", f"project:{target.name}", count=count,
                     annotator=annotator)
        return count

    count = in_transaction(db, change)
    typer.echo(f"released {count} claim{'' if count == 1 else 's'} in {project!r}"
               + (f" held by {annotator!r}" if annotator else ""))


@label_app.command("export")
def export(output: Path = typer.Argument(..., help="JSONL file to write."),
           project: str = typer.Option(..., "--project", help="Project name."),
           format: str = typer.Option("pairs", "--format", help=f"One of: {', '.join(FORMATS)} "
                                      "(soft = one pair per comparison, label = mean vote)."),
           round: list[int] | None = typer.Option(None, "--round", help="Only this round (repeatable)."),
           exclude_flagged: bool = typer.Option(False, help="Leave out annotators flagged as outliers."),
           no_gold: bool = typer.Option(False, "--no-gold", help="Leave out gold items."),
           as_of: str | None = typer.Option(None, "--as-of", help="The votes as they stood at this time "
                                            "(ISO 8601, UTC; edits and undos since are rolled back)."),
           db: str = DB_OPTION) -> None:
    """Export votes as training data (pairs, rankings or soft labels) with provenance.

    Example: `rlhf label export prefs.jsonl --project helpfulness --format pairs --db feedback.db`
    (the file feeds the reward-model and DPO trainers as it is)
    """
    if format not in FORMATS:
        fail(f"unknown format {format!r} (use {', '.join(FORMATS)})")
    moment = parse_moment(as_of, "--as-of") if as_of else None
    database = open_database(db)
    try:
        with database.read() as session:
            target = _project(session, project)
            excluded = flagged_annotators(session, target) if exclude_flagged else set()
            skips = SkipReport()
            records = export_records(session, target, format=format, rounds=round or None,
                                     exclude_annotators=excluded, include_gold=not no_gold, skips=skips,
                                     as_of=moment)
        with database.write() as log:  # recorded before the data leaves (see feedback/audit.py)
            audit.record(log, audit.CLI, "export", f"project:{project}", format=format, rows=len(records),
                         rounds=round or None, exclude_flagged=exclude_flagged, as_of=moment, via="cli",
                         file=str(output))
            log.commit()
        count = write_jsonl(records, output)
    finally:
        database.close()
    left_out = f", left out {', '.join(sorted(excluded))}" if excluded else ""
    typer.echo(f"wrote {count} {format} records to {output} ({skips.summary()}{left_out})")


add_commands(label_app)  # backup, restore, audit (cli/label_ops.py)
add_account_commands(label_app)  # deactivate, activate, reset-password, revoke-sessions, members


def register(app: typer.Typer) -> None:
    app.add_typer(label_app, name="label", help="Human feedback collection: the labeling web app.")
