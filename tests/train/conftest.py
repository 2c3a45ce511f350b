"""Helpers shared by the training-machinery tests (the distributed ones launch subprocesses)."""

import contextlib
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil


def addition_sft_data(path: Path, n: int = 48) -> Path:
    """`n` SFT examples "Add i and i % 7." → the sum, written to `path` as JSONL."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Add {i} and {i % 7}.",
                                "completion": f"{i} + {i % 7} = {i + i % 7}.\nAnswer: {i + i % 7}"}) + "\n")
    return path


def free_port() -> int:
    """A free localhost port for a rendezvous (torchrun, accelerate launch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def kill_after_checkpoint(cmd: list[str], run: Path, step: int, *, env: dict[str, str] | None = None,
                          timeout_s: float = 300) -> None:
    """Start a distributed run, SIGKILL it (launcher and every worker: torch elastic starts the
    workers in sessions of their own) as soon as its step-`step` checkpoint is complete."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    done = run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json"
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and proc.poll() is None and not done.exists():
            time.sleep(0.01)
    finally:
        for child in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
