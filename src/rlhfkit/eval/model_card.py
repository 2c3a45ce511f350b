"""A trained model as others receive it: one folder with the model and a model card (README.md).

The card is written from what the run recorded in its folder, never from memory: the recipe,
model, data fingerprints and settings of `run.json` (`train.identity`), the last value of each
metric in `metrics.jsonl`, and the reward model's held-out `eval_report.json`. Its YAML front
matter is the Hugging Face Hub's (library_name, base_model, tags, datasets, pipeline_tag).

    files = locate("runs/dpo")              # the run's final/ model, its LoRA adapter, its records
    card = render_card(card_facts(files), where="me/my-model")
    export(files, card, Path("out/my-model"))   # a local folder, written atomically
    push_to_hub(files, card, "me/my-model")     # or a Hub repo (huggingface_hub.HfApi.upload_folder)

The folder holds the model at its top (so `from_pretrained(folder)` loads it), a LoRA run's
adapter in `adapter/`, and the run's records (run.json, config.yaml, metrics.jsonl, reports)
in `training/`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError, HTTPError
from huggingface_hub.utils import validate_repo_id

from rlhfkit import __version__
from rlhfkit.config import ConfigError
from rlhfkit.data.readers import looks_like_hub_id
from rlhfkit.io import atomic_dir
from rlhfkit.models.loading import EMBEDDED, TINY, ModelNotFound, looks_like_path
from rlhfkit.train import checkpoint as ckpt
from rlhfkit.train.identity import FINAL, FINAL_ADAPTER, IDENTITY_FILE, read_identity
from rlhfkit.train.metrics import read_metrics

# The Hub model the embedded GGUF checkpoint was quantized from.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The run's records copied beside the model, into training/.
RUN_RECORDS = (IDENTITY_FILE, "config.yaml", "metrics.jsonl", "data_report.json", "eval_report.json")
TRAINING_DIR, ADAPTER_DIR, CARD = "training", "adapter", "README.md"
# Logged every step but not a result of training.
BOOKKEEPING = frozenset({"step", "units", "tokens", "tokens_per_s", "samples_per_s", "lr", "grad_norm", "time",
                         "wall_s", "epoch"})
_LINEAGE_DEPTH = 8

# recipe (or preference loss) → (name, objective in one line).
OBJECTIVES: dict[str, tuple[str, str]] = {
    "sft": ("supervised fine-tuning", "L = −Σ_t log π_θ(y_t | x, y_<t) over the assistant tokens"),
    "rm": ("Bradley–Terry reward model", "L = −log σ(r(x, y_c) − r(x, y_r)), ties as soft labels"),
    "dpo": ("DPO", "L = −log σ(β·h), h = (log π_θ − log π_ref)(y_c) − (log π_θ − log π_ref)(y_r)"),
    "ipo": ("IPO", "L = (h − 1/(2β))², h the DPO log-ratio difference"),
    "hinge": ("hinge (SLiC)", "L = max(0, 1 − β·h), h the DPO log-ratio difference"),
    "robust": ("robust DPO", "DPO's loss corrected for labels flipped with a known rate ε"),
    "simpo": ("SimPO", "L = −log σ(β/|y_c|·log π_θ(y_c) − β/|y_r|·log π_θ(y_r) − γ), no reference"),
    "orpo": ("ORPO", "L = NLL(y_c) − λ·log σ(log odds(y_c) − log odds(y_r)), no reference"),
    "kto": ("KTO", "L = λ_D·(1 − σ(β(r − z₀))) for desirable, λ_U·(1 − σ(β(z₀ − r))) for undesirable examples"),
    "ppo": ("PPO (InstructGPT)", "clipped surrogate min(ρA, clip(ρ, 1 ± ε)A), per-token KL penalty to the "
                                 "reference in the reward, GAE advantages, clipped value loss"),
    "grpo": ("GRPO", "clipped surrogate with group-normalized advantages A = (r − mean_group r) / std_group r, "
                     "KL to the reference in the loss"),
    "rloo": ("RLOO", "REINFORCE with the leave-one-out baseline A_i = r_i − mean_{j≠i} r_j"),
    "remax": ("ReMax", "REINFORCE with the greedy decode's reward as the baseline"),
    "reinforce": ("REINFORCE", "policy gradient with a moving-average reward baseline"),
    "online_dpo": ("online DPO (OAIF)", "a DPO-family loss on the best and worst of k fresh samples per prompt"),
    "expert-iter": ("expert iteration", "rounds of best-of-n sampling, then SFT on the kept best"),
}


@dataclass(frozen=True)
class RunFiles:
    """What is pushed: `model` (a loadable Hugging Face folder), the LoRA `adapter` beside it,
    and the `run_dir` whose records describe both (None for a bare model folder)."""

    model: Path
    run_dir: Path | None = None
    adapter: Path | None = None


def _is_model(path: Path) -> bool:
    return (path / "config.json").is_file()


def _is_run(path: Path) -> bool:
    return any((path / name).exists() for name in (IDENTITY_FILE, "config.yaml", FINAL, "metrics.jsonl"))


def locate(source: str | Path) -> RunFiles:
    """The run or model that `source` names: a run folder (runs/sft), its final/ or
    final-adapter/, or any model folder. ModelNotFound (a one-line message) otherwise."""
    src = Path(source).expanduser()
    if not src.exists():
        raise ModelNotFound(f"{source}: no such run or model folder")
    if not src.is_dir():
        raise ModelNotFound(f"{source} is a file; give a run folder (e.g. runs/sft) or a model folder")
    if src.name in (FINAL, FINAL_ADAPTER) and _is_run(src.parent):
        src = src.parent
    elif _is_model(src):
        return RunFiles(model=src)
    if not _is_run(src):
        hint = " (a LoRA adapter alone: push the run folder that holds it)" if (src / "adapter_config.json").exists() \
            else ""
        raise ModelNotFound(f"{source} is neither a run folder (run.json, final/) nor a model folder "
                            f"(config.json){hint}")
    final = src / FINAL
    if not _is_model(final):
        saved = ckpt.complete_checkpoints(src)
        if saved:
            raise ConfigError(f"{src} has no final model yet: its latest checkpoint is {saved[0].name}; rerun the "
                              f"same training command to finish it, then push")
        raise ModelNotFound(f"{src} has no final model ({final}/config.json is missing)")
    adapter = src / FINAL_ADAPTER
    return RunFiles(model=final, run_dir=src, adapter=adapter if adapter.is_dir() else None)


def _shown(path: str) -> str:
    """A local path as the user would type it: relative to the working directory when inside it."""
    p = Path(path)
    if p.is_absolute():
        rel = os.path.relpath(p)
        return rel if not rel.startswith("..") else str(p)
    return path


def lineage(model: str | None) -> list[tuple[str, str | None]]:
    """The models a run started from, nearest first, with the recipe of the run that made each
    (None for one not made here), following local run folders back: a DPO run on an SFT run
    gives [("runs/sft/final", "sft"), ("HuggingFaceTB/SmolLM2-360M-Instruct", None)]."""
    chain: list[tuple[str, str | None]] = []
    while model and len(chain) < _LINEAGE_DEPTH:
        path = Path(model).expanduser()
        run = path.parent if path.name == FINAL else None
        recorded = read_identity(run) if run is not None and path.is_dir() else None
        chain.append((_shown(model) if path.exists() else model, recorded and recorded.get("kind")))
        if recorded is None:
            break
        model = recorded.get("config", {}).get("model")
    return chain


def _loadable(model: str) -> str:
    """What `from_pretrained` takes for a recorded model: the embedded one is its Hub original."""
    return EMBEDDED_HUB_ID if model == EMBEDDED else model


def hub_base_model(origin: str | None) -> str | None:
    """The Hub id a model was trained from (for the card's base_model), None when it has none."""
    if origin == EMBEDDED:
        return EMBEDDED_HUB_ID
    if not origin or origin == TINY or Path(origin).expanduser().exists() or looks_like_path(origin):
        return None
    return origin if "/" in origin else None


def final_metrics(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int | None]]:
    """metric → (its last logged value, the step it was logged at), bookkeeping left out."""
    out: dict[str, tuple[float, int | None]] = {}
    for row in rows:
        for k, v in row.items():
            if k not in BOOKKEEPING and isinstance(v, (int, float, str)) and not isinstance(v, bool):
                out[k] = (v, row.get("step"))
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class CardFacts:
    """Everything the card states, read from the run folder."""

    kind: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    data: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int | None = None
    lineage: list[tuple[str, str | None]] = field(default_factory=list)
    metrics: dict[str, tuple[float, int | None]] = field(default_factory=dict)
    eval_report: dict[str, Any] = field(default_factory=dict)
    adapter: bool = False
    reward_model: bool = False

    @property
    def loss(self) -> str | None:
        """The preference loss of a DPO-family run."""
        return self.config.get("loss") if self.kind in ("dpo", "online_dpo") else None

    @property
    def base_model(self) -> str | None:
        return hub_base_model(self.lineage[-1][0] if self.lineage else None)

    @property
    def datasets(self) -> list[str]:
        return [d["path"] for d in self.data.values()
                if d.get("path") and looks_like_hub_id(d["path"]) and not Path(d["path"]).exists()]


