"""Reading the items to label from JSONL, with errors that name the file, line and field.

One record per line:

    {"prompt": "text" | [{"role": ..., "content": ...}, ...],
     "responses": ["...", "...", ...],        # 2 (pairwise) to 9 (ranking, keys 1-9)
     "gold": 1 | [1, 0, 2] | null,            # optional known answer, see below
     "model_version": "sft-v3",               # optional
     "id": "q-17",                            # optional
     "meta": {...}}                           # optional, kept and exported

`gold` is either the index of the best response, or a rank per response (0 = best, equal =
tie), e.g. [1, 1, 0] for "the third is best, the first two tie". Items with gold are
honeypots: every annotator gets them and their answers give gold accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from rlhfkit.config import closest_names
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import ROLES

MIN_RESPONSES = 2
MAX_RESPONSES = 9  # one number key per candidate
FIELDS = ("prompt", "responses", "gold", "model_version", "id", "meta")
# Deeper JSON is refused: it is never needed here, and re-encoding it (storage, export) would recurse.
MAX_DEPTH = 20
MAX_ID = 500  # characters, the size of the id and model_version columns


@dataclass(frozen=True)
class CandidateSet:
    """A prompt and the candidate responses annotators compare."""

    prompt: str | list[dict[str, str]]
    responses: tuple[str, ...]
    gold_ranks: tuple[int | None, ...] | None = None
    model_version: str | None = None
    external_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def dense_ranks(ranks: Iterable[int]) -> tuple[int, ...]:
    """Renumber ranks 0, 1, 2, ... keeping order and ties: (5, 5, 2) -> (1, 1, 0)."""
    ranks = tuple(ranks)
    levels = {r: i for i, r in enumerate(sorted(set(ranks)))}
    return tuple(levels[r] for r in ranks)


def parse_candidate_set(record: Any, *, path: str | None = None, line: int | None = None) -> CandidateSet:
    def error(field_name: str | None, message: str) -> DataError:
        return DataError(message, path=path, line=line, field=field_name)

    if not isinstance(record, dict):
        raise error(None, f"expected a JSON object, got {type(record).__name__}")
    for key in record:
        if key not in FIELDS:
            close = closest_names(key, FIELDS)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known fields: {', '.join(FIELDS)})"
            raise error(str(key), f"unknown field{hint}")

    for key, value in record.items():
        if _deeper_than(value, MAX_DEPTH - 1):
            raise error(key, f"nested deeper than {MAX_DEPTH} levels")

    prompt = record.get("prompt")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise error("prompt", "empty text")
    elif isinstance(prompt, list) and prompt:
        for i, message in enumerate(prompt):
            if not isinstance(message, dict) or set(message) != {"role", "content"}:
                raise error(f"prompt[{i}]", "expected a message {\"role\": ..., \"content\": ...}")
            if message["role"] not in ROLES:
                raise error(f"prompt[{i}].role", f"unknown role {message['role']!r} (use {', '.join(ROLES)})")
            if not isinstance(message["content"], str):
                raise error(f"prompt[{i}].content", "expected text")
    else:
        raise error("prompt", "missing, or not text / a non-empty list of messages")

    responses = record.get("responses")
    if not isinstance(responses, list) or not MIN_RESPONSES <= len(responses) <= MAX_RESPONSES:
        raise error("responses", f"expected a list of {MIN_RESPONSES} to {MAX_RESPONSES} responses")
    for i, response in enumerate(responses):
        if not isinstance(response, str) or not response.strip():
            raise error(f"responses[{i}]", "empty or not text")

    gold_ranks = _parse_gold(record.get("gold"), len(responses), error)

    model_version = record.get("model_version")
    if model_version is not None and (not isinstance(model_version, str) or len(model_version) > MAX_ID):
        raise error("model_version", f"expected text of at most {MAX_ID} characters")
    external_id = record.get("id")
    if external_id is not None and (isinstance(external_id, bool) or not isinstance(external_id, (str, int))):
        raise error("id", "expected text or an integer")
    if isinstance(external_id, str) and (not external_id.strip() or len(external_id) > MAX_ID
                                         or external_id.startswith("#")):
        raise error("id", f"expected 1 to {MAX_ID} characters, not starting with '#' "
                          "(the export names items without an id '#<number>')")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise error("meta", "expected an object")
    return CandidateSet(prompt=prompt, responses=tuple(responses), gold_ranks=gold_ranks,
                        model_version=model_version,
                        external_id=None if external_id is None else str(external_id), meta=meta)


def _deeper_than(value: Any, limit: int) -> bool:
    """True when `value` nests lists/objects more than `limit` levels (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _parse_gold(gold: Any, count: int, error) -> tuple[int | None, ...] | None:
    if gold is None:
        return None
    if isinstance(gold, int) and not isinstance(gold, bool):
        if not 0 <= gold < count:
            raise error("gold", f"index {gold} out of range for {count} responses")
        # Only "gold is best" is known; the order among the others is not.
        return tuple(0 if i == gold else None for i in range(count))
    if isinstance(gold, list) and len(gold) == count and all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in gold):
        return dense_ranks(gold)
    raise error("gold", f"expected the index of the best response or {count} ranks (0 = best)")


