"""The code-execution sandbox: hostile programs are contained, scored 0, and leave nothing.

Each containment test runs twice where it can: with the audit hook (the in-process layer,
which then answers first) and without it (only the kernel layers: fresh uid, network and
mount namespaces, rlimits). Kernel-only runs are skipped where that layer is unavailable
(e.g. not root and no user namespaces); `run_python("pass").isolation` says what holds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import rlhfkit
from rlhfkit.rollout import sandbox
from rlhfkit.rollout.rewards import Sample
from rlhfkit.rollout.sandbox import run_python
from rlhfkit.rollout.verifiers import CodeExecutionReward

REPO = Path(rlhfkit.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def layers() -> set[str]:
    return set(run_python("pass").isolation)


def require(layers: set[str], *needed: str) -> None:
    missing = [n for n in needed if n not in layers]
    if missing:
        pytest.skip(f"kernel layer(s) {missing} not available here (have {sorted(layers)})")


def live_processes(*, uid: int | None = None, session: int | None = None) -> list[int]:
    """Non-zombie processes with this real uid, or in this session."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            fields = stat[stat.rindex(b")") + 2:].split()
            if fields[0] in (b"Z", b"X"):
                continue
            status = Path(f"/proc/{entry}/status").read_text()
            real_uid = int(next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1])
        except (OSError, ValueError, StopIteration):
            continue
        if (uid is not None and real_uid == uid) or (session is not None and int(fields[3]) == session):
            found.append(int(entry))
    return found


def test_runs_code_in_a_fresh_private_dir_and_removes_it(layers):
    result = run_python(
        "import os\n"
        "open('out.txt', 'w').write('kept')\n"
        "print(os.getcwd() == os.environ['HOME'], sorted(os.listdir('.')), open('out.txt').read())\n"
        "os.write(3, f'{os.getcwd()} {os.getuid()}'.encode())\n")
    assert result.ok and result.returncode == 0 and not result.timed_out
    assert result.stdout == "True ['out.txt'] kept\n"
    workdir, uid = result.report.split()
    assert not os.path.exists(workdir)                     # the temp dir is gone
    if os.geteuid() == 0:
        assert "fresh-uid" in layers and int(uid) not in (0, 65534)
    assert {"rlimits", "audit-hook", "no-new-privs"} <= layers


def test_infinite_loop_times_out_quickly():
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.timed_out and result.killed_reason == "timeout" and not result.ok
    assert result.returncode == -signal.SIGKILL
    assert 1.0 <= result.duration_s < 2.0 and time.monotonic() - start < 2.5


def test_cpu_limit_ends_a_busy_loop_before_the_wall_clock():
    result = run_python("while True:\n    pass", timeout_s=10.0, cpu_s=1)
    assert result.killed_reason == "cpu_time" and not result.timed_out and not result.ok
    assert result.duration_s < 5.0


