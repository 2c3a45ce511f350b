"""The judge's files: the records it reads (pairs to label, prompts to revise) and the JSONL it
writes (preference pairs in the layout `rlhfkit.data.readers.read_preferences` reads)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import _conversation, _text, iter_records
from rlhfkit.data.schemas import Conversation, PreferencePair, conversation_to_dicts
from rlhfkit.feedback.export import to_jsonl
from rlhfkit.io import atomic_write_text

PAIR_FIELDS = ("prompt", "response_a", "response_b")


def read_judge_items(path: str | Path) -> list[dict[str, Any]]:
    """Records with `prompt` (text or messages), `response_a` and `response_b` (text); other
    fields are kept and copied to the output. Errors name file, line and field."""
    items = []
    for rec, where in iter_records(path):
        if "prompt" not in rec:
            raise where.error("prompt", "missing (a judge record needs prompt, response_a, response_b)")
        _conversation(rec["prompt"], "prompt", where)
        for key in ("response_a", "response_b"):
            _text(rec, key, where, allow_empty=True)
        items.append(rec)
    if not items:
        raise DataError("no records", path=str(path))
    return items


def read_constitutional_items(path: str | Path) -> tuple[list[dict[str, Any]], list[Conversation]]:
    """(records, their prompts as conversations): `prompt` per record, optionally `response`
    (the answer to revise) and `response_a`/`response_b` (a pair to label, both or neither)."""
    records, convs = [], []
    for rec, where in iter_records(path):
        if "prompt" not in rec:
            raise where.error("prompt", "missing")
        convs.append(_conversation(rec["prompt"], "prompt", where))
        for key in ("response", "response_a", "response_b"):
            if key in rec:
                _text(rec, key, where, allow_empty=True)
        if ("response_a" in rec) != ("response_b" in rec):
            raise where.error("response_b" if "response_a" in rec else "response_a",
                              "give both response_a and response_b, or neither")
        records.append(rec)
    if not records:
        raise DataError("no records", path=str(path))
    return records, convs


def prompt_field(prompt: Conversation) -> Any:
    """A single user turn is written as plain text, anything else as a message list."""
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return conversation_to_dicts(prompt)


def preference_record(pair: PreferencePair) -> dict[str, Any]:
    """The JSONL layout `rlhfkit.data.readers.read_preferences` reads, provenance included."""
    return {"prompt": prompt_field(pair.prompt), "chosen": pair.chosen, "rejected": pair.rejected,
            "label": pair.label, **pair.provenance.to_dict(), **pair.meta}


def labeled_records(records: list[dict[str, Any]], pairs: list[PreferencePair]) -> list[dict[str, Any]]:
    """The judge's `pairs` as preference records, each keeping its input record's other fields
    and its prompt as the user wrote it."""
    rows = []
    for rec, pair in zip(records, pairs):
        row = preference_record(pair)
        row["prompt"] = rec["prompt"]  # as the user wrote it
        rows.append({**{k: v for k, v in rec.items() if k not in PAIR_FIELDS}, **row})
    return rows


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """One JSON object per line (UTF-8 kept as is), written atomically."""
    atomic_write_text(Path(path), to_jsonl(rows))
