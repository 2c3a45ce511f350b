"""Passwords, signed cookies and CSRF tokens, with the standard library only.

- Passwords: scrypt (memory-hard) at N=2^17, r=8, p=1 (OWASP's current minimum; 128 MiB and
  a few hundred ms per check), a random 16-byte salt per password, parameters stored with the
  hash: an older, cheaper hash still verifies and is replaced at the next login (`needs_rehash`).
  At most `HASHING_SLOTS` checks run at once (half the CPU cores, at least one): a flood of
  login attempts from many addresses queues for them instead of taking every core and 128 MiB
  per attempt, so the annotators' requests keep the other cores.
- Cookies: `value.signature`, the signature an HMAC-SHA256 of the value under the app's
  secret key, so a cookie the server did not issue is rejected before any lookup.
- CSRF: the token is an HMAC of the session token under the secret key. It is tied to the
  login session, needs no storage, and a page on another site cannot read it (the session
  cookie is HttpOnly and the token is only ever in our own pages).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import secrets
import threading

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1
SALT_BYTES = 16
KEY_BYTES = 32
# A stored hash names its own cost; one that asks for more than this is refused unread, so a
# tampered row cannot make a login allocate gigabytes.
MAX_SCRYPT_N, MAX_SCRYPT_R, MAX_SCRYPT_P = 2**20, 16, 4


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


HASHING_SLOTS = max(1, (os.cpu_count() or 2) // 2)
_hashing = threading.BoundedSemaphore(HASHING_SLOTS)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # scrypt needs 128·r·N bytes (plus a little); OpenSSL refuses more than 32 MiB unless told.
    with _hashing:
        return hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                              maxmem=129 * r * n + 2**20)


def hash_password(password: str) -> str:
    """'scrypt$n$r$p$salt$key' for `password`."""
    salt = secrets.token_bytes(SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, KEY_BYTES)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    """True when `password` matches `stored` (a `hash_password` string); constant-time."""
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt" or int(n) > MAX_SCRYPT_N or int(r) > MAX_SCRYPT_R or int(p) > MAX_SCRYPT_P:
            return False
        expected = _unb64(key)
        actual = _scrypt(password, _unb64(salt), int(n), int(r), int(p), len(expected))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def needs_rehash(stored: str) -> bool:
    """True when `stored` was made with other parameters than `hash_password` uses now."""
    return not stored.startswith(f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$")


@functools.cache
def dummy_password_hash() -> str:
    """A hash of a random password: checked when the username does not exist, so a login
    attempt takes as long for an unknown user as for a wrong password (no username probing
    by timing). Made on first use, not at import: it costs a full scrypt."""
    return hash_password(secrets.token_urlsafe(16))


def new_token() -> str:
    """A random 256-bit URL-safe token."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the database stores for a session token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _mac(secret: bytes, purpose: str, value: str) -> str:
    return _b64(hmac.new(secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest())


def sign(value: str, secret: bytes) -> str:
    """`value.signature` (value must not contain '.')."""
    return f"{value}.{_mac(secret, 'cookie', value)}"


def unsign(signed: str | None, secret: bytes) -> str | None:
    """The value of a `sign` string, or None when it is missing or tampered with."""
    if not signed or "." not in signed:
        return None
    value, signature = signed.rsplit(".", 1)
    if not hmac.compare_digest(signature, _mac(secret, "cookie", value)):
        return None
    return value


def csrf_token(session_token: str, secret: bytes) -> str:
    return _mac(secret, "csrf", session_token)


def csrf_ok(given: str | None, session_token: str | None, secret: bytes) -> bool:
    if not given or not session_token:
        return False
    return hmac.compare_digest(given, csrf_token(session_token, secret))
