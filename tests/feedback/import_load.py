"""Annotators voting while a login flood and a large import hit a real `rlhf label serve` on
loopback (issue #16's load test). Bounded in time; prints one JSON line of results.

    python tests/feedback/import_load.py --voters 50 --flood-threads 4 --import-items 100000

The import runs as the operator runs it, `rlhf label import` in its own process on the same
database (or through the admin upload page with `--import-via web`). Afterwards every vote the
server acknowledged must be in `rlhf label export`: `acked_missing` counts those that are not.

Each annotator waits `--think-seconds` after each vote (default 2 s: 50 annotators then offer
25 votes/s, far above what people reading two answers manage); `--think-seconds 0` is the
saturation test, every annotator voting back to back.

The client is one asyncio event loop in one thread (annotators and flooders are coroutines):
with 54 threads in one CPython process, the client's own waits for the GIL on the server's 2
cores were counted as vote latency. A vote's latency runs from sending the vote to reading its
answer; `during_import_*` counts the votes sent while the import ran.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from login_flood import CSRF_RE, PASSWORD, start_server  # noqa: E402


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


async def log_in(url: str, username: str) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=url, timeout=60)
    token = CSRF_RE.search((await client.get("/login")).text).group(1)
    response = await client.post("/login", data={"username": username, "password": PASSWORD, "csrf_token": token})
    assert response.status_code == 303, response.status_code
    client.headers["X-CSRF-Token"] = (await client.get("/api/me")).json()["csrf_token"]
    return client


async def vote_loop(client: httpx.AsyncClient, username: str, project_id: int, stop: asyncio.Event,
                    votes: list[tuple[float, float]], acked: list[tuple[int, str]], errors: list,
                    think: float) -> None:
    """One annotator: claim, vote, think; `votes` gets (start time, latency) of each acknowledged vote."""
    await _sleep_unless(stop, random.uniform(0, think))  # annotators do not all start at once
    while not stop.is_set():
        try:
            response = await client.post(f"/api/p/{project_id}/next")
            response.raise_for_status()
            item = response.json()["item"]
            if item is None:
                return
            start = time.perf_counter()
            response = await client.post(f"/api/p/{project_id}/items/{item['item_id']}/vote", json={"choice": "A"})
            if response.status_code != 200:
                errors.append(response.status_code)
                continue
            votes.append((start, time.perf_counter() - start))
            acked.append((response.json()["vote_id"], username))
            await _sleep_unless(stop, think)
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)


async def web_vote_loop(client: httpx.AsyncClient, username: str, project_id: int, stop: asyncio.Event,
                        votes: list[tuple[float, float]], acked: list[tuple[int, str]], errors: list,
                        think: float, pages: list[float]) -> None:
    """One annotator in a browser: the item's page, think, the vote form; its answer (one
    transaction: the vote saved and the next item claimed) redirects to the next item.
    `acked` gets (item row id, username) of each vote the server answered with its redirect."""
    await _sleep_unless(stop, random.uniform(0, think))
    token = CSRF_RE.search((await client.get(f"/p/{project_id}/label")).text).group(1)
    response = await client.post(f"/p/{project_id}/label", data={"csrf_token": token})
    while not stop.is_set() and "/items/" in response.headers.get("location", ""):
        item_path = response.headers["location"]
        try:
            start = time.perf_counter()
            page = await client.get(item_path)
            pages.append(time.perf_counter() - start)
            if page.status_code != 200:
                errors.append(page.status_code)
                return
            await _sleep_unless(stop, think)
            if stop.is_set():  # not all 50 at once when the test ends
                return
            start = time.perf_counter()
            response = await client.post(item_path, data={"choice": "A", "csrf_token": token})
            if response.status_code != 303:
                errors.append(response.status_code)
                return
            votes.append((start, time.perf_counter() - start))
            acked.append((int(item_path.rsplit("/", 1)[1]), username))
        except httpx.HTTPError as e:
            errors.append(type(e).__name__)
            return


async def flood_loop(url: str, stop: asyncio.Event, statuses: list, flooder: int) -> None:
    """Wrong passwords for fresh usernames from fresh addresses, back to back (see login_flood.py)."""
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        token = CSRF_RE.search((await client.get("/login")).text).group(1)
        n = 0
        while not stop.is_set():
            n += 1
            try:
                response = await client.post(
                    "/login", data={"username": f"nobody-{flooder}-{n}", "password": f"wrong guess {n}",
                                    "csrf_token": token},
                    headers={"X-Forwarded-For": f"10.{flooder}.{n // 250 % 250}.{n % 250 + 1}"})
                statuses.append(response.status_code)
            except httpx.HTTPError as e:
                statuses.append(type(e).__name__)


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        pass


async def run_import(db_path: Path, url: str, import_file: Path, via: str) -> dict:
    start = time.perf_counter()
    if via == "cli":
        done = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rlhfkit.cli", "label", "import", str(import_file), "--project", "big",
            "--overlap", "1", "--db", str(db_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await done.communicate()
        ok, detail = done.returncode == 0, output.decode().strip().splitlines()[-1:]
    else:
        admin = await log_in(url, "boss")
        token = CSRF_RE.search((await admin.get("/admin")).text).group(1)
        response = await admin.post("/admin/projects", data={"name": "big", "overlap": "1", "csrf_token": token},
                                    files={"file": ("big.jsonl", import_file.read_bytes(), "application/jsonl")},
                                    timeout=600)
        ok, detail = response.status_code == 303, [str(response.status_code)]
        await admin.aclose()
    return {"ok": ok, "seconds": round(time.perf_counter() - start, 2), "detail": detail,
            "started": start, "ended": time.perf_counter()}


def missing_from_export(db_path: Path, tmp: Path, acked: list[tuple[int, str]], annotators: str) -> int:
    """How many acknowledged votes `rlhf label export` lacks. The API acknowledges a vote id;
    the vote form an item (its row id, turned into the export's `item_id` here)."""
    out = tmp / "export.jsonl"
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "label", "export", str(out), "--project", "load",
                    "--format", "rankings", "--db", str(db_path)], check=True, capture_output=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    if annotators == "api":
        return len(set(acked) - {(r["vote_id"], r["annotator"]) for r in rows})
    with sqlite3.connect(db_path) as connection:
        external = dict(connection.execute("SELECT id, external_id FROM items"))
    return len({(external[item], name) for item, name in acked} - {(r["item_id"], r["annotator"]) for r in rows})


