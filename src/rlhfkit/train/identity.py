"""Which run a run folder holds, so that a rerun continues only that same run.

At the start of every run the engine writes `run.json` into the run folder: the recipe
(`cfg.kind`), the model, a fingerprint of each data file the config names, and the rest of
the config. A rerun into a folder that holds checkpoints or a final model compares itself with
that record before anything is loaded:

- the same run: resume from its latest checkpoint (or, when it finished, train nothing);
- another recipe, other settings or other data: refused with one line naming each difference
  and the ways out (a new --output-dir, or --no-resume, which moves the earlier run's outputs
  into `replaced-<time>/` inside the folder and starts over; nothing is deleted).

Fields a resumed run may change (`MAY_CHANGE`) are left out of the comparison: where and how
often it saves, logs and evaluates, how it shows progress, how far it trains (raising
max_steps trains on; the lr schedule then spans the new length), and how the same arithmetic is
executed (attention kernel, precision, log-prob chunking, generation batch), which a run resumed
on another machine may have to change. Everything else (hyper-parameters, seed, batch sizes,
data, model) defines the run: changing it mid-run would silently train a mixture of two runs.

A folder written before run identities has no run.json. Its config.yaml (written by every
earlier run) stands in for it, with data compared by path, as contents were not recorded; a
folder with neither is resumed with a warning, as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.config import Config, ConfigError
from rlhfkit.io import atomic_write_text
from rlhfkit.models.loading import TINY, resolve_model_path
from rlhfkit.train import checkpoint as ckpt

log = logging.getLogger(__name__)

IDENTITY_FILE = "run.json"
FINAL, FINAL_ADAPTER = "final", "final-adapter"
MAY_CHANGE = frozenset({
    "output_dir", "resume", "max_steps",                                   # where, whether, how far
    "save_every", "keep_checkpoints", "log_every", "eval_every", "tracker", "progress",  # observing
    "precision", "attention", "logprob_chunk", "gen_batch_size",          # executing the same math
})
# What a run writes into its folder (the engine's files and the recipes' reports): what
# --no-resume moves aside. A content-keyed cache (DPO's reference_logps.pt) stays: it is valid
# for any run.
RUN_OUTPUTS = ("checkpoints", FINAL, FINAL_ADAPTER, "metrics.jsonl", "config.yaml", IDENTITY_FILE,
               "data_report.json", "eval_report.json", "tensorboard", "wandb")
_MOVED_ASIDE = "replaced-<time>"


def data_fields(values: dict[str, Any]) -> list[str]:
    """The fields naming data: `*_data` and `prompts`."""
    return [k for k, v in values.items() if isinstance(v, str) and (k.endswith("_data") or k == "prompts")]


def fingerprint(value: str) -> dict[str, Any]:
    """{"path", "sha256"}: sha256 of a local file's bytes, or of a local folder's (name, size,
    mtime) list (a datasets folder can be gigabytes); None for a hub id, 'demo' or nothing."""
    path = Path(value).expanduser() if value else None
    digest = None
    if path is not None and path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    elif path is not None and path.is_dir():
        listing = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in sorted(path.rglob("*")) if p.is_file()]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return {"path": value, "sha256": digest}


def model_name(value: str) -> str:
    """A local model folder by its absolute path (the same folder from another working
    directory is the same model); anything else ('embedded', 'tiny', a hub id) as given."""
    path = Path(value).expanduser()
    return str(path.resolve()) if value and path.exists() else value


def adapter_base(model: str) -> str:
    """What a LoRA adapter names as its base: a local folder by absolute path, the embedded
    model by its cached checkpoint, a hub id as is ('tiny' has no folder to name)."""
    if model == TINY:
        return model
    path = Path(resolve_model_path(model)).expanduser()
    return str(path.resolve()) if path.exists() else model


def identity_of(cfg: Config) -> dict[str, Any]:
    """{"kind", "config", "data"}: what makes this run this run."""
    values = json.loads(json.dumps(cfg.to_dict()))  # tuples → lists, as read back from JSON
    data = {name: fingerprint(values.pop(name)) for name in data_fields(values)}
    config = {k: v for k, v in values.items() if k not in MAY_CHANGE}
    if isinstance(config.get("model"), str):
        config["model"] = model_name(config["model"])
    return {"kind": cfg.kind, "config": config, "data": data}


def read_identity(run_dir: Path) -> dict[str, Any] | None:
    """The identity recorded in run_dir: run.json, else one made from an older run's
    config.yaml (data by path only), else None."""
    path = run_dir / IDENTITY_FILE
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); pass --no-resume to start over in {run_dir} "
                              f"(the earlier run is moved into {run_dir}/{_MOVED_ASIDE}/)") from None
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return None
    if not isinstance(values, dict):
        return None
    kind = values.pop("recipe", None)
    data = {name: {"path": values.pop(name), "sha256": None} for name in data_fields(values)}
    config = {k: v for k, v in values.items() if k not in MAY_CHANGE}
    if isinstance(config.get("model"), str):
        config["model"] = model_name(config["model"])
    final = run_dir / FINAL
    finished = values.get("max_steps") if final.is_dir() else None
    return {"kind": kind, "config": config, "data": data, "finished_step": finished, "legacy": True}


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "[]"
    if v == "" or v is None:
        return "''"
    return str(v)


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """"lr: 1e-05 → 2e-05" for each setting that differs (a field one side lacks, from another
    rlhfkit version, is not compared); data files by contents when both sides have them."""
    out = []
    old_config = recorded.get("config", {})
    for k, new in current["config"].items():
        if k in old_config and old_config[k] != new:
            out.append(f"{k}: {_show(old_config[k])} → {_show(new)}")
    for k, new in current["data"].items():
        old = recorded.get("data", {}).get(k)
        if old is None:
            continue
        if old.get("sha256") and new["sha256"]:
            if old["sha256"] != new["sha256"]:
                out.append(f"{k}: {new['path']} has other contents" if old["path"] == new["path"]
                           else f"{k}: {_show(old['path'])} → {_show(new['path'])} (other contents)")
        elif old.get("path") != new["path"]:
            out.append(f"{k}: {_show(old.get('path'))} → {_show(new['path'])}")
    return out


def holds_run(run_dir: Path) -> bool:
    """Whether run_dir holds training worth protecting: a complete checkpoint or a final model."""
    return bool(ckpt.complete_checkpoints(run_dir)) or (run_dir / FINAL).is_dir()


@dataclass(frozen=True)
class Start:
    """How a run begins in its folder. action: "start" (from step 0), "resume" (from the latest
    checkpoint) or "finished" (the same run already finished: train nothing). replace: move the
    folder's earlier run aside first. finished_step: the step a finished run reached."""

    action: str
    replace: bool = False
    finished_step: int | None = None


