"""Login pressure: failed logins throttled per account and per client, and password checks
limited to a few at a time.

The throttle is kept in memory, not in the database, on purpose: a login flood must not turn
into a stream of writes that queue on the SQLite write lock with the votes (the very failure
it guards against), the app runs as one process (`rlhf label serve` starts one uvicorn
worker), and forgetting the counters on a restart only gives an attacker one more round of
free tries. Its memory is bounded: at most `max_keys` records per kind, the least recently
failed forgotten first, so a flood of made-up usernames cannot grow it without limit (and is
throttled per client long before).

Backoff: a key (an account's username key, or a client address) may fail `free` times; each
failure after that blocks the key for base · 2^(failures − free) seconds, capped at
`max_delay`. A blocked key gets 429 with Retry-After and no password check at all, right or
wrong. A success clears the account's record, not the client's (one valid account must not
reset a guesser's budget). A record is forgotten `forget_after` seconds after its block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
ACCOUNT_FREE_FAILURES = 5
# One office behind one NAT address holds many annotators, each allowed a few typos.
CLIENT_FREE_FAILURES = 20
BASE_DELAY_S = 1.0
MAX_DELAY_S = 15 * 60.0
FORGET_AFTER_S = 15 * 60.0
MAX_KEYS = 50_000
MAX_KEY_CHARS = 256
LOW_PRIORITY = 19  # nice value of the password-check threads (19: the lowest)


@dataclass
class _Record:
    failures: int = 0
    blocked_until: float = 0.0


class _Counter:
    """Failures per key, least recently failed first."""

    def __init__(self, free: int, base: float, cap: float, forget_after: float, max_keys: int):
        self.free, self.base, self.cap, self.forget_after, self.max_keys = free, base, cap, forget_after, max_keys
        self.records: OrderedDict[str, _Record] = OrderedDict()

    def _live(self, key: str, now: float) -> _Record | None:
        record = self.records.get(key)
        if record is not None and now > record.blocked_until + self.forget_after:
            del self.records[key]
            return None
        return record

    def wait(self, key: str, now: float) -> float:
        record = self._live(key, now)
        return 0.0 if record is None else max(0.0, record.blocked_until - now)

    def fail(self, key: str, now: float) -> None:
        record = self._live(key, now) or _Record(blocked_until=now)
        record.failures += 1
        if record.failures >= self.free:
            record.blocked_until = now + min(self.cap, self.base * 2 ** min(record.failures - self.free, 32))
        else:
            record.blocked_until = now
        self.records[key] = record
        self.records.move_to_end(key)
        while len(self.records) > self.max_keys:
            self.records.popitem(last=False)

    def clear(self, key: str) -> None:
        self.records.pop(key, None)


class LoginThrottle:
    """Failed logins per account and per client address, with exponential backoff."""

    def __init__(self, *, account_free: int = ACCOUNT_FREE_FAILURES, client_free: int = CLIENT_FREE_FAILURES,
                 base_delay: float = BASE_DELAY_S, max_delay: float = MAX_DELAY_S,
                 forget_after: float = FORGET_AFTER_S, max_keys: int = MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic):
        self.accounts = _Counter(account_free, base_delay, max_delay, forget_after, max_keys)
        self.clients = _Counter(client_free, base_delay, max_delay, forget_after, max_keys)
        self.clock = clock
        self._lock = threading.Lock()

    def retry_after(self, account: str, client: str) -> int:
        """Whole seconds until this account may be tried from this client; 0: now."""
        with self._lock:
            now = self.clock()
            wait = max(self.accounts.wait(account[:MAX_KEY_CHARS], now), self.clients.wait(client, now))
        return math.ceil(wait)

    def failed(self, account: str, client: str) -> None:
        with self._lock:
            now = self.clock()
            self.accounts.fail(account[:MAX_KEY_CHARS], now)
            self.clients.fail(client, now)

    def succeeded(self, account: str) -> None:
        with self._lock:
            self.accounts.clear(account[:MAX_KEY_CHARS])


class Busy(Exception):
    """Too many password checks are already waiting: answer 503 and let the client retry."""


def default_check_slots() -> int:
    """Half the cores (at least one): the other half stays free for the voters."""
    return max(1, (os.cpu_count() or 2) // 2)


def lower_thread_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: a thread is its own task, so
    `setpriority` on its id touches nothing else). Elsewhere, or if refused, nothing changes."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOW_PRIORITY)


class PasswordChecks:
    """At most `slots` password checks run at once, in threads of their own that run at the
    lowest CPU priority; the others wait without holding a thread, and past `max_waiting` a
    login is turned away (`Busy`).

    A scrypt check takes 128 MiB and a few hundred ms of a core: unbounded, a login flood
    would take all the memory and every core the voters need, and fill the thread pool that
    the (synchronous) vote routes run in. At the lowest priority it also only gets the CPU
    the voters leave idle: under a flood a login waits longer, a vote does not. (The pool
    is its own, so no thread that later answers a vote was lowered: an unprivileged process
    cannot raise a thread's priority again.)
    """

    def __init__(self, slots: int | None = None, max_waiting: int = 32):
        slots = slots or default_check_slots()
        self.slots, self.max_waiting = slots, max_waiting
        self._pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="password-check",
                                        initializer=lower_thread_priority)
        self._pending = 0  # submitted and not finished; only touched on the event loop

    async def run(self, check: Callable[[], T]) -> T:
        if self._pending >= self.slots + self.max_waiting:
            raise Busy()
        self._pending += 1
        try:
            return await asyncio.wrap_future(self._pool.submit(check))
        finally:
            self._pending -= 1
