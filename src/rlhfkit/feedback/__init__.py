"""The labeling web app: collect pairwise preferences and rankings with ties from people,
measure their agreement, and export the votes as training data.

    rlhf label create-admin alice --db feedback.db
    rlhf label import candidates.jsonl --project helpfulness --db feedback.db
    rlhf label serve --db feedback.db
    rlhf label export prefs.jsonl --project helpfulness --db feedback.db

From Python (e.g. after sampling candidates from a new checkpoint):

    db = open_database("feedback.db")
    with db.write() as session:
        add_round(session, find_project(session, "helpfulness"), records, model_version="ppo-step-2000")
        session.commit()
"""

from rlhfkit.feedback.db import Database, open_database
from rlhfkit.feedback.export import FORMATS, export_records, write_jsonl
from rlhfkit.feedback.projects import add_round, create_project, find_project
from rlhfkit.feedback.records import CandidateSet, read_candidate_sets
from rlhfkit.feedback.users import create_user

# The FastAPI app is `rlhfkit.feedback.app.create_app`, not imported here: the CLI and `add_round`
# do not need FastAPI.


__all__ = [
    "FORMATS", "CandidateSet", "Database", "add_round", "create_project", "create_user",
    "export_records", "find_project", "open_database", "read_candidate_sets", "write_jsonl",
]
