"""Feedback on a round's comparisons: exact checkers, a reward model, an LLM judge, or humans.

Each label record (labels.jsonl) is a preference pair the trainers read as it is:

    {"comparison", "task_id", "prompt", "chosen", "rejected", "label", "source", "annotator", "vote_id"?}

label 1.0 = chosen preferred, 0.5 = a tie (no preference; the trainers drop ties). Machine
sources are tried in the configured order for each pair, and the first one that decides it
labels it; a pair none decides is a tie. Humans label through the labeling app: the round's
pairs become a round of a project, and the step waits until every item has `overlap` votes.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from rlhfkit.data.schemas import as_conversation
from rlhfkit.feedback.agreement import fleiss_kappa, percent_agreement
from rlhfkit.feedback.db import open_database
from rlhfkit.feedback.export import export_records
from rlhfkit.feedback.models import Item, Round, Vote, published
from rlhfkit.feedback.projects import add_round, create_project, find_project
from rlhfkit.judge.loading import backend_from_spec
from rlhfkit.judge.pairwise import PairwiseJudge, label_pairs_with_judge
from rlhfkit.loop.config import LoopConfig, source_kind
from rlhfkit.rollout.prompts import RLPrompt
from rlhfkit.rollout.reward_spec import GoldReward, RewardModelSource
from rlhfkit.rollout.rewards import Sample

Record = dict[str, Any]


def _sample(prompt: RLPrompt, response: str) -> Sample:
    return Sample(prompt=prompt.prompt[-1].content, response=response,
                  meta={**prompt.meta, "conversation": prompt.prompt})


def _samples(pool: Sequence[RLPrompt], comparisons: Sequence[Record], side: str) -> list[Sample]:
    return [_sample(pool[c["index"]], c[side]) for c in comparisons]


def checkable(prompt: RLPrompt) -> bool:
    return any(prompt.meta.get(k) is not None for k in ("task", "answer", "tests"))


def gold_of(pool: Sequence[RLPrompt], responses: Sequence[tuple[int, str]]) -> list[float]:
    """The exact checkers' score of each (pool index, response)."""
    return GoldReward().score([_sample(pool[i], text) for i, text in responses])


def gold_scores(pool: Sequence[RLPrompt], comparisons: Sequence[Record]) -> list[tuple[float, float]]:
    """(score of a, score of b) by the exact checkers, for comparisons whose prompt has one."""
    gold = GoldReward()
    return list(zip(gold.score(_samples(pool, comparisons, "a")), gold.score(_samples(pool, comparisons, "b"))))


def _decision(c: Record, a_wins: bool | None, source: str, annotator: str) -> Record | None:
    if a_wins is None:
        return None
    chosen, rejected = (c["a"], c["b"]) if a_wins else (c["b"], c["a"])
    return {"comparison": c["id"], "task_id": c["task_id"], "prompt": c["prompt"], "chosen": chosen,
            "rejected": rejected, "label": 1.0, "source": source, "annotator": annotator}


def rules_labels(cfg: LoopConfig, pool: Sequence[RLPrompt], comparisons: Sequence[Record], round: int
                 ) -> list[Record | None]:
    """The exact checkers: the right answer beats the wrong one; two right or two wrong
    answers are undecided. With label_noise, a simulated annotator mis-clicks that often."""
    out: list[Record | None] = [None] * len(comparisons)
    rows = [i for i, c in enumerate(comparisons) if checkable(pool[c["index"]])]
    rng = random.Random(f"loop-noise/{cfg.seed}/{round}")
    for i, (sa, sb) in zip(rows, gold_scores(pool, [comparisons[i] for i in rows])):
        if sa == sb:
            continue
        a_wins = sa > sb
        if cfg.label_noise and rng.random() < cfg.label_noise:
            a_wins = not a_wins
        out[i] = _decision(comparisons[i], a_wins, "rules", "exact-checker" + (
            f" (mis-click rate {cfg.label_noise})" if cfg.label_noise else ""))
    return out


def rm_labels(spec: str, pool: Sequence[RLPrompt], comparisons: Sequence[Record]) -> list[Record | None]:
    """A reward model: the higher-scored response wins (an exact tie decides nothing)."""
    path = spec.split(":", 1)[1]
    source = RewardModelSource(path)
    ra, rb = source.score(_samples(pool, comparisons, "a")), source.score(_samples(pool, comparisons, "b"))
    return [_decision(c, None if a == b else a > b, "rm", path) for c, a, b in zip(comparisons, ra, rb)]


def judge_of(cfg: LoopConfig, spec: str) -> PairwiseJudge:
    """The pairwise judge of a spec, asked in both orders: 'judge' (the embedded model),
    'judge:local:PATH' or 'judge:http(s)://…' (serving cfg.judge_model)."""
    target = spec.split(":", 1)[1] if ":" in spec else "embedded"
    backend = backend_from_spec(target, judge_model=cfg.judge_model or None, max_new_tokens=cfg.judge_max_new_tokens)
    return PairwiseJudge(backend, both_orders=True)


def judge_labels(cfg: LoopConfig, spec: str, comparisons: Sequence[Record], round: int) -> list[Record | None]:
    """An LLM judge in both orders; a pair whose verdict flips with the order is undecided."""
    judge = judge_of(cfg, spec)
    backend = judge.backend
    pairs, _batch = label_pairs_with_judge(
        judge, [(as_conversation(c["prompt"]), c["a"], c["b"]) for c in comparisons], round=round)
    out: list[Record | None] = []
    for c, p in zip(comparisons, pairs):
        out.append(None if p.label == 0.5 else _decision(c, p.chosen == c["a"], "judge", backend.name))
    return out


