"""Annotators voting while a flood of wrong passwords hits the login form, against a real
`rlhf label serve` on loopback. Bounded in time; prints one JSON line of results.

    python tests/feedback/login_flood.py --seconds 8 --flood-threads 8 --voters 4

Each flood request uses a fresh username and a fresh client address (X-Forwarded-For, which
uvicorn trusts from loopback), the way a botnet would: no login throttle ever kicks in, so
what is measured is what every password check costs the voters. `--same-account` floods one
account from one address instead (the throttle answers 429 after a few tries).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

PASSWORD = "correct horse battery"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seed(db_path: Path, voters: int, items: int) -> int:
    from rlhfkit.feedback.db import open_database
    from rlhfkit.feedback.models import ANNOTATOR
    from rlhfkit.feedback.projects import add_round, create_project
    from rlhfkit.feedback.users import create_user

    database = open_database(str(db_path))
    with database.write() as session:
        for i in range(voters):
            create_user(session, f"voter{i:02d}", PASSWORD, ANNOTATOR)
        project = create_project(session, "flood", overlap=1, open_to_all=True)
        add_round(session, project, [{"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]} for i in range(items)])
        session.commit()
        project_id = project.id
    database.close()
    return project_id


def start_server(db_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "label", "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--db", str(db_path), "--log-level", "error"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180  # a busy machine takes a while to import torch
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start")


def log_in(url: str, username: str) -> httpx.Client:
    client = httpx.Client(base_url=url, timeout=30)
    token = CSRF_RE.search(client.get("/login").text).group(1)
    response = client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.status_code
    client.headers["X-CSRF-Token"] = client.get("/api/me").json()["csrf_token"]
    return client


def claim(client: httpx.Client, project_id: int) -> dict | None:
    response = client.post(f"/api/p/{project_id}/next")
    if response.status_code == 405:  # before claims became a POST
        response = client.get(f"/api/p/{project_id}/next")
    response.raise_for_status()
    return response.json()["item"]


def vote_loop(client, project_id, stop, latencies, claim_latencies, errors) -> None:
    while not stop.is_set():
        try:
            start = time.perf_counter()
            item = claim(client, project_id)
            claim_latencies.append(time.perf_counter() - start)
            if item is None:
                return
            start = time.perf_counter()
            response = client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", json={"choice": "A"})
            if response.status_code != 200:
                errors.append(response.status_code)
                continue
            latencies.append(time.perf_counter() - start)
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)


def flood_loop(url, stop, statuses, thread_no, same_account) -> None:
    client = httpx.Client(base_url=url, timeout=60)
    token = CSRF_RE.search(client.get("/login").text).group(1)
    n = 0
    while not stop.is_set():
        n += 1
        username = "voter00" if same_account else f"nobody-{thread_no}-{n}"
        address = "10.9.9.9" if same_account else f"10.{thread_no}.{n // 250 % 250}.{n % 250 + 1}"
        try:
            response = client.post("/login", data={"username": username, "password": f"wrong guess {n}",
                                                   "csrf_token": token},
                                   headers={"X-Forwarded-For": address})
            statuses.append(response.status_code)
        except httpx.HTTPError as e:
            statuses.append(type(e).__name__)
    client.close()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(seconds: float, flood_threads: int, voters: int, same_account: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        db_path = Path(tmp) / "flood.db"
        project_id = seed(db_path, voters, items=3000)
        process, url = start_server(db_path)
        try:
            clients = [log_in(url, f"voter{i:02d}") for i in range(voters)]
            stop = threading.Event()
            latencies: list[float] = []
            claim_latencies: list[float] = []
            errors: list = []
            statuses: list = []
            threads = [threading.Thread(target=flood_loop, args=(url, stop, statuses, t, same_account))
                       for t in range(flood_threads)]
            threads += [threading.Thread(target=vote_loop, args=(c, project_id, stop, latencies,
                                                                 claim_latencies, errors)) for c in clients]
            for t in threads:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            for c in clients:
                c.close()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
    status_counts: dict[str, int] = {}
    for s in statuses:
        status_counts[str(s)] = status_counts.get(str(s), 0) + 1
    ms = lambda v: None if v is None else round(1000 * v, 1)
    return {"seconds": seconds, "flood_threads": flood_threads, "voters": voters, "same_account": same_account,
            "votes": len(latencies), "votes_per_s": round(len(latencies) / seconds, 1),
            "vote_p50_ms": ms(statistics.median(latencies) if latencies else None),
            "vote_p95_ms": ms(_percentile(latencies, 0.95)), "vote_max_ms": ms(max(latencies, default=None)),
            "claim_p50_ms": ms(statistics.median(claim_latencies) if claim_latencies else None),
            "claim_p95_ms": ms(_percentile(claim_latencies, 0.95)),
            "vote_errors": len(errors), "login_attempts": len(statuses), "login_statuses": status_counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--flood-threads", type=int, default=8)
    parser.add_argument("--voters", type=int, default=4)
    parser.add_argument("--same-account", action="store_true")
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.flood_threads, args.voters, args.same_account)))


if __name__ == "__main__":
    main()
