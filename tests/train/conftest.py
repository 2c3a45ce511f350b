"""Helpers shared by the training-machinery tests (the distributed ones launch subprocesses)."""

import json
import socket
from pathlib import Path


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