def card_facts(files: RunFiles) -> CardFacts:
    """Read what the run recorded (a bare model folder gives an almost empty card)."""
    facts = CardFacts(adapter=files.adapter is not None,
                      reward_model="ForSequenceClassification" in json.dumps(
                          (_read_json(files.model / "config.json") or {}).get("architectures", [])))
    if files.run_dir is None:
        return facts
    recorded = read_identity(files.run_dir) or {}
    facts.kind = recorded.get("kind")
    facts.config = dict(recorded.get("config", {}))
    facts.data = {k: v for k, v in recorded.get("data", {}).items() if v.get("path")}
    facts.steps = recorded.get("finished_step")
    facts.lineage = lineage(facts.config.get("model"))
    facts.metrics = final_metrics(read_metrics(files.run_dir))
    report = _read_json(files.run_dir / "eval_report.json") or {}
    facts.eval_report = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return facts


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(str, v)) or "–"
    return "–" if v in ("", None) else str(v)


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
    return [cells(header), "|" + "---|" * len(header), *map(cells, rows), ""]


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The card's YAML header, as the Hub reads it."""
    tags = ["rlhfkit"]
    tags += [facts.kind] if facts.kind else []
    tags += [facts.loss] if facts.loss not in (None, facts.kind) else []
    tags += ["lora"] if facts.adapter else []
    tags += ["reward-model"] if facts.reward_model else []
    meta: dict[str, Any] = {"library_name": "transformers"}
    if facts.base_model:
        meta["base_model"] = facts.base_model
    meta["tags"] = tags
    if facts.datasets:
        meta["datasets"] = facts.datasets
    meta["pipeline_tag"] = "text-classification" if facts.reward_model else "text-generation"
    return meta


