"""The labeling web app: collect pairwise preferences and rankings with ties from people,
measure their agreement, and export the votes as training data.

    rlhf label create-admin alice --db feedback.db
    rlhf label import candidates.jsonl --project helpfulness --db feedback.db
    rlhf label serve --db feedback.db
    rlhf label export prefs.jsonl --project helpfulness --db feedback.db

From Python (e.g. after sampling candidates from a new checkpoint), through the modules named
for what they hold (`db`, `projects`, `records`, `users`, `export`; the FastAPI app is
`app.create_app`); this package imports none of them, so the pure statistics in `agreement`
load without SQLAlchemy or FastAPI:

    from rlhfkit.feedback.db import open_database
    from rlhfkit.feedback.projects import add_round, find_project

    db = open_database("feedback.db")
    with db.write() as session:
        add_round(session, find_project(session, "helpfulness"), records, model_version="ppo-step-2000")
        session.commit()
"""
