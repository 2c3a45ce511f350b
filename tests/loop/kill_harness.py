"""Run a loop in this process and SIGKILL it at one point: the fault tests' subject.

    python kill_harness.py CONFIG_JSON POINT

POINT: sampling (responses generated, not yet written), labeling (the round's pairs are in
the labeling app, the registry not yet told), training (after the first of several
checkpoints), registration (the round's row committed, its step not yet recorded), or none.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from rlhfkit.loop import runner
from rlhfkit.loop.config import LoopConfig
from rlhfkit.loop.registry import Registry
from rlhfkit.loop.runner import WaitingForLabels, run_loop
from rlhfkit.train import checkpoint


def die_after(owner, name: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, wrapped)


POINTS = {"sampling": (runner, "sample_candidates"), "labeling": (runner, "send_to_labeling_app"),
          "training": (checkpoint, "save_checkpoint"), "registration": (Registry, "register_round")}

if __name__ == "__main__":
    cfg = LoopConfig(**json.loads(sys.argv[1]))
    if sys.argv[2] != "none":
        die_after(*POINTS[sys.argv[2]])
    try:
        run_loop(cfg)
    except WaitingForLabels:
        sys.exit(3)