def _how_to_load(facts: CardFacts, where: str) -> list[str]:
    cls = "AutoModelForSequenceClassification" if facts.reward_model else "AutoModelForCausalLM"
    lines = ["## How to load it", "", "```python", f"from transformers import AutoTokenizer, {cls}", "",
             f'model = {cls}.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
             "```", ""]
    if facts.adapter:
        base = _loadable(facts.lineage[0][0]) if facts.lineage else "BASE_MODEL"
        lines += ["The model above has the LoRA adapter merged in. The adapter alone is in `adapter/`, for the "
                  "model this run started from:", "",
                  "```python", "from peft import PeftModel", "",
                  f'base = {cls}.from_pretrained("{base}")',
                  f'model = PeftModel.from_pretrained(base, "{where}", subfolder="{ADAPTER_DIR}")', "```", ""]
    if facts.reward_model:
        lines += ["With rlhfkit: `rlhf rm score --model " + where + " --data responses.jsonl --out scored.jsonl`", ""]
    else:
        lines += ["With rlhfkit: `rlhf chat --model " + where + "` or `rlhf eval --model " + where + "`", ""]
    return lines


def _describe(model: str, kind: str | None) -> str:
    if kind:
        return f"`{model}` (from the `{kind}` recipe)"
    if model == EMBEDDED:
        return f"`{model}` ({EMBEDDED_HUB_ID}, de-quantized from its Q4_1 GGUF)"
    return f"`{model}`"


def objective(facts: CardFacts) -> tuple[str, str]:
    """(the recipe's name, its objective in one line); a DPO-family run is named by its loss."""
    name, equation = OBJECTIVES.get(facts.kind or "", (facts.kind or "unknown recipe", ""))
    if facts.loss in OBJECTIVES:
        loss_name, equation = OBJECTIVES[facts.loss]
        name = loss_name if facts.kind == "dpo" else f"{name} with the {loss_name} loss"
    return name, equation