def decide(cfg: Config, run_dir: Path, current: dict[str, Any]) -> Start:
    """Compare the run `cfg` describes (its `identity_of`, `current`) with what run_dir holds;
    ConfigError when they differ."""
    if not holds_run(run_dir):
        return Start("start")
    if not getattr(cfg, "resume", True):
        return Start("start", replace=True)
    recorded = read_identity(run_dir)
    if recorded is None:
        log.warning("%s has no %s (it was written before rlhfkit recorded runs): resuming it without checking "
                    "that it holds this run", run_dir, IDENTITY_FILE)
        return Start("resume")
    ways_out = (f"pass a new --output-dir for a new run, or --no-resume to start over in {run_dir} "
                f"(the earlier run is moved into {run_dir}/{_MOVED_ASIDE}/)")
    if recorded.get("kind") not in (None, current["kind"]):
        raise ConfigError(f"{run_dir} holds an earlier {recorded['kind']} run, not {current['kind']}: {ways_out}")
    changed = differences(recorded, current)
    if changed:
        raise ConfigError(f"{run_dir} holds an earlier {current['kind']} run with other settings "
                          f"({'; '.join(changed)}): resume it with its own settings, {ways_out}")
    if recorded.get("legacy"):
        log.info("%s has no %s: checked against its config.yaml (data files by path, not contents)",
                 run_dir, IDENTITY_FILE)
    finished = recorded.get("finished_step")
    final = run_dir / FINAL
    if finished is None or not final.is_dir():
        return Start("resume")
    max_steps = getattr(cfg, "max_steps", finished)
    if max_steps <= finished:
        log.warning("%s holds a finished %s run (%d steps; its model is %s): nothing to train. --no-resume trains "
                    "it again; a new --output-dir starts another run", run_dir, current["kind"], finished, final)
        return Start("finished", finished_step=finished)
    if not ckpt.complete_checkpoints(run_dir):
        raise ConfigError(f"{run_dir} holds a finished {current['kind']} run ({finished} steps; its model is {final}) "
                          f"with no checkpoint left to train on from: to reach step {max_steps}, start a new run "
                          f"from its model (--model {final} --output-dir NEW), or pass --no-resume to start over")
    log.warning("%s finished at step %d; training on to step %d from its latest checkpoint", run_dir, finished,
                max_steps)
    return Start("resume")


def move_aside(run_dir: Path) -> Path | None:
    """Move the earlier run's outputs into run_dir/replaced-<time>/; returns that folder."""
    present = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, n = run_dir / f"replaced-{stamp}", 1
    while dest.exists():
        n += 1
        dest = run_dir / f"replaced-{stamp}-{n}"
    dest.mkdir()
    for p in present:
        p.rename(dest / p.name)
    log.warning("--no-resume: moved the earlier run in %s to %s (delete it when it is no longer needed)",
                run_dir, dest)
    return dest


def record(identity: dict[str, Any], run_dir: Path, *, finished_step: int | None = None) -> None:
    """Write run.json: the run's identity (`identity_of`), and the step it finished at (None
    while it trains)."""
    body = {**identity, "finished_step": finished_step}
    atomic_write_text(run_dir / IDENTITY_FILE, json.dumps(body, indent=2) + "\n")
