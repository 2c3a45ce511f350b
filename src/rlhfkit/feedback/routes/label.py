"""The annotator's pages: projects, guidelines, the labeling page, history, undo."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from rlhfkit.feedback import votes
from rlhfkit.feedback.assignment import assignment_for, confirm_claim, has_work, held_assignment, next_assignment
from rlhfkit.feedback.guidelines import render_guidelines
from rlhfkit.feedback.membership import visible_projects
from rlhfkit.feedback.models import PAIRWISE, Assignment, Project, User, Vote
from rlhfkit.feedback.projects import item_count
from rlhfkit.feedback.web import (
    RowId,
    claim_lease,
    current_user,
    get_project_for,
    read_db,
    redirect,
    render,
    write_db,
)

router = APIRouter()
PAIRWISE_ANSWERS = {"A": "A better", "B": "B better", "tie": "tie", "both_bad": "both bad"}


@dataclass(frozen=True)
class Prefill:
    """What the form shows already selected: the saved vote (edit) or the rejected input."""

    choice: str = ""
    ranking: str = ""
    strength: str = ""
    rationale: str = ""
    all_bad: bool = False


def _prefill_from_vote(vote: Vote | None, assignment: Assignment) -> Prefill:
    if vote is None:
        return Prefill()
    shown = votes.to_shown_order(vote.ranks, assignment.display_order)
    return Prefill(choice=votes.pairwise_choice(shown, vote.both_bad), ranking=votes.format_ranking(shown),
                   strength="" if vote.strength is None else str(vote.strength),
                   rationale=vote.rationale or "", all_bad=vote.both_bad)


def _conversation(prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _label_page(request: Request, db: Session, project: Project, assignment: Assignment, user: User,
                prefill: Prefill, *, editing: bool, error: str | None = None, notice: str | None = None,
                status_code: int = 200):
    item = assignment.item
    candidates = [{"letter": votes.LETTERS[position], "key": position + 1, "text": item.responses[index]}
                  for position, index in enumerate(assignment.display_order)]
    done = db.scalar(select(func.count(Vote.id)).where(Vote.project_id == project.id, Vote.user_id == user.id))
    return render(request, "label.html", {
        "project": project, "item": item, "kind": item.kind, "pairwise": item.kind == PAIRWISE,
        "conversation": _conversation(item.prompt), "candidates": candidates, "prefill": prefill,
        "editing": editing, "error": error, "notice": notice, "done_count": done,
        "round_number": item.round.number,
    }, user=user, status_code=status_code)


@router.get("/projects")
def projects(request: Request, user: User = Depends(current_user), db: Session = Depends(read_db)):
    mine = dict(db.execute(select(Vote.project_id, func.count(Vote.id)).where(Vote.user_id == user.id)
                           .group_by(Vote.project_id)).all())
    rows = [{"project": p, "done": mine.get(p.id, 0),
             "item_count": item_count(db, p.id)}
            for p in db.scalars(visible_projects(user))]
    return render(request, "projects.html", {"rows": rows}, user=user)


@router.get("/p/{project_id}/guidelines")
def guidelines(request: Request, project_id: RowId, user: User = Depends(current_user),
               db: Session = Depends(read_db)):
    project = get_project_for(db, project_id, user)
    return render(request, "guidelines.html", {"project": project,
                                               "guidelines_html": render_guidelines(project.guidelines_md)},
                  user=user)


def _done_page(request: Request, db: Session, project: Project, user: User):
    done = db.scalar(select(func.count(Vote.id)).where(Vote.project_id == project.id, Vote.user_id == user.id))
    return render(request, "done.html", {"project": project, "done_count": done}, user=user)


@router.get("/p/{project_id}/label")
def label_next(request: Request, project_id: RowId, undone: int = 0, user: User = Depends(current_user),
               db: Session = Depends(read_db)):
    """The item being worked on, else a button that claims the next one (a GET claims nothing)."""
    project = get_project_for(db, project_id, user)
    held = held_assignment(db, project, user)
    if held is not None:
        return redirect(f"/p/{project.id}/items/{held.item_id}" + ("?undone=1" if undone else ""))
    if not has_work(db, project, user):
        return _done_page(request, db, project, user)
    return render(request, "start.html", {"project": project,
                                          "lease_minutes": round(claim_lease(request).total_seconds() / 60)}, user=user)


def _claim_next(request: Request, db: Session, project: Project, user: User):
    """Claim the next item (or keep the one held) and send the annotator to it."""
    assignment = next_assignment(db, project, user, lease=claim_lease(request))
    db.commit()
    return redirect(f"/p/{project.id}/items/{assignment.item_id}" if assignment else f"/p/{project.id}/label")


@router.post("/p/{project_id}/label")
def claim(request: Request, project_id: RowId, user: User = Depends(current_user), db: Session = Depends(write_db)):
    return _claim_next(request, db, get_project_for(db, project_id, user), user)


def _own_assignment(db: Session, project: Project, item_id: int, user: User) -> Assignment:
    assignment = assignment_for(db, item_id, user)
    if assignment is None or assignment.project_id != project.id:
        # The same answer whether the item exists or was given to someone else.
        raise HTTPException(status_code=404, detail="no such item among yours")
    return assignment


@router.get("/p/{project_id}/items/{item_id}")
def label_item(request: Request, project_id: RowId, item_id: RowId, undone: int = 0,
               user: User = Depends(current_user), db: Session = Depends(read_db)):
    project = get_project_for(db, project_id, user)
    assignment = _own_assignment(db, project, item_id, user)
    vote = votes.own_vote_for_item(db, user, item_id)
    return _label_page(request, db, project, assignment, user, _prefill_from_vote(vote, assignment),
                       editing=vote is not None,
                       notice="Your last vote was undone: answer this item again." if undone else None)


@router.post("/p/{project_id}/items/{item_id}")
def submit_vote(request: Request, project_id: RowId, item_id: RowId, choice: str = Form(""),
                ranking: str = Form(""), strength: str = Form(""), rationale: str = Form(""),
                all_bad: str = Form(""), user: User = Depends(current_user), db: Session = Depends(write_db)):
    project = get_project_for(db, project_id, user)
    assignment = _own_assignment(db, project, item_id, user)
    if not confirm_claim(db, project, assignment, lease=claim_lease(request)):
        db.commit()
        raise HTTPException(status_code=409, detail="Your claim on this item expired and other annotators "
                                                    "have answered it; take the next item.")
    item = assignment.item
    try:
        answer = votes.build_vote_input(item.kind, len(item.responses), choice=choice or None,
                                        ranking=ranking, strength=strength, rationale=rationale,
                                        all_bad=bool(all_bad))
        votes.save_vote(db, assignment, answer)
    except votes.VoteError as e:
        db.rollback()
        prefill = Prefill(choice=choice, ranking=ranking, strength=strength, rationale=rationale,
                          all_bad=bool(all_bad))
        return _label_page(request, db, project, assignment, user, prefill, editing=False, error=str(e),
                           status_code=400)
    return _claim_next(request, db, project, user)


@router.post("/p/{project_id}/undo")
def undo(request: Request, project_id: RowId, user: User = Depends(current_user), db: Session = Depends(write_db)):
    project = get_project_for(db, project_id, user)
    item = votes.undo_last_vote(db, project, user, lease=claim_lease(request))
    db.commit()
    if item is None:
        return redirect(f"/p/{project.id}/label")
    return redirect(f"/p/{project.id}/items/{item.id}?undone=1")


@router.get("/p/{project_id}/history")
def history(request: Request, project_id: RowId, user: User = Depends(current_user), db: Session = Depends(read_db)):
    project = get_project_for(db, project_id, user)
    rows = []
    for vote in votes.own_votes(db, user, project, limit=50):
        shown = votes.to_shown_order(vote.ranks, vote.display_order)
        answer = (PAIRWISE_ANSWERS[votes.pairwise_choice(shown, vote.both_bad)] if vote.item.kind == PAIRWISE
                  else votes.format_ranking(shown) + (" (all bad)" if vote.both_bad else ""))
        prompt = _conversation(vote.item.prompt)[-1]["content"]
        rows.append({"vote": vote, "answer": answer, "prompt": prompt})
    return render(request, "history.html", {"project": project, "rows": rows}, user=user)