def _percentile(values: list[float], q: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None


def _percentiles(latencies: list[float]) -> dict:
    ms = lambda v: None if v is None else round(1000 * v, 1)
    return {"votes": len(latencies), "p50_ms": ms(statistics.median(latencies) if latencies else None),
            "p95_ms": ms(_percentile(latencies, 0.95)), "max_ms": ms(max(latencies, default=None))}


async def _load(url: str, db_path: Path, import_file: Path, project_id: int, voters: int, flood_threads: int,
                via: str, annotators: str, think: float, after_s: float, max_seconds: float) -> dict:
    names = [f"voter{i:02d}" for i in range(voters)]
    clients = [await log_in(url, name) for name in names]  # one at a time: the server caps parallel logins
    stop = asyncio.Event()
    votes: list[tuple[float, float]] = []
    acked: list[tuple[int, str]] = []
    errors: list = []
    statuses: list = []
    pages: list[float] = []
    started = time.perf_counter()
    tasks = [asyncio.create_task(flood_loop(url, stop, statuses, t)) for t in range(flood_threads)]
    for c, n in zip(clients, names, strict=True):
        annotator = (vote_loop(c, n, project_id, stop, votes, acked, errors, think) if annotators == "api"
                     else web_vote_loop(c, n, project_id, stop, votes, acked, errors, think, pages))
        tasks.append(asyncio.create_task(annotator))
    await asyncio.sleep(after_s)  # voting and flooding before the import starts
    try:
        result = await asyncio.wait_for(run_import(db_path, url, import_file, via), timeout=max_seconds)
    except TimeoutError:
        result = {"ok": False, "detail": [f"import still running after {max_seconds} s"],
                  "started": started + after_s, "ended": time.perf_counter()}
    await asyncio.sleep(after_s)  # and after it
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    seconds = time.perf_counter() - started
    await asyncio.gather(*(c.aclose() for c in clients))
    during = [latency for start, latency in votes if result["started"] <= start < result["ended"]]
    return {"import": {k: v for k, v in result.items() if k not in ("started", "ended")},
            "seconds": round(seconds, 1), "latencies": [latency for _, latency in votes],
            "during_import": during, "acked": acked, "pages": pages,
            "timeline": {"import_s": [round(result["started"] - started, 2), round(result["ended"] - started, 2)],
                         "votes": [(round(start - started, 3), round(latency, 4)) for start, latency in votes]},
            "errors": errors, "statuses": statuses}


def run(voters: int, flood_threads: int, import_items: int, via: str = "cli", think: float = 2.0,
        after_s: float = 4.0, max_seconds: float = 300.0, annotators: str = "web") -> dict:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        db_path, import_file = tmp / "load.db", tmp / "big.jsonl"
        project_id = seed(db_path, voters, items=max(20_000, 40 * voters))
        write_import_file(import_file, import_items)
        process, url = start_server(db_path)
        try:
            load = asyncio.run(_load(url, db_path, import_file, project_id, voters, flood_threads, via,
                                     annotators, think, after_s, max_seconds))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        missing = missing_from_export(db_path, tmp, load["acked"], annotators)
    everything, during = _percentiles(load["latencies"]), _percentiles(load["during_import"])
    pages = _percentiles(load["pages"])
    return {"voters": voters, "think_seconds": think, "flood_threads": flood_threads, "import_items": import_items,
            "import_via": via, "annotators": annotators, "client": "asyncio", "import": load["import"],
            "seconds": load["seconds"],
            "votes": everything["votes"], "votes_during_import": during["votes"],
            "vote_p50_ms": everything["p50_ms"], "vote_p95_ms": everything["p95_ms"],
            "vote_max_ms": everything["max_ms"],
            "during_import_p50_ms": during["p50_ms"], "during_import_p95_ms": during["p95_ms"],
            "item_page_p50_ms": pages["p50_ms"], "item_page_p95_ms": pages["p95_ms"],
            "vote_errors": len(load["errors"]), "error_kinds": sorted({str(e) for e in load["errors"]}),
            "login_attempts": len(load["statuses"]), "acked_missing": missing,
            "timeline": load["timeline"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voters", type=int, default=50)
    parser.add_argument("--flood-threads", type=int, default=4)
    parser.add_argument("--import-items", type=int, default=100_000)
    parser.add_argument("--import-via", choices=("cli", "web"), default="cli")
    parser.add_argument("--think-seconds", type=float, default=2.0)
    parser.add_argument("--annotators", choices=("web", "api"), default="web",
                        help="web: the browser's pages and vote form (one write per vote: the vote and the "
                             "next claim); api: POST /api/.../next then /vote (two writes per vote)")
    parser.add_argument("--timeline", type=Path, help="write each vote's (start s, latency s) here as JSON")
    args = parser.parse_args()
    numbers = run(args.voters, args.flood_threads, args.import_items, args.import_via, args.think_seconds,
                  annotators=args.annotators)
    timeline = numbers.pop("timeline")
    if args.timeline:
        args.timeline.write_text(json.dumps(timeline))
    print(json.dumps(numbers))


if __name__ == "__main__":
    main()
