"""`rlhf label deactivate / activate / reset-password / revoke-sessions / members`: the account
lifecycle and who may label a project. Each error is one `error:` line (exit 2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import typer
from sqlalchemy.orm import Session

from rlhfkit.cli.label_ops import DB_OPTION, in_transaction
from rlhfkit.data.errors import DataError
from rlhfkit.feedback import accounts, audit, membership
from rlhfkit.feedback.models import User
from rlhfkit.feedback.passwords import MIN_PASSWORD
from rlhfkit.feedback.projects import find_project

T = TypeVar("T")
USER_ARGUMENT = typer.Argument(..., help="Login name.")
NEW_PASSWORD_OPTION = typer.Option(..., "--password", prompt="New password", hide_input=True,
                                   confirmation_prompt=True, envvar="RLHFKIT_PASSWORD",
                                   help=f"Asked for when not given (min. {MIN_PASSWORD} characters, not a common "
                                        "password, not the username).")


def _account_change(username: str, action: str, change: Callable[[Session, User], T]) -> Callable[[Session], T]:
    """`change` applied to the named account, with its audit row in the same transaction."""
    def run(session: Session) -> T:
        user = accounts.require_user(session, username)
        result = change(session, user)
        audit.record(session, audit.CLI, action, f"user:{user.username}",
                     **({"sessions_ended": result} if isinstance(result, int) else {}))
        return result
    return run


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def deactivate_command(username: str = USER_ARGUMENT, db: str = DB_OPTION) -> None:
    """Deactivate an account: it cannot log in, its sessions end now, its claims are released;
    its votes stay (dashboard, export).

    Example: `rlhf label deactivate bob --db feedback.db`
    """
    ended = in_transaction(db, _account_change(username, "user.deactivate", accounts.deactivate))
    typer.echo(f"deactivated {username!r} ({_plural(ended, 'session')} ended)")


def activate_command(username: str = USER_ARGUMENT, db: str = DB_OPTION) -> None:
    """Let a deactivated account log in again.

    Example: `rlhf label activate bob --db feedback.db`
    """
    in_transaction(db, _account_change(username, "user.activate", accounts.activate))
    typer.echo(f"activated {username!r}")


def reset_password_command(username: str = USER_ARGUMENT, password: str = NEW_PASSWORD_OPTION,
                           db: str = DB_OPTION) -> None:
    """Set a new password for an account and end all its sessions.

    Example: `rlhf label reset-password bob --db feedback.db` (asks for the password)
    """
    ended = in_transaction(db, _account_change(username, "user.password_reset",
                                                       lambda s, u: accounts.reset_password(s, u, password)))
    typer.echo(f"new password set for {username!r} ({_plural(ended, 'session')} ended)")


def revoke_sessions_command(username: str = USER_ARGUMENT, db: str = DB_OPTION) -> None:
    """Log an account out everywhere (end all its sessions).

    Example: `rlhf label revoke-sessions bob --db feedback.db`
    """
    ended = in_transaction(db, _account_change(username, "user.sessions_revoked", accounts.revoke_sessions))
    typer.echo(f"ended {_plural(ended, 'session')} of {username!r}")


def members_command(project: str = typer.Option(..., "--project", help="Project name."),
                    add: str = typer.Option("", "--add", help="Annotators to make members: a,b,c."),
                    remove: str = typer.Option("", "--remove", help="Members to take off (claims released; "
                                                                    "votes stay)."),
                    open_to_all: bool | None = typer.Option(None, "--open/--members-only",
                                                            help="Open the project to every annotator, or "
                                                                 "restrict it to its members."),
                    db: str = DB_OPTION) -> None:
    """Show or change who may label a project (admins see every project).

    Example: `rlhf label members --project helpfulness --members-only --add alice,bob --db feedback.db`
    """
    def change(session: Session) -> str:
        target = find_project(session, project)
        if target is None:
            raise DataError(f"no project named {project!r}", field="project")
        detail = membership.change_access(session, target, add=membership.parse_names(add),
                                          remove=membership.parse_names(remove), open_to_all=open_to_all)
        if detail is not None:
            audit.record(session, audit.CLI, "project.members", f"project:{target.name}", **detail)
        return membership.access_summary(session, target)

    typer.echo(f"{project!r}: {in_transaction(db, change)}")


def add_account_commands(group: typer.Typer) -> None:
    group.command("deactivate")(deactivate_command)
    group.command("activate")(activate_command)
    group.command("reset-password")(reset_password_command)
    group.command("revoke-sessions")(revoke_sessions_command)
    group.command("members")(members_command)