def machine_labels(cfg: LoopConfig, pool: Sequence[RLPrompt], comparisons: Sequence[Record], round: int
                   ) -> tuple[list[Record], dict[str, int]]:
    """Each pair labeled by the first source (in cfg.feedback order) that decides it."""
    labels: list[Record | None] = [None] * len(comparisons)
    counts: dict[str, int] = {}
    for spec in cfg.feedback:
        todo = [i for i, lab in enumerate(labels) if lab is None]
        if not todo:
            break
        subset = [comparisons[i] for i in todo]
        kind = source_kind(spec)
        if kind == "rules":
            got = rules_labels(cfg, pool, subset, round)
        elif kind == "rm":
            got = rm_labels(spec, pool, subset)
        else:
            got = judge_labels(cfg, spec, subset, round)
        for i, lab in zip(todo, got):
            labels[i] = lab
        counts[kind] = sum(lab is not None for lab in got)
    out = []
    for c, lab in zip(comparisons, labels):
        out.append(lab or {"comparison": c["id"], "task_id": c["task_id"], "prompt": c["prompt"], "chosen": c["a"],
                           "rejected": c["b"], "label": 0.5, "source": "none", "annotator": "undecided"})
    counts["undecided"] = sum(lab is None for lab in labels)
    return out, counts


# ------------------------------------------------------------------------------------- humans
@dataclass(frozen=True)
class LabelStatus:
    """Where a human round stands in the labeling app."""

    db: str
    project: str
    labeling_round: int
    items: int
    votes: int
    needed: int

    @property
    def complete(self) -> bool:
        return self.votes >= self.needed


def label_db(cfg: LoopConfig, run_dir: Path) -> str:
    return cfg.label_db or str(run_dir / "labels.db")


def label_project(cfg: LoopConfig, run_dir: Path) -> str:
    return cfg.label_project or run_dir.name


def _round_tag(run_dir: Path, round: int) -> str:
    return f"loop:{run_dir.name}/round-{round}"


def _find_round(session, project, tag: str) -> Round | None:
    return session.scalar(select(Round).where(Round.project_id == project.id, Round.model_version == tag, published()))


def _status(session, db_url: str, project, target: Round) -> LabelStatus:
    items = session.scalar(select(func.count(Item.id)).where(Item.round_id == target.id))
    votes = session.scalar(select(func.count(Vote.id)).join(Item, Vote.item_id == Item.id)
                           .where(Item.round_id == target.id))
    return LabelStatus(db_url, project.name, target.number, items, votes, items * project.overlap)


def send_to_labeling_app(cfg: LoopConfig, run_dir: Path, round: int, comparisons: Sequence[Record]) -> LabelStatus:
    """Put the round's pairs into the labeling app (once: a rerun finds the round by its tag)
    and count the votes in so far."""
    db_url, name, tag = label_db(cfg, run_dir), label_project(cfg, run_dir), _round_tag(run_dir, round)
    database = open_database(db_url)
    try:
        with database.write() as session:
            project = find_project(session, name) or create_project(
                session, name, overlap=cfg.overlap, open_to_all=True,
                guidelines_md="Pick the better response: correct, helpful, and no longer than needed.")
            target = _find_round(session, project, tag)
            if target is None:
                records = [{"prompt": c["prompt"], "responses": [c["a"], c["b"]], "id": c["id"],
                            "model_version": tag} for c in comparisons]
                target = add_round(session, project, records, tag)
            session.commit()
            return _status(session, db_url, project, target)
    finally:
        database.close()


def labeling_progress(cfg: LoopConfig, run_dir: Path, round: int) -> LabelStatus | None:
    """The votes in so far for a round already in the labeling app (None if it is not there);
    reads only."""
    db_url = label_db(cfg, run_dir)
    database = open_database(db_url, upgrade=False)
    try:
        with database.read() as session:
            project = find_project(session, label_project(cfg, run_dir))
            target = project and _find_round(session, project, _round_tag(run_dir, round))
            return None if target is None else _status(session, db_url, project, target)
    finally:
        database.close()


def human_labels(status: LabelStatus, comparisons: Sequence[Record]) -> tuple[list[Record], dict[str, Any]]:
    """The round's votes as label records (one per vote, with its vote id) and agreement numbers."""
    by_id = {c["id"]: c for c in comparisons}
    database = open_database(status.db)
    try:
        with database.read() as session:
            project = find_project(session, status.project)
            pairs = export_records(session, project, format="pairs", rounds=[status.labeling_round])
    finally:
        database.close()
    labels, table = [], {}
    for r in pairs:
        c = by_id[r["item_id"]]
        labels.append({"comparison": c["id"], "task_id": c["task_id"], "prompt": c["prompt"], "chosen": r["chosen"],
                       "rejected": r["rejected"], "label": r["label"], "source": "human",
                       "annotator": r["annotator"], "vote_id": r["vote_id"]})
        verdict = "tie" if r["label"] == 0.5 else ("a" if r["chosen"] == c["a"] else "b")
        table.setdefault(c["id"], {})[r["annotator"]] = verdict
    agreement = {"votes": len(labels), "annotators": len({r["annotator"] for r in pairs}),
                 "items_with_2_votes": sum(len(v) >= 2 for v in table.values())}
    if agreement["items_with_2_votes"]:
        agreement.update(percent_agreement=percent_agreement(table), fleiss_kappa=fleiss_kappa(table))
    return labels, agreement
