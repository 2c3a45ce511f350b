"""Readers for the formats users already have: JSONL, Parquet, `datasets` folders, hub ids.

Accepted record layouts (TRL's standard and conversational ones work unchanged):

| kind | fields |
|---|---|
| SFT | `prompt` + `completion` (or `response`); or `messages` (the last assistant turn is the target) |
| preference | `prompt` + `chosen` + `rejected`; or only `chosen`/`rejected` conversations sharing a prompt prefix |
| ranking | `prompt` + `responses` + `ranks` (0 = best, equal = tie) |
| unpaired | `prompt` + `completion` + `label` (true = desirable) |

Text fields are strings or lists of `{"role", "content"}` messages. Preference, ranking
and unpaired records may carry `annotator`, `source`, `rationale`, `round`,
`model_version`; pairs may carry `label` (P(chosen ≻ rejected), 0.5 = tie), `margin`,
`both_bad`. Every bad record is reported as `file:line: field 'x': problem`, all of them
at once (up to 20), before any training starts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.data.preference import ranking_to_pairs
from rlhfkit.data.schemas import (
    ROLES,
    Conversation,
    Message,
    PreferencePair,
    Provenance,
    Ranking,
    SFTExample,
    UnpairedFeedback,
)

MAX_REPORTED_ERRORS = 20


@dataclass(frozen=True)
class Where:
    path: str
    line: int | None

    def error(self, field: str | None, message: str) -> DataError:
        return DataError(message, path=self.path, line=self.line, field=field)


def iter_records(source: str | Path, split: str = "train", *,
                 errors: list[DataError] | None = None) -> Iterator[tuple[dict[str, Any], Where]]:
    """Yield (record, where) from a .jsonl/.json/.parquet file, a `datasets` folder or a hub id.

    With `errors`, lines that are not JSON objects are appended there and skipped, so the
    caller can report them together with its own field errors; without it they raise.
    """
    p = Path(source)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _iter_jsonl(p, errors)
        elif suffix == ".json":
            yield from _iter_json(p, errors)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq  # noqa: PLC0415 — 0.3 s to import, only for .parquet files

            for i, row in enumerate(pq.read_table(p).to_pylist()):
                yield row, Where(str(p), i + 1)
        else:
            raise DataError(f"unknown file type '{suffix}' (use .jsonl, .json or .parquet)", path=str(p))
        return
    if p.is_dir():
        ds = _load_dataset_dir(p, split)
        for i, row in enumerate(ds):
            yield dict(row), Where(f"{p}[{split}]", i + 1)
        return
    if looks_like_hub_id(str(source)):
        from datasets import load_dataset  # noqa: PLC0415 — 1.4 s to import, only for hub ids

        try:
            ds = load_dataset(str(source), split=split)
        except Exception as e:  # offline, unknown id, ...
            raise DataError(f"cannot load dataset '{source}' from the hub: {e}", path=str(source)) from None
        for i, row in enumerate(ds):
            yield dict(row), Where(f"{source}[{split}]", i + 1)
        return
    raise DataError("no such file or folder", path=str(source))


_FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


def looks_like_hub_id(source: str) -> bool:
    """Whether `source` reads as a hub id `owner/name` rather than a local path.

    A mistyped relative path such as `data/sft.jsonl` must be reported as a missing file, not
    sent to the hub (where it fails only after minutes of retries offline)."""
    return (source.count("/") == 1 and not source.startswith((".", "/", "~"))
            and not source.lower().endswith(_FILE_SUFFIXES))


def _iter_json(p: Path, errors: list[DataError] | None) -> Iterator[tuple[dict[str, Any], Where]]:
    """A JSON list of records, `{"data": [...]}`, one JSON object, or JSON Lines named .json."""
    text = p.read_text(encoding="utf-8")
    if not text.strip():
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if _first_line_is_json(text):  # JSON Lines: report bad lines one by one
            yield from _iter_jsonl(p, errors)
            return
        raise DataError(f"not valid JSON: {e.msg}", path=str(p), line=e.lineno) from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        rows = data["data"]
    elif isinstance(data, dict):
        rows = [data]
    elif isinstance(data, list):
        rows = data
    else:
        raise DataError("expected a JSON list of records (or JSON Lines)", path=str(p))
    # `line` is the record's position in the list here: a pretty-printed record spans lines.
    for i, row in enumerate(rows):
        record = _as_record(row, Where(str(p), i + 1), errors)
        if record is not None:
            yield record


def _first_line_is_json(text: str) -> bool:
    first = next(line for line in text.splitlines() if line.strip())
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return False
    return True


def _as_record(row: Any, where: Where, errors: list[DataError] | None) -> tuple[dict[str, Any], Where] | None:
    if not isinstance(row, dict):
        err = where.error(None, f"expected a JSON object, got {type(row).__name__}")
        if errors is None:
            raise err
        errors.append(err)
        return None
    return row, where


def _iter_jsonl(p: Path, errors: list[DataError] | None) -> Iterator[tuple[dict[str, Any], Where]]:
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                err = DataError(f"not valid JSON ({e.msg} at column {e.colno})", path=str(p), line=n)
                if errors is None:
                    raise err from None
                errors.append(err)
                continue
            record = _as_record(row, Where(str(p), n), errors)
            if record is not None:
                yield record


def _load_dataset_dir(p: Path, split: str):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk  # noqa: PLC0415 — 1.4 s to import

    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise DataError(f"split '{split}' not found; available: {', '.join(ds)}", path=str(p))
            ds = ds[split]
        assert isinstance(ds, Dataset)
        return ds
    try:
        return load_dataset(str(p), split=split)
    except Exception as e:
        raise DataError(f"not a readable dataset folder: {e}", path=str(p)) from None


# ---------------------------------------------------------------------------- fields


def _text(rec: dict, key: str, where: Where, *, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise where.error(key, "missing")
    v = rec[key]
    if isinstance(v, list):  # conversational completion: [{"role": "assistant", "content": ...}]
        conv = _conversation(v, key, where)
        v = "".join(m.content for m in conv if m.role == "assistant") if any(
            m.role == "assistant" for m in conv) else conv[-1].content
    if not isinstance(v, str):
        raise where.error(key, f"expected text, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise where.error(key, "empty text")
    return v


def _conversation(v: Any, key: str, where: Where) -> Conversation:
    if isinstance(v, str):
        if not v.strip():
            raise where.error(key, "empty text")
        return (Message("user", v),)
    if not isinstance(v, list) or not v:
        raise where.error(key, "expected text or a non-empty list of {role, content} messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise where.error(f"{key}[{i}]", "expected a message with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise where.error(f"{key}[{i}].role", f"unknown role '{m['role']}' (use {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise where.error(f"{key}[{i}].content", "expected text")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def _provenance(rec: dict, where: Where, default_source: str = "unknown") -> Provenance:
    rnd = rec.get("round")
    if rnd is not None and not isinstance(rnd, int):
        raise where.error("round", f"expected an integer, got {rnd!r}")
    return Provenance(annotator=_opt_str(rec, "annotator", where), source=rec.get("source") or default_source,
                      rationale=_opt_str(rec, "rationale", where), round=rnd,
                      model_version=_opt_str(rec, "model_version", where))


def _opt_str(rec: dict, key: str, where: Where) -> str | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, (str, int)):
        raise where.error(key, f"expected text, got {type(v).__name__}")
    return str(v)


def _opt_float(rec: dict, key: str, where: Where, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise where.error(key, f"expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


_META_SKIP = {"prompt", "completion", "response", "messages", "chosen", "rejected", "label", "margin",
              "both_bad", "annotator", "source", "rationale", "round", "model_version", "responses", "ranks"}


def _meta(rec: dict) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in _META_SKIP}


# ---------------------------------------------------------------------------- parsers


def parse_sft(rec: dict, where: Where) -> SFTExample:
    if "messages" in rec:
        conv = _conversation(rec["messages"], "messages", where)
        if conv[-1].role != "assistant":
            raise where.error("messages", "the last message must be the assistant's response")
        if not conv[-1].content.strip():
            raise where.error(f"messages[{len(conv) - 1}].content", "empty response")
        if len(conv) < 2:
            raise where.error("messages", "needs at least one turn before the assistant's response")
        return SFTExample(conv[:-1], conv[-1].content, _meta(rec))
    if "prompt" not in rec:
        raise where.error("prompt", "missing (an SFT record needs 'prompt' + 'completion', or 'messages')")
    key = "response" if "response" in rec and "completion" not in rec else "completion"
    return SFTExample(_conversation(rec["prompt"], "prompt", where), _text(rec, key, where), _meta(rec))


def _split_implicit_prompt(chosen: Conversation, rejected: Conversation, where: Where):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or chosen[n].role != "assistant" or rejected[n].role != "assistant":
        raise where.error("chosen", "without 'prompt', chosen and rejected must be conversations that "
                                    "share the prompt turns and end with different assistant turns")
    return chosen[:n], chosen[n].content, rejected[n].content


def parse_preference(rec: dict, where: Where) -> PreferencePair:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise where.error(key, "missing (a preference record needs 'chosen' and 'rejected')")
    if "prompt" in rec:
        prompt = _conversation(rec["prompt"], "prompt", where)
        chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
    else:
        prompt, chosen, rejected = _split_implicit_prompt(
            _conversation(rec["chosen"], "chosen", where), _conversation(rec["rejected"], "rejected", where), where)
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise where.error(key, "empty text")
    label = _opt_float(rec, "label", where, 0.0, 1.0)
    both_bad = rec.get("both_bad", False)
    if not isinstance(both_bad, bool):
        raise where.error("both_bad", f"expected true or false, got {both_bad!r}")
    return PreferencePair(prompt, chosen, rejected, label=1.0 if label is None else label,
                          margin=_opt_float(rec, "margin", where), both_bad=both_bad,
                          provenance=_provenance(rec, where), meta=_meta(rec))


def parse_ranking(rec: dict, where: Where) -> Ranking:
    prompt = _conversation(rec.get("prompt"), "prompt", where) if "prompt" in rec else None
    if prompt is None:
        raise where.error("prompt", "missing")
    responses, ranks = rec.get("responses"), rec.get("ranks")
    if not isinstance(responses, list) or len(responses) < 2:
        raise where.error("responses", "expected a list of at least 2 responses")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise where.error("ranks", f"expected {len(responses)} integer ranks, one per response")
    for i, (resp, rank) in enumerate(zip(responses, ranks)):
        if not isinstance(resp, str) or not resp.strip():
            raise where.error(f"responses[{i}]", "empty or not text")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise where.error(f"ranks[{i}]", f"expected an integer ≥ 0, got {rank!r}")
    both_bad = rec.get("both_bad", False)
    if not isinstance(both_bad, bool):  # bool("false") would be True
        raise where.error("both_bad", f"expected true or false, got {both_bad!r}")
    return Ranking(prompt, tuple(responses), tuple(ranks), both_bad=both_bad,
                   provenance=_provenance(rec, where), meta=_meta(rec))


def parse_unpaired(rec: dict, where: Where) -> UnpairedFeedback:
    prompt = _conversation(rec["prompt"], "prompt", where) if "prompt" in rec else None
    if prompt is None:
        raise where.error("prompt", "missing")
    key = "response" if "response" in rec and "completion" not in rec else "completion"
    label = rec.get("label")
    if not isinstance(label, bool):
        raise where.error("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    return UnpairedFeedback(prompt, _text(rec, key, where), label, _provenance(rec, where), _meta(rec))


def _collect(source, split, parse):
    out: list = []
    errors: list[DataError] = []  # iter_records adds unreadable lines here, in file order
    for rec, where in iter_records(source, split, errors=errors):
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
        try:
            out.append(parse(rec, where))
        except DataError as e:
            errors.append(e)
    errors = errors[:MAX_REPORTED_ERRORS]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        lines = "\n  ".join(str(e) for e in errors)
        more = f" (first {MAX_REPORTED_ERRORS} shown)" if len(errors) >= MAX_REPORTED_ERRORS else ""
        err = DataError(f"{len(errors)} bad records{more}:\n  {lines}", path=errors[0].path)
        err.errors = errors
        raise err
    if not out:
        raise DataError("no records", path=str(source))
    return out


def read_sft(source: str | Path, split: str = "train") -> list[SFTExample]:
    return _collect(source, split, parse_sft)


def read_preferences(source: str | Path, split: str = "train") -> list[PreferencePair]:
    """Pairs, with ranking records (`responses` + `ranks`) expanded to pairs (ties kept, label 0.5)."""
    def parse(rec, where):
        return [parse_ranking(rec, where)] if "responses" in rec else [parse_preference(rec, where)]

    pairs: list[PreferencePair] = []
    for item in _collect(source, split, parse):
        rec = item[0]
        pairs.extend(ranking_to_pairs(rec) if isinstance(rec, Ranking) else [rec])
    return pairs


def read_unpaired(source: str | Path, split: str = "train") -> list[UnpairedFeedback]:
    return _collect(source, split, parse_unpaired)


def holds_unpaired(source: str | Path) -> bool:
    """True when the first record is unpaired feedback (one completion + label, no chosen)."""
    for record, _ in iter_records(source, errors=[]):
        return ("chosen" not in record and "responses" not in record
                and ("completion" in record or "response" in record))
    return False
