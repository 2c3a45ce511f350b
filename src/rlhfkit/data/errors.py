"""Errors in user data that name the file, the line and the field."""

from __future__ import annotations

from dataclasses import dataclass, field


class DataError(ValueError):
    """A bad record: `path:line: field 'x': message`. Raised instead of a deep traceback.

    Records that are not lines of a file (a JSON list, Parquet rows, a `datasets` split) are
    numbered by `record` instead: `path: record 3: field 'x': message`. Parts that are not
    known are left out (no placeholder path)."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 field: str | None = None, record: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        self.record = record
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where += f":{self.line}" if where else f"line {self.line}"
        if self.record is not None:
            where += f": record {self.record}" if where else f"record {self.record}"
        if self.field:
            where += f": field '{self.field}'" if where else f"field '{self.field}'"
        return f"{where}: {self.message}" if where else self.message


@dataclass
class SkipReport:
    """Counts of records left out on purpose (over-length, empty, duplicate, ...), by reason.

    Nothing is dropped silently: every recipe logs this report and saves it in the run folder.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, where: str | None = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if where is not None:
            seen = self.examples.setdefault(reason, [])
            if len(seen) < 5 and where not in seen:   # a file without line numbers is named once
                seen.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no records skipped"
        parts = [f"{n} {reason}" for reason, n in sorted(self.counts.items())]
        return "skipped " + ", ".join(parts)

    def describe(self) -> str:
        """The summary and where the first skipped records are, for a log line."""
        where = "; ".join(w for ws in self.examples.values() for w in ws)
        return f"{self.summary()} ({where})" if where else self.summary()
