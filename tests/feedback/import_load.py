"""Annotators voting while a login flood and a large import hit a real `rlhf label serve` on
loopback (issue #16's load test). Bounded in time; prints one JSON line of results.

    python tests/feedback/import_load.py --voters 50 --flood-threads 4 --import-items 100000

The import runs as the operator runs it, `rlhf label import` in its own process on the same
database (or through the admin upload page with `--import-via web`). Afterwards every vote the
server acknowledged must be in `rlhf label export`: `acked_missing` counts those that are not.

Each annotator waits `--think-seconds` after each vote (default 2 s: 50 annotators then offer
25 votes/s, far above what people reading two answers manage); `--think-seconds 0` is the
saturation test, every annotator voting back to back.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from login_flood import PASSWORD, claim, flood_loop, log_in, start_server  # noqa: E402


def seed(db_path: Path, voters: int, items: int) -> int:
    from rlhfkit.feedback.db import open_database
    from rlhfkit.feedback.models import ADMIN, ANNOTATOR
    from rlhfkit.feedback.projects import add_round, create_project
    from rlhfkit.feedback.users import create_user

    database = open_database(str(db_path))
    with database.write() as session:
        create_user(session, "boss", PASSWORD, ADMIN)
        for i in range(voters):
            create_user(session, f"voter{i:02d}", PASSWORD, ANNOTATOR)
        project = create_project(session, "load", overlap=1, open_to_all=True)
        add_round(session, project, [{"id": f"v{i}", "prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]}
                                     for i in range(items)])
        session.commit()
        project_id = project.id
    database.close()
    return project_id


def write_import_file(path: Path, items: int) -> None:
    with open(path, "w") as f:
        for i in range(items):
            f.write(json.dumps({"id": f"big{i}", "prompt": f"Which answer is better for question {i}?",
                                "responses": [f"first answer {i} " * 4, f"second answer {i} " * 4]}) + "\n")


def vote_loop(client: httpx.Client, username: str, project_id: int, stop: threading.Event,
              latencies: list[float], acked: list[tuple[int, str]], errors: list, think: float) -> None:
    stop.wait(random.uniform(0, think))  # annotators do not all start at once
    while not stop.is_set():
        try:
            item = claim(client, project_id)
            if item is None:
                return
            start = time.perf_counter()
            response = client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", json={"choice": "A"})
            if response.status_code != 200:
                errors.append(response.status_code)
                continue
            latencies.append(time.perf_counter() - start)
            acked.append((response.json()["vote_id"], username))
            stop.wait(think)
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)


def run_import(db_path: Path, url: str, import_file: Path, via: str) -> dict:
    start = time.perf_counter()
    if via == "cli":
        done = subprocess.run([sys.executable, "-m", "rlhfkit.cli", "label", "import", str(import_file),
                               "--project", "big", "--overlap", "1", "--db", str(db_path)],
                              capture_output=True, text=True)
        ok, detail = done.returncode == 0, (done.stdout + done.stderr).strip().splitlines()[-1:]
    else:
        admin = log_in(url, "boss")
        page = admin.get("/admin")
        token = page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        with open(import_file, "rb") as f:
            response = admin.post("/admin/projects", data={"name": "big", "overlap": "1", "csrf_token": token},
                                  files={"file": ("big.jsonl", f, "application/jsonl")}, timeout=600)
        ok, detail = response.status_code == 303, [str(response.status_code)]
        admin.close()
    return {"ok": ok, "seconds": round(time.perf_counter() - start, 2), "detail": detail}


def exported_votes(db_path: Path, tmp: Path) -> set[tuple[int, str]]:
    out = tmp / "export.jsonl"
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "label", "export", str(out), "--project", "load",
                    "--format", "rankings", "--db", str(db_path)], check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {(r["vote_id"], r["annotator"]) for r in rows}


def _percentile(values: list[float], q: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None


def run(voters: int, flood_threads: int, import_items: int, via: str = "cli", think: float = 2.0,
        after_s: float = 4.0, max_seconds: float = 300.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db_path, import_file = tmp / "load.db", tmp / "big.jsonl"
        project_id = seed(db_path, voters, items=max(20_000, 40 * voters))
        write_import_file(import_file, import_items)
        process, url = start_server(db_path)
        try:
            names = [f"voter{i:02d}" for i in range(voters)]
            clients = [log_in(url, name) for name in names]
            stop = threading.Event()
            latencies: list[float] = []
            acked: list[tuple[int, str]] = []
            errors: list = []
            statuses: list = []
            threads = [threading.Thread(target=flood_loop, args=(url, stop, statuses, t, False))
                       for t in range(flood_threads)]
            threads += [threading.Thread(target=vote_loop,
                                         args=(c, n, project_id, stop, latencies, acked, errors, think))
                        for c, n in zip(clients, names, strict=True)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            time.sleep(after_s)  # voting and flooding before the import starts
            before_import = len(latencies)
            result = {}
            importer = threading.Thread(target=lambda: result.update(run_import(db_path, url, import_file, via)))
            importer.start()
            importer.join(timeout=max_seconds)
            during_import = len(latencies) - before_import
            time.sleep(after_s)  # and after it
            stop.set()
            for t in threads:
                t.join(timeout=60)
            seconds = time.perf_counter() - started
            for c in clients:
                c.close()
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        missing = set(acked) - exported_votes(db_path, tmp)
    ms = lambda v: None if v is None else round(1000 * v, 1)
    return {"voters": voters, "think_seconds": think, "flood_threads": flood_threads, "import_items": import_items,
            "import_via": via,
            "import": result, "seconds": round(seconds, 1), "votes": len(latencies),
            "votes_during_import": during_import,
            "vote_p50_ms": ms(statistics.median(latencies) if latencies else None),
            "vote_p95_ms": ms(_percentile(latencies, 0.95)), "vote_max_ms": ms(max(latencies, default=None)),
            "vote_errors": len(errors), "error_kinds": sorted({str(e) for e in errors}),
            "login_attempts": len(statuses), "acked_missing": len(missing)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voters", type=int, default=50)
    parser.add_argument("--flood-threads", type=int, default=4)
    parser.add_argument("--import-items", type=int, default=100_000)
    parser.add_argument("--import-via", choices=("cli", "web"), default="cli")
    parser.add_argument("--think-seconds", type=float, default=2.0)
    args = parser.parse_args()
    print(json.dumps(run(args.voters, args.flood_threads, args.import_items, args.import_via, args.think_seconds)))


if __name__ == "__main__":
    main()
