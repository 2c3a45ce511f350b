"""The password policy for new passwords (existing accounts keep theirs and still log in).

A password needs 10 to 1024 characters (NIST SP 800-63B asks for at least 8 and no
composition rules; 10 leaves room for the guessing a throttled login still allows), is not
only whitespace, uses at least 5 different characters, does not equal or contain the username
(case-insensitive), and is not in `common_passwords.txt`, also after stripping the digits and
symbols around it ("Password123!") and undoing the usual letter swaps ("p@ssw0rd").
"""

from __future__ import annotations

import functools
import string
from pathlib import Path

from rlhfkit.data.errors import DataError

MIN_PASSWORD = 10
MAX_PASSWORD = 1024
MIN_DISTINCT = 5
# The username is looked for inside the password from this length on (a one-letter username
# would otherwise forbid every password with that letter).
MIN_NAME_IN_PASSWORD = 3
COMMON_PASSWORDS_FILE = Path(__file__).parent / "common_passwords.txt"
_LEET = str.maketrans({"@": "a", "4": "a", "0": "o", "1": "i", "!": "i", "3": "e", "$": "s", "5": "s", "7": "t"})
_AROUND = string.digits + string.punctuation + " "


@functools.cache
def common_passwords() -> frozenset[str]:
    lines = COMMON_PASSWORDS_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(line.strip().lower() for line in lines if line.strip() and not line.startswith("#"))


def _variants(password: str) -> set[str]:
    lowered = password.lower()
    found = {lowered, lowered.strip(_AROUND), lowered.translate(_LEET), lowered.translate(_LEET).strip(_AROUND)}
    return {v for v in found if v}


def password_problem(password: str, username: str) -> str | None:
    """Why `password` may not be set for `username`, or None when it may."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        return f"a password needs {MIN_PASSWORD} to {MAX_PASSWORD} characters"
    if not password.strip():
        return "a password cannot be only spaces"
    if len(set(password)) < MIN_DISTINCT:
        return f"a password needs at least {MIN_DISTINCT} different characters"
    name, lowered = username.strip().casefold(), password.casefold()
    if name and (lowered == name or (len(name) >= MIN_NAME_IN_PASSWORD and name in lowered)):
        return "a password cannot contain the username"
    if _variants(password) & common_passwords():
        return "this password is on the list of common passwords; choose another"
    return None


def check_password(password: str, username: str) -> None:
    """Raise a DataError (field 'password') when `password` breaks the policy."""
    problem = password_problem(password, username)
    if problem is not None:
        raise DataError(problem, field="password")
