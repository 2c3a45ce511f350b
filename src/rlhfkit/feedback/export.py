"""Votes out as training data: JSONL that `rlhfkit.data.readers` reads directly.

Three formats, every record with its provenance (annotator, source "human", rationale,
round, model version) and `item_id` / `item_meta` / `project` (kept by the readers in `meta`).
`item_id` names one item of the project: the imported `id` (unique per project since imports
refuse repeats), `#<row id>` for an item imported without one, and `<id>#<row id>` for an id
that a database from before that check holds on several items. `item_meta` is the item's
imported `meta` object:

- "pairs": one preference pair per vote and per pair of candidates
  `{"prompt", "chosen", "rejected", "label", "margin", "both_bad", ...provenance}`;
  label is P(chosen ≻ rejected): 1.0 for a preference, 0.5 for a tie or both bad; margin
  is the annotator's strength (1–3) or null. A ranking of K gives K(K−1)/2 pairs.
- "rankings": one record per vote `{"prompt", "responses", "ranks", "both_bad", ...}`,
  ranks over the imported response order (0 = best, equal = tie).
- "soft": the pairs of all annotators pooled into one pair per comparison, label = the
  mean vote (`rlhfkit.data.preference.pool_soft_labels`); `annotator` lists the voters.

The prompt is written as it was imported (a string or a list of messages).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.data.errors import SkipReport
from rlhfkit.data.preference import pool_soft_labels, ranking_to_pairs
from rlhfkit.data.schemas import PreferencePair, Provenance, Ranking, as_conversation
from rlhfkit.feedback.models import PAIRWISE, Item, Project, Round, User, Vote, VoteHistory, published

FORMATS = ("pairs", "rankings", "soft")


@dataclasses.dataclass(frozen=True)
class _PastVote:
    """A version of a vote from `vote_history`, with the fields an export reads."""

    id: int
    ranks: list[int]
    both_bad: bool
    strength: int | None
    rationale: str | None


def _vote_rows(session: Session, project: Project, rounds: Collection[int] | None, include_gold: bool,
               as_of: datetime | None) -> list[tuple[Any, Item, int, str]]:
    """(vote, item, round number, username) for every vote of `project`: the votes as they
    are now, or as they stood at `as_of` (the versions that held then, edited or undone
    since included)."""
    def query(model):
        q = (select(model, Item, Round.number, User.username)
             .join(Item, model.item_id == Item.id).join(Round, Item.round_id == Round.id)
             .join(User, model.user_id == User.id).where(model.project_id == project.id, published())
             .order_by(Round.number, Item.position, User.username))
        q = q.where(Round.number.in_(list(rounds))) if rounds else q
        return q if include_gold else q.where(Item.gold_ranks.is_(None))

    if as_of is None:
        return list(session.execute(query(Vote)).all())
    rows = list(session.execute(query(Vote).where(Vote.updated_at <= as_of)).all())
    past = query(VoteHistory).where(VoteHistory.valid_from <= as_of, VoteHistory.replaced_at > as_of)
    rows += [(_PastVote(v.vote_id, v.ranks, v.both_bad, v.strength, v.rationale), item, number, name)
             for v, item, number, name in session.execute(past).all()]
    return sorted(rows, key=lambda row: (row[2], row[1].position, row[3]))


def _vote_rankings(session: Session, project: Project, rounds: Collection[int] | None,
                   exclude_annotators: Collection[str], include_gold: bool, as_of: datetime | None = None,
                   ) -> list[tuple[Ranking, Vote, Item]]:
    out = []
    for vote, item, round_number, username in _vote_rows(session, project, rounds, include_gold, as_of):
        if username in exclude_annotators:
            continue
        ranking = Ranking(
            prompt=as_conversation(item.prompt), responses=tuple(item.responses),
            ranks=tuple(vote.ranks), both_bad=vote.both_bad,
            provenance=Provenance(annotator=username, source="human", rationale=vote.rationale,
                                  round=round_number, model_version=item.model_version),
            meta={"item": item.id, "vote": vote.id},
        )
        out.append((ranking, vote, item))
    return out


def item_key(item: Item) -> str:
    """The export's `item_id`: unique within the project (a unique index on the imported ids,
    which cannot start with '#')."""
    return f"#{item.id}" if item.external_id is None else item.external_id


def _item_fields(item: Item, project: Project) -> dict[str, Any]:
    return {"item_id": item_key(item), "item_meta": item.meta or {}, "project": project.name}


def _provenance_fields(p: Provenance) -> dict[str, Any]:
    return {"annotator": p.annotator, "source": p.source, "rationale": p.rationale,
            "round": p.round, "model_version": p.model_version}


def _pair_record(pair: PreferencePair, item: Item, project: Project) -> dict[str, Any]:
    return {"prompt": item.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
            "label": pair.label, "margin": pair.margin, "both_bad": pair.both_bad,
            **_provenance_fields(pair.provenance), **_item_fields(item, project),
            "vote_id": pair.meta["vote"]}


def _vote_pairs(ranking: Ranking, vote: Vote, item: Item, skips: SkipReport | None) -> list[PreferencePair]:
    pairs = ranking_to_pairs(ranking, include_ties=True, skips=skips)
    if item.kind == PAIRWISE and vote.strength is not None:
        pairs = [dataclasses.replace(p, margin=float(vote.strength)) for p in pairs]
    return pairs


def export_records(session: Session, project: Project, *, format: str = "pairs",
                   rounds: Collection[int] | None = None, exclude_annotators: Collection[str] = (),
                   include_gold: bool = True, skips: SkipReport | None = None,
                   as_of: datetime | None = None) -> list[dict[str, Any]]:
    """The JSON records of `project`'s votes in `format` ("pairs", "rankings" or "soft"): the
    latest votes, or the votes as they stood at `as_of` (UTC; see `vote_history`).

    `rounds` limits to those round numbers; `exclude_annotators` drops those usernames'
    votes (e.g. flagged outliers); pairs of identical responses carry no signal and are
    counted in `skips` instead of written.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r} (use {', '.join(FORMATS)})")
    votes = _vote_rankings(session, project, rounds, set(exclude_annotators), include_gold, as_of)
    if format == "rankings":
        return [{"prompt": item.prompt, "responses": list(r.responses), "ranks": list(r.ranks),
                 "both_bad": r.both_bad, **_provenance_fields(r.provenance), **_item_fields(item, project),
                 "vote_id": vote.id}
                for r, vote, item in votes]

    items = {item.id: item for _r, _v, item in votes}
    pairs = [pair for r, vote, item in votes for pair in _vote_pairs(r, vote, item, skips)]
    if format == "pairs":
        return [_pair_record(p, items[p.meta["item"]], project) for p in pairs]

    records = []
    for pooled in pool_soft_labels(pairs):
        voters = sorted({v["annotator"] for v in pooled.meta["provenance"]})
        record = _pair_record(pooled, items[pooled.meta["item"]], project)
        record.update(annotator=",".join(voters), source="human", num_votes=pooled.meta["num_votes"])
        record.pop("vote_id")  # pooled over several votes: the ids are in the pairs export
        records.append(record)
    return records


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write one JSON object per line (UTF-8); returns the number written."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


def to_jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