def test_memory_hog_gets_memory_error():
    result = run_python("block = bytearray(2 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert not result.ok and "allocated" not in result.stdout
    assert "MemoryError" in result.stderr or result.killed_reason is not None


def test_fork_bomb_is_refused_by_the_audit_hook():
    result = run_python("import os\nwhile True:\n    os.fork()", timeout_s=2.0)
    assert not result.ok and not result.timed_out
    assert "creating processes is not allowed (os.fork)" in result.stderr


def test_fork_bomb_is_contained_by_rlimits_and_killed_to_the_last_process(layers):
    # Kernel layers only: the hook is off and forking allowed. RLIMIT_NPROC stops the
    # growth ("limit" reported), the wall clock stops the loop, and afterwards not one
    # process of the run is left (by its uid when it has its own, else by its session).
    code = ("import os\n"
            "os.write(3, f'{os.getuid()} {os.getsid(0)} {os.getcwd()}\\n'.encode())\n"
            "reported = False\n"
            "while True:\n"
            "    try:\n"
            "        os.fork()\n"
            "    except OSError:\n"
            "        if not reported:\n"
            "            reported = True\n"
            "            os.write(3, b'limit\\n')\n")
    result = run_python(code, timeout_s=1.5, max_processes=8, allow_subprocess=True,
                        audit_hook=False)
    assert result.timed_out and not result.ok
    first, *rest = result.report.splitlines()
    uid, session, workdir = first.split()
    assert "limit" in rest
    if "fresh-uid" in layers:
        assert live_processes(uid=int(uid)) == []
    assert live_processes(session=int(session)) == []
    assert not os.path.exists(workdir)


@pytest.fixture()
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(socket.timeout):
        conn, _ = server.accept()
        conn.close()


@pytest.mark.parametrize("hook", [True, False], ids=["audit-hook", "kernel-only"])
def test_network_connection_never_arrives(listener, layers, hook):
    if not hook:
        require(layers, "netns")
    port = listener.getsockname()[1]
    code = ("import socket\n"
            f"s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
            "s.sendall(b'escaped')\n"
            "print('connected')\n")
    result = run_python(code, timeout_s=3.0, audit_hook=hook)
    assert not result.ok and "connected" not in result.stdout
    assert_no_connection(listener)
    if hook:
        assert "network access is not allowed" in result.stderr
    else:
        assert "Network is unreachable" in result.stderr


@pytest.fixture()
def outside_dirs():
    """A root-style 0o755 dir and a world-writable 0o777 dir, both directly under /tmp."""
    made = []
    for mode in (0o755, 0o777):
        d = Path(tempfile.mkdtemp(prefix="sandbox-outside-"))
        d.chmod(mode)
        made.append(d)
    yield {"dir-755": made[0], "dir-777": made[1]}
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("target", ["dir-755", "dir-777", "repo", "home", "tmp"])
@pytest.mark.parametrize("hook", [True, False], ids=["audit-hook", "kernel-only"])
def test_writing_outside_the_work_dir_is_refused(outside_dirs, layers, target, hook):
    name = f"sandbox-escape-{uuid.uuid4().hex}"
    paths = {"repo": REPO / name, "home": Path.home() / name, "tmp": Path("/tmp") / name,
             **{k: d / name for k, d in outside_dirs.items()}}
    path = paths[target]
    if not hook:
        # A dir only its owner may write is protected by the fresh uid or the read-only
        # view; a world-writable one (/tmp, 0o777) only by the read-only view.
        if target in ("dir-777", "tmp"):
            require(layers, "readonly-fs")
        elif "fresh-uid" not in layers:
            require(layers, "readonly-fs")
    try:
        result = run_python(f"open({str(path)!r}, 'w').write('escaped')\nprint('written')",
                            audit_hook=hook)
        assert not result.ok and "written" not in result.stdout
        assert not path.exists()
        if hook:
            assert "writing outside the work dir is not allowed" in result.stderr
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("hook", [True, False], ids=["audit-hook", "kernel-only"])
def test_cannot_signal_the_parent(layers, hook):
    if not hook:
        require(layers, "fresh-uid")  # as the same user, only the hook stands in the way
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: received.append(True))
    try:
        result = run_python("import os, signal\nos.kill(os.getppid(), signal.SIGUSR1)\nprint('sent')",
                            audit_hook=hook)
        time.sleep(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert not result.ok and "sent" not in result.stdout and received == []
    assert "PermissionError" in result.stderr


def test_output_is_truncated_not_buffered():
    result = run_python("import sys\nsys.stdout.write('x' * 5_000_000)\nprint('done', file=sys.stderr)",
                        max_output_bytes=1000)
    assert result.ok and result.output_truncated
    assert result.stdout == "x" * 1000 and result.stderr == "done\n"


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        run_python("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb must be > 0"):
        run_python("pass", memory_mb=-1)


def test_hostile_solutions_score_zero_and_a_correct_one_scores_one(listener, outside_dirs):
    # Every program defines f() that does something hostile and then returns 1; the test
    # asserts f() == 1, so only a contained action yields 0.
    port = listener.getsockname()[1]
    escape = outside_dirs["dir-777"] / "escaped.txt"
    hostile = {
        "loop": "while True:\n        pass",
        "memory": "block = bytearray(2 * 1024 ** 3)",
        "fork": "while True:\n        os.fork()",
        "network": f"socket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "write": f"open({str(escape)!r}, 'w').write('x')",
        "kill parent": "os.kill(os.getppid(), signal.SIGKILL)",
    }
    header = "import os, signal, socket\n"
    samples = [Sample("q", f"{header}def f():\n    {body}\n    return 1", {"tests": ["assert f() == 1"]})
               for body in hostile.values()]
    samples.append(Sample("q", "```python\ndef f():\n    return 1\n```", {"tests": ["assert f() == 1"]}))
    reward = CodeExecutionReward(timeout_s=1.0, max_workers=len(samples))
    start = time.monotonic()
    outcomes = reward.evaluate(samples)
    scores = [o.passed / o.total for o in outcomes]
    assert dict(zip([*hostile, "correct"], scores)) == {**{k: 0.0 for k in hostile}, "correct": 1.0}
    assert outcomes[0].sandbox.timed_out
    assert time.monotonic() - start < 5.0
    assert_no_connection(listener)
    assert not escape.exists()


def test_non_root_user_is_contained_too(tmp_path):
    """The same checks under an ordinary user (uid 65534), where no fresh uid is possible."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to switch to an ordinary user")
    setpriv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # The venv's interpreter may live where uid 65534 cannot go (e.g. under /root): find
    # one that uid 65534 can start, and that can start itself (as run_python will).
    probe = "import subprocess, sys; subprocess.run([sys.argv[1], '-c', 'pass'], check=True)"
    python = next((p for p in ("/usr/bin/python3", sys.executable)
                   if os.path.exists(p) and subprocess.run(
                       [*setpriv, p, "-c", probe, p], capture_output=True).returncode == 0), None)
    if python is None:
        pytest.skip("no Python interpreter that uid 65534 may run")
    shared = Path(tempfile.mkdtemp(prefix="sandbox-nonroot-"))
    try:
        shared.chmod(0o777)
        module_dir = shared / "mod"
        module_dir.mkdir()
        shutil.copy(sandbox.__file__, module_dir / "sandbox.py")
        target = shared / "escaped.txt"
        driver = f"""
import json, socket, sys
sys.path.insert(0, {str(module_dir)!r})
import sandbox
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1); server.settimeout(0.3)
port = server.getsockname()[1]
out = {{}}
r = sandbox.run_python("while True: pass", timeout_s=1.0, python={python!r})
out["loop"] = [r.timed_out, r.isolation]
r = sandbox.run_python("open({str(target)!r}, 'w').write('x')", python={python!r})
out["write"] = [r.ok, "not allowed" in r.stderr]
connect = f"import socket\\nsocket.create_connection(('127.0.0.1', {{port}}), timeout=1)"
r = sandbox.run_python(connect, python={python!r})
try:
    server.accept(); arrived = True
except socket.timeout:
    arrived = False
out["network"] = [r.ok, arrived]
print(json.dumps(out))
"""
        proc = subprocess.run([*setpriv, python, "-c", driver], capture_output=True, text=True,
                              timeout=30, cwd=shared)
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        timed_out, isolation = out["loop"]
        assert timed_out and "fresh-uid" not in isolation and "audit-hook" in isolation
        assert out["write"] == [False, True] and not target.exists()
        assert out["network"] == [False, False]
    finally:
        shutil.rmtree(shared, ignore_errors=True)