def render_card(facts: CardFacts, *, where: str) -> str:
    """README.md: the front matter, then what was trained, on what, how, to what result, and
    how to load it from `where` (the Hub id or folder it is pushed to)."""
    name, equation = objective(facts)
    title = Path(where).name if looks_like_path(where) or "/" not in where else where.split("/", 1)[1]
    lines = ["---", yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).strip(), "---", "",
             f"# {title}", ""]
    if facts.kind is None:
        lines += ["A model pushed with rlhfkit. It came without a run folder, so how it was trained is not "
                  "recorded here.", ""]
    else:
        trained = f", {facts.steps} optimizer steps" if facts.steps is not None else ""
        lines += [f"Trained with rlhfkit's `{facts.kind}` recipe: **{name}**{trained}.", ""]
        if equation:
            lines += [f"Objective: {equation}.", ""]
        lines += ["## Base model", ""]
        said = [_describe(m, kind) for m, kind in facts.lineage] or ["not recorded"]
        lines += [f"Started from {said[0]}" + "".join(f", trained from {m}" for m in said[1:]) + "."]
        if facts.base_model:
            lines += [f"On the Hub: [{facts.base_model}](https://huggingface.co/{facts.base_model})."]
        lines += [""]
    if facts.data:
        lines += ["## Data", "", "SHA-256 of each file's bytes as read at the start of training "
                  "(of a folder's file listing; none for a Hub dataset).", ""]
        lines += _table(("field", "source", "sha256"),
                        [(k, f"`{d['path']}`", f"`{d['sha256']}`" if d.get("sha256") else "–")
                         for k, d in facts.data.items()])
    if facts.config:
        lines += ["## Training settings", "", "The settings that define the run (its `run.json`); the rest of "
                  "the config is in `training/config.yaml`.", ""]
        lines += _table(("setting", "value"), [(k, _value(v)) for k, v in facts.config.items() if k != "model"])
    if facts.metrics or facts.eval_report:
        lines += ["## Results", ""]
        if facts.metrics:
            lines += ["The last logged value of each metric (`training/metrics.jsonl` has every step).", ""]
            lines += _table(("metric", "value", "step"), [(k, _value(v), _value(s)) for k, (v, s)
                                                           in facts.metrics.items()])
        if facts.eval_report:
            lines += ["Held-out evaluation (`training/eval_report.json`):", ""]
            lines += _table(("metric", "value"), [(k, _value(v)) for k, v in facts.eval_report.items()])
    lines += _how_to_load(facts, where)
    lines += ["---", f"Written by rlhfkit {__version__} (`rlhf push`).", ""]
    return "\n".join(lines)


def stage(files: RunFiles, card: str, folder: Path) -> None:
    """Write the card, the model, the adapter and the run's records into `folder`."""
    shutil.copytree(files.model, folder, dirs_exist_ok=True)
    if files.adapter is not None:
        shutil.copytree(files.adapter, folder / ADAPTER_DIR)
    if files.run_dir is not None:
        records = [files.run_dir / n for n in RUN_RECORDS if (files.run_dir / n).is_file()]
        if records:
            (folder / TRAINING_DIR).mkdir(exist_ok=True)
        for p in records:
            shutil.copy2(p, folder / TRAINING_DIR / p.name)
    (folder / CARD).write_text(card)


def _inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b)


def export(files: RunFiles, card: str, dest: Path, *, overwrite: bool = False) -> Path:
    """Write the pushed folder at `dest`, atomically: a reader sees no folder or the whole one.
    A non-empty existing folder is replaced only with `overwrite`."""
    dest = Path(dest).expanduser()
    sources = [p for p in (files.run_dir, files.model, files.adapter) if p is not None]
    if any(_inside(dest, s) or _inside(s, dest) for s in sources):
        raise ConfigError(f"--to {dest} overlaps the run it pushes ({sources[0]}); choose a folder outside it")
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"--to {dest} is a file; give a folder (a new one, or an empty one)")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ConfigError(f"--to {dest} is not empty; choose a new folder, or pass --overwrite to replace it")
    with atomic_dir(dest) as tmp:
        stage(files, card, tmp)
    return dest


def is_hub_target(target: str) -> bool:
    """Whether `--to` names a Hub repo `owner/name` rather than a local folder (`./owner/name`
    forces a folder)."""
    if target.count("/") != 1 or looks_like_path(target) or Path(target).expanduser().exists():
        return False
    try:
        validate_repo_id(target)
    except HFValidationError:
        return False
    return True


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def push_to_hub(files: RunFiles, card: str, repo_id: str, *, private: bool = False,
                message: str | None = None) -> str:
    """Create (if new) the Hub model repo `repo_id` and upload the pushed folder in one commit;
    returns the commit's URL. A repo that exists gets a new commit on top of its files."""
    if _offline():
        raise ConfigError(f"cannot push to the Hub repo {repo_id}: HF_HUB_OFFLINE is set (push to a local folder "
                          f"with --to ./{repo_id}, or unset it)")
    if get_token() is None:
        raise ConfigError(f"cannot push to the Hub repo {repo_id}: no Hugging Face token (run `hf auth login` "
                          f"or set HF_TOKEN; for a local folder: --to ./{repo_id})")
    api = HfApi()
    with tempfile.TemporaryDirectory(prefix="rlhf-push-") as tmp:
        stage(files, card, Path(tmp))
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                     commit_message=message or "rlhf push")
        except (HTTPError, OSError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"push to the Hub repo {repo_id} failed: {reason}") from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
