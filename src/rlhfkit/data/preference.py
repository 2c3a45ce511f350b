"""Preference data utilities: rankings → pairs, pooling votes into soft labels, splitting by
prompt, de-duplication, and pairs → unpaired feedback.

All functions work on the records of `rlhfkit.data.schemas` and never mutate them; they
return new records. Nothing is dropped silently: what a function leaves out is counted,
either in its return value or in an optional `SkipReport`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.schemas import (
    Conversation,
    PreferencePair,
    Provenance,
    Ranking,
    UnpairedFeedback,
    prompt_text,
)

TIE_LABEL = 0.5

Record = TypeVar("Record")


def _where(meta: dict[str, Any]) -> dict[str, Any]:
    """File and line of a record, when its reader stored them in `meta` ("path", "line")."""
    return {"path": meta.get("path"), "line": meta.get("line")}


# --------------------------------------------------------------------------- rankings

def ranking_to_pairs(ranking: Ranking, include_ties: bool = True,
                     skips: SkipReport | None = None) -> list[PreferencePair]:
    """Every pair of a K-way ranking: K·(K−1)/2 pairs, in index order (i < j).

    ranks[i] < ranks[j] makes responses[i] chosen with label 1.0 (and the reverse when
    ranks[j] < ranks[i]). Equal ranks make a tie pair with label 0.5, oriented by index, kept
    unless `include_ties` is False. D > C > A = B over [A, B, C, D] gives C≻A, D≻A, C≻B, D≻B,
    D≻C and the tie A=B. Each pair carries the ranking's provenance, both_bad and meta, plus
    meta["ranking_indices"] = (chosen index, rejected index).

    Two identical response texts make a pair with no signal (every loss sees a log-ratio
    difference of exactly 0), so such pairs are left out and counted in `skips` under
    "identical responses" (sampling often repeats a response).
    """
    if len(ranking.responses) != len(ranking.ranks):
        raise DataError(f"{len(ranking.responses)} responses but {len(ranking.ranks)} ranks",
                        field="ranks", **_where(ranking.meta))
    if len(ranking.responses) < 2:
        raise DataError("a ranking needs at least 2 responses", field="responses",
                        **_where(ranking.meta))
    for rank in ranking.ranks:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise DataError(f"ranks must be integers >= 0 (0 = best), got {rank!r}",
                            field="ranks", **_where(ranking.meta))
    pairs: list[PreferencePair] = []
    count = len(ranking.responses)
    for i in range(count):
        for j in range(i + 1, count):
            is_tie = ranking.ranks[i] == ranking.ranks[j]
            if is_tie and not include_ties:
                continue
            if ranking.responses[i] == ranking.responses[j]:
                if skips is not None:
                    skips.add("identical responses", ranking.meta.get("path"))
                continue
            chosen, rejected = (i, j) if ranking.ranks[i] <= ranking.ranks[j] else (j, i)
            pairs.append(PreferencePair(
                prompt=ranking.prompt,
                chosen=ranking.responses[chosen],
                rejected=ranking.responses[rejected],
                label=TIE_LABEL if is_tie else 1.0,
                both_bad=ranking.both_bad,
                provenance=ranking.provenance,
                meta={**ranking.meta, "ranking_indices": (chosen, rejected)},
            ))
    return pairs


# --------------------------------------------------------------------------- pooling votes

@dataclass
class _Votes:
    """The votes collected for one (prompt, unordered response pair)."""

    first: str            # the response that was `chosen` in the first vote seen
    second: str
    labels: list[float] = field(default_factory=list)          # P(first ≻ second) per vote
    signed_margins: list[float] = field(default_factory=list)  # + favours first
    both_bad_votes: int = 0
    provenances: list[Provenance] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


def _shared(values: Iterable[Any]) -> Any:
    """The common value, or None when the votes disagree."""
    distinct = set(values)
    return distinct.pop() if len(distinct) == 1 else None


def pool_soft_labels(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """Merge several annotators' votes on the same comparison into one soft-labelled pair.

    Votes are grouped by (prompt, unordered {response, response}). Each vote is turned into
    P(first ≻ second) (its label, or 1 − label when it lists the responses the other way
    round), so a tie counts 0.5; the pooled label is the mean. The pooled pair is oriented so
    that the response preferred on average is `chosen` (label ≥ 0.5); an exact 0.5 keeps the
    order of the first vote seen.

    margin: the mean over the votes that gave one, each signed by the direction of its own
    vote relative to the pooled orientation (a tie vote's margin counts 0); None when no
    vote gave a margin. both_bad: True when more than half of the votes said so.
    provenance: fields all votes agree on (else None; source "unknown").
    meta: the first vote's meta, plus meta["provenance"], the list of every vote's
    provenance as a dict, and meta["num_votes"].
    Pooled pairs come out in the order their first vote appeared.
    """
    groups: dict[tuple[Conversation, frozenset[str]], _Votes] = {}
    for pair in pairs:
        key = (pair.prompt, frozenset((pair.chosen, pair.rejected)))
        votes = groups.get(key)
        if votes is None:
            votes = groups[key] = _Votes(first=pair.chosen, second=pair.rejected,
                                         meta=dict(pair.meta))
        same_order = pair.chosen == votes.first
        first_preferred = pair.label if same_order else 1.0 - pair.label
        votes.labels.append(first_preferred)
        if pair.margin is not None:
            direction = (first_preferred > TIE_LABEL) - (first_preferred < TIE_LABEL)
            votes.signed_margins.append(direction * pair.margin)
        votes.both_bad_votes += int(pair.both_bad)
        votes.provenances.append(pair.provenance)

    pooled: list[PreferencePair] = []
    for (prompt, _), votes in groups.items():
        label = sum(votes.labels) / len(votes.labels)
        margin = (sum(votes.signed_margins) / len(votes.signed_margins)
                  if votes.signed_margins else None)
        chosen, rejected = votes.first, votes.second
        if label < TIE_LABEL:
            chosen, rejected, label = rejected, chosen, 1.0 - label
            margin = -margin if margin is not None else None
        provenance = Provenance(
            annotator=_shared(p.annotator for p in votes.provenances),
            source=_shared(p.source for p in votes.provenances) or "unknown",
            rationale=_shared(p.rationale for p in votes.provenances),
            round=_shared(p.round for p in votes.provenances),
            model_version=_shared(p.model_version for p in votes.provenances),
        )
        pooled.append(PreferencePair(
            prompt=prompt, chosen=chosen, rejected=rejected, label=label, margin=margin,
            both_bad=votes.both_bad_votes * 2 > len(votes.labels), provenance=provenance,
            meta={**votes.meta, "provenance": [p.to_dict() for p in votes.provenances],
                  "num_votes": len(votes.labels)},
        ))
    return pooled


# --------------------------------------------------------------------------- split, dedupe

def _prompt_fraction(prompt: Conversation, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, prompt text)."""
    digest = hashlib.sha256(f"{seed}\0{prompt_text(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_prompt(records: Sequence[Record], test_fraction: float, seed: int = 0
                    ) -> tuple[list[Record], list[Record]]:
    """(train, test): a record goes to test when a hash of (seed, its prompt text) falls
    below `test_fraction`, so every record of a prompt lands in the same split.

    The prompt text is the last user turn (`schemas.prompt_text`). The decision depends on
    the prompt alone, not on the other records, so a prompt stays in its split when more
    data is collected in a later round; the test share is therefore `test_fraction` only on
    average over prompts. Works for any record with a `.prompt`; order is kept.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    train: list[Record] = []
    test: list[Record] = []
    for record in records:
        in_test = _prompt_fraction(record.prompt, seed) < test_fraction
        (test if in_test else train).append(record)
    return train, test


def dedupe(records: Iterable[Record]) -> tuple[list[Record], int]:
    """(records without exact repeats, number removed), keeping the first occurrence.

    Two records are repeats when every field but `meta` is equal, provenance included: the
    same comparison labelled by two annotators is two votes (see `pool_soft_labels`), not a
    duplicate.
    """
    seen: set[Any] = set()
    kept: list[Record] = []
    removed = 0
    for record in records:
        if record in seen:
            removed += 1
            continue
        seen.add(record)
        kept.append(record)
    return kept, removed


# --------------------------------------------------------------------------- pairs → unpaired

def pairs_to_unpaired(pairs: Iterable[PreferencePair]
                      ) -> tuple[list[UnpairedFeedback], int]:
    """(unpaired feedback, number of ties skipped): each pair gives its preferred response as
    desirable and the other as undesirable, for KTO.

    The preferred response is `chosen` when label > 0.5 and `rejected` when label < 0.5.
    A tie says nothing about either response, so it is skipped and counted. A both_bad pair
    gives two undesirable records: the annotator rejected both. A response that is chosen in
    one pair and rejected in another (the middle of a ranking) yields one record of each;
    exact repeats can be collapsed with `dedupe`. Provenance and meta are carried, with
    meta["pair_role"] = "chosen" or "rejected".
    """
    feedback: list[UnpairedFeedback] = []
    ties = 0
    for pair in pairs:
        if pair.is_tie:
            ties += 1
            continue
        chosen_better = pair.label > TIE_LABEL
        for role, response, preferred in (("chosen", pair.chosen, chosen_better),
                                          ("rejected", pair.rejected, not chosen_better)):
            feedback.append(UnpairedFeedback(
                prompt=pair.prompt, response=response,
                desirable=preferred and not pair.both_bad,
                provenance=pair.provenance, meta={**pair.meta, "pair_role": role},
            ))
    return feedback, ties