def parse_jsonl_lines(lines: Iterable[str], *, path: str) -> list[CandidateSet]:
    """Every record of a JSONL text; the first bad line raises a DataError naming it."""
    records = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        records.append(parse_candidate_set(_parse_json(text, path, number), path=path, line=number))
    if not records:
        raise DataError("no records", path=path)
    check_unique_ids(((c.external_id, n) for n, c in enumerate(records, start=1)), path=path)
    return records


def _parse_json(text: str, path: str, number: int) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", path=path, line=number) from None
    except RecursionError:  # the C parser gives up past Python's recursion limit (~1000 levels)
        raise DataError(f"JSON nested deeper than {MAX_DEPTH} levels", path=path, line=number) from None


def _decode_line(raw: bytes, path: str, number: int) -> str:
    """One line of the file as text; a file that is not UTF-8 is named with the encoding to use."""
    if number == 1:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            raise DataError("the file is UTF-16 or UTF-32 (it starts with a byte-order mark); save it as UTF-8",
                            path=path, line=number)
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is harmless
    if b"\x00" in raw:
        raise DataError("NUL bytes: the file looks like UTF-16 or UTF-32; save it as UTF-8", path=path, line=number)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); "
                        "save the file as UTF-8", path=path, line=number) from None


def iter_candidate_sets(stream: BinaryIO, *, path: str) -> Iterator[tuple[int, CandidateSet]]:
    """(line number, record) for every non-blank line of a binary JSONL stream, read one line
    at a time (bounded memory); the first bad line raises a DataError naming it."""
    for number, raw in enumerate(stream, start=1):
        text = _decode_line(raw, path, number)
        if text.strip():
            yield number, parse_candidate_set(_parse_json(text, path, number), path=path, line=number)


def check_unique_ids(ids: Iterable[tuple[str | None, int]], *, path: str) -> set[str]:
    """The set of ids given as (id or None, line); a repeated id raises naming both lines."""
    seen: dict[str, int] = {}
    for external_id, number in ids:
        if external_id is None:
            continue
        if external_id in seen:
            raise DataError(f"duplicate id {external_id!r} (line {seen[external_id]} has it too)",
                            path=path, line=number, field="id")
        seen[external_id] = number
    return set(seen)


def read_stream(stream: BinaryIO, *, path: str) -> list[tuple[int, CandidateSet]]:
    """(line, record) for the records of a binary JSONL stream (a file, an upload), ids unique within it."""
    numbered = list(iter_candidate_sets(stream, path=path))
    if not numbered:
        raise DataError("no records", path=path)
    check_unique_ids(((c.external_id, n) for n, c in numbered), path=path)
    return numbered


def read_numbered_file(path: str | Path) -> tuple[list[int], list[CandidateSet]]:
    """(line numbers, records) of a JSONL file, read one line at a time, ids unique within it."""
    p = Path(path)
    if not p.is_file():
        raise DataError("no such file", path=str(p))
    with open(p, "rb") as f:
        numbered = read_stream(f, path=str(p))
    return [n for n, _ in numbered], [c for _, c in numbered]


def read_candidate_sets(path: str | Path) -> list[CandidateSet]:
    """The records of a JSONL file."""
    return read_numbered_file(path)[1]
