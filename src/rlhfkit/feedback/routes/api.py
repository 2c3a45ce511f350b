"""A small JSON API for scripts and load tests; same rules as the pages (own votes only,
CSRF token in the X-CSRF-Token header on every POST). `POST /api/p/N/next` claims the next
item (a claim is a write, so it is a POST); the answer says until when the claim holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from rlhfkit.feedback import votes
from rlhfkit.feedback.assignment import assignment_for, confirm_claim, next_assignment
from rlhfkit.feedback.models import Assignment, User, Vote
from rlhfkit.feedback.web import (
    RowId,
    claim_lease,
    current_user,
    get_project_for,
    page_csrf_token,
    read_db,
    write_db,
)

router = APIRouter(prefix="/api")


class VoteBody(BaseModel):
    choice: str | None = Field(None, description="pairwise: A, B, tie or both_bad (shown order)")
    ranking: str | None = Field(None, description="ranking: e.g. 'D > C > A = B' (shown letters)")
    strength: int | None = Field(None, description="pairwise preference strength 1-3")
    rationale: str | None = None
    all_bad: bool = False


def _assignment_json(assignment: Assignment) -> dict[str, Any]:
    item = assignment.item
    lease = assignment.lease_expires_at
    return {"item_id": item.id, "kind": item.kind, "prompt": item.prompt,
            "claim_expires_at": None if lease is None else lease.isoformat(),
            "candidates": [{"letter": votes.LETTERS[pos], "text": item.responses[idx]}
                           for pos, idx in enumerate(assignment.display_order)]}


def _vote_json(vote: Vote) -> dict[str, Any]:
    return {"vote_id": vote.id, "item_id": vote.item_id, "project_id": vote.project_id, "ranks": vote.ranks,
            "both_bad": vote.both_bad, "strength": vote.strength, "rationale": vote.rationale,
            "display_order": vote.display_order}


@router.get("/me")
def me(request: Request, user: User = Depends(current_user)):
    return {"username": user.username, "role": user.role, "csrf_token": page_csrf_token(request)}


@router.post("/p/{project_id}/next")
def next_item(request: Request, project_id: RowId, user: User = Depends(current_user),
              db: Session = Depends(write_db)):
    assignment = next_assignment(db, get_project_for(db, project_id, user), user, lease=claim_lease(request))
    db.commit()
    return {"item": None if assignment is None else _assignment_json(assignment)}


@router.post("/p/{project_id}/items/{item_id}/vote")
def vote(request: Request, project_id: RowId, item_id: RowId, body: VoteBody, user: User = Depends(current_user),
         db: Session = Depends(write_db)):
    project = get_project_for(db, project_id, user)
    assignment = assignment_for(db, item_id, user)
    if assignment is None or assignment.project_id != project.id:
        raise HTTPException(status_code=404, detail="no such item among yours")
    if not confirm_claim(db, project, assignment, lease=claim_lease(request)):
        db.commit()
        raise HTTPException(status_code=409, detail="your claim on this item expired and others answered it")
    item = assignment.item
    try:
        answer = votes.build_vote_input(item.kind, len(item.responses), choice=body.choice,
                                        ranking=body.ranking, strength=body.strength,
                                        rationale=body.rationale, all_bad=body.all_bad)
        saved = votes.save_vote(db, assignment, answer)
    except votes.VoteError as e:
        raise HTTPException(status_code=400, detail=str(e)) from None
    db.commit()
    return _vote_json(saved)


@router.post("/p/{project_id}/undo")
def undo(request: Request, project_id: RowId, user: User = Depends(current_user), db: Session = Depends(write_db)):
    item = votes.undo_last_vote(db, get_project_for(db, project_id, user), user, lease=claim_lease(request))
    db.commit()
    return {"undone_item_id": None if item is None else item.id}


@router.get("/votes")
def my_votes(user: User = Depends(current_user), db: Session = Depends(read_db)):
    return {"votes": [_vote_json(v) for v in votes.own_votes(db, user)]}


@router.get("/votes/{vote_id}")
def my_vote(vote_id: RowId, user: User = Depends(current_user), db: Session = Depends(read_db)):
    found = votes.own_vote(db, user, vote_id)
    if found is None:
        raise HTTPException(status_code=404, detail="no such vote among yours")
    return _vote_json(found)
