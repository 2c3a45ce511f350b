"""What the admin dashboard shows: progress, agreement, gold accuracy and outliers.

Agreement is measured on *comparisons*, so pairwise items and rankings count alike: a vote
on an item with K candidates answers the K(K−1)/2 questions "how does candidate i compare
with candidate j?" (i < j, imported order), each with one of the nominal categories
"first" (i better), "second" (j better), "tie", or, for pairwise items, "both_bad".
A unit of the agreement table is one (item, i, j).

Outlier rule (`agreement.flag_low`): an annotator is flagged when their agreement with the
others' majority, or their gold accuracy, is more than 0.25 below the median of all
annotators on that measure, counting only annotators with at least 3 units for it.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhfkit.feedback import agreement
from rlhfkit.feedback.models import ANNOTATOR, PAIRWISE, Item, Project, Round, User, Vote, published

OUTLIER_GAP = 0.25
OUTLIER_MIN_COUNT = 3


def comparison_labels(ranks: list[int], both_bad: bool, pairwise: bool) -> dict[tuple[int, int], str]:
    """{(i, j): category} for every i < j of one vote."""
    labels = {}
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if pairwise and both_bad:
                labels[(i, j)] = "both_bad"
            elif ranks[i] < ranks[j]:
                labels[(i, j)] = "first"
            elif ranks[i] > ranks[j]:
                labels[(i, j)] = "second"
            else:
                labels[(i, j)] = "tie"
    return labels


def gold_score(ranks: list[int], gold_ranks: list[int | None]) -> float:
    """Share of the comparisons the gold answer specifies that the vote orders the same way
    (better, worse or tie). Pairwise: 1.0 or 0.0.

    A None gold rank means "not the known best": worse than any ranked response, unordered
    among the other Nones. So gold "response 1 is best" over 3 responses, (None, 0, None),
    specifies the comparisons (0, 1) and (1, 2) only.
    """
    def sign(x: float) -> int:
        return (x > 0) - (x < 0)

    def level(rank: int | None) -> float:
        return math.inf if rank is None else rank

    checked = agreed = 0
    for i in range(len(ranks)):
        for j in range(i + 1, len(ranks)):
            if gold_ranks[i] is None and gold_ranks[j] is None:
                continue
            checked += 1
            agreed += sign(ranks[i] - ranks[j]) == sign(level(gold_ranks[i]) - level(gold_ranks[j]))
    return agreed / checked if checked else math.nan


@dataclass(frozen=True)
class RoundProgress:
    number: int
    model_version: str | None
    items: int
    gold_items: int
    votes: int
    target_votes: int
    complete_items: int

    @property
    def fraction(self) -> float:
        return min(1.0, self.votes / self.target_votes) if self.target_votes else 0.0


@dataclass(frozen=True)
class AnnotatorQuality:
    username: str
    votes: int
    last_vote: datetime | None
    gold_accuracy: float
    gold_votes: int
    majority_agreement: float
    majority_units: int
    flags: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return bool(self.flags)


@dataclass(frozen=True)
class AgreementSummary:
    units: int
    ratings: int
    percent_agreement: float
    cohen_kappa_mean: float
    fleiss_kappa: float
    krippendorff_alpha: float


@dataclass(frozen=True)
class ProjectReport:
    project: str
    overlap: int
    round_number: int | None
    rounds: tuple[RoundProgress, ...]
    annotators: tuple[AnnotatorQuality, ...]
    agreement: AgreementSummary


def round_progress(session: Session, project: Project, annotator_count: int) -> list[RoundProgress]:
    per_item_target = min(project.overlap, annotator_count)
    votes_per_item = Counter(session.scalars(select(Vote.item_id).where(Vote.project_id == project.id)))
    progress = []
    for rnd in session.scalars(select(Round).where(Round.project_id == project.id, published()).order_by(Round.number)):
        items = session.execute(select(Item.id, Item.gold_ranks).where(Item.round_id == rnd.id)).all()
        targets = {item_id: (annotator_count if gold is not None else per_item_target) for item_id, gold in items}
        progress.append(RoundProgress(
            number=rnd.number, model_version=rnd.model_version, items=len(items),
            gold_items=sum(gold is not None for _, gold in items),
            votes=sum(votes_per_item[i] for i in targets),
            target_votes=sum(targets.values()),
            complete_items=sum(1 for i, t in targets.items() if t and votes_per_item[i] >= t),
        ))
    return progress


def agreement_table(votes: list[tuple[Vote, Item, str]]) -> dict:
    """table[(item_id, i, j)][username] = category."""
    table: dict = defaultdict(dict)
    for vote, item, username in votes:
        for (i, j), label in comparison_labels(vote.ranks, vote.both_bad, item.kind == PAIRWISE).items():
            table[(item.id, i, j)][username] = label
    return dict(table)


def summarize_agreement(table: dict) -> AgreementSummary:
    return AgreementSummary(
        units=sum(1 for ratings in table.values() if len(ratings) >= 2),
        ratings=sum(len(ratings) for ratings in table.values() if len(ratings) >= 2),
        percent_agreement=agreement.percent_agreement(table),
        cohen_kappa_mean=agreement.mean_cohen_kappa(table),
        fleiss_kappa=agreement.fleiss_kappa(table),
        krippendorff_alpha=agreement.krippendorff_alpha_nominal(table),
    )


def project_report(session: Session, project: Project, round_number: int | None = None) -> ProjectReport:
    """Everything the dashboard shows for `project`, over all rounds or over one."""
    annotators = list(session.scalars(select(User).where(User.role == ANNOTATOR, User.active)
                                      .order_by(User.username)))
    query = (select(Vote, Item, User.username).join(Item, Vote.item_id == Item.id)
             .join(User, Vote.user_id == User.id).where(Vote.project_id == project.id))
    if round_number is not None:
        query = query.join(Round, Item.round_id == Round.id).where(Round.number == round_number)
    votes = [tuple(row) for row in session.execute(query).all()]

    table = agreement_table(votes)
    majority = agreement.majority_agreement(table)
    gold: dict[str, list[float]] = defaultdict(list)
    counts: Counter = Counter()
    last_vote: dict[str, datetime] = {}
    for vote, item, username in votes:
        counts[username] += 1
        last_vote[username] = max(last_vote.get(username, vote.updated_at), vote.updated_at)
        if item.gold_ranks is not None:
            score = gold_score(vote.ranks, item.gold_ranks)
            if not math.isnan(score):
                gold[username].append(score)
    gold_scores = {u: (sum(s) / len(s), len(s)) for u, s in gold.items()}
    low_majority = agreement.flag_low(majority, gap=OUTLIER_GAP, min_count=OUTLIER_MIN_COUNT)
    low_gold = agreement.flag_low(gold_scores, gap=OUTLIER_GAP, min_count=OUTLIER_MIN_COUNT)

    names = [u.username for u in annotators] + sorted(set(counts) - {u.username for u in annotators})
    qualities = []
    for name in names:
        flags = []
        if name in low_majority:
            flags.append("agreement with the majority far below the others")
        if name in low_gold:
            flags.append("gold accuracy far below the others")
        gold_accuracy, gold_votes = gold_scores.get(name, (math.nan, 0))
        majority_rate, majority_units = majority.get(name, (math.nan, 0))
        qualities.append(AnnotatorQuality(
            username=name, votes=counts[name], last_vote=last_vote.get(name),
            gold_accuracy=gold_accuracy, gold_votes=gold_votes,
            majority_agreement=majority_rate, majority_units=majority_units, flags=tuple(flags),
        ))
    return ProjectReport(
        project=project.name, overlap=project.overlap, round_number=round_number,
        rounds=tuple(round_progress(session, project, len(annotators))),
        annotators=tuple(qualities), agreement=summarize_agreement(table),
    )


def flagged_annotators(session: Session, project: Project) -> set[str]:
    return {a.username for a in project_report(session, project).annotators if a.flagged}
