"""The `--reward` spec of the online recipes and the sources it names.

    gold | exact | code | format:REGEX | length[:MIN-MAX]
    | rm:PATH[@mean|@min|@mean-Kstd] | prm:PATH | classifier:PATH[:LABEL]
    | judge[:JUDGE] | judge-ref[:JUDGE]        JUDGE = embedded | tiny | local:PATH | URL#MODEL

each with an optional ':WEIGHT' (negative for a penalty), joined by commas:
'gold:1.0,length:0.1', 'exact,classifier:/models/tox:toxic:-0.5'. `parse_reward_spec` checks
a spec (configs call it when they are built, so a typo fails before a model loads);
`build_reward` turns it into one `WeightedRewards`. The judge terms are built by
`rlhfkit.judge.reward` (a layer above this one), which hands its builders to `build_reward`.
Errors are one line naming the term: `--reward: term 'classifier:x': no such folder`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.config import ConfigError, did_you_mean
from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import looks_like_hub_id
from rlhfkit.data.schemas import as_conversation
from rlhfkit.losses.reward import ensemble_reduce
from rlhfkit.models.device import inference_device
from rlhfkit.models.loading import ModelNotFound
from rlhfkit.models.reward import load_sequence_classifier, load_trained_reward_model, score_responses
from rlhfkit.rollout.process_rewards import ProcessRewardSource
from rlhfkit.rollout.rewards import ClassifierReward, FunctionReward, RewardSource, Sample, WeightedRewards
from rlhfkit.rollout.verifiers import CodeExecutionReward, ExactAnswerReward, FormatReward, LengthReward
from rlhfkit.tasks.check import gold_reward


# ============================================================================ sources
class GoldReward:
    """The exact check each prompt carries: a demo task's checker, `tests` run in the
    sandbox, or an exact `answer`. A prompt with none of them is a DataError."""

    name = "gold"

    def __init__(self) -> None:
        self._by_kind: dict[str, RewardSource] = {
            "task": FunctionReward("task", _demo_gold),
            "tests": CodeExecutionReward(),
            "answer": ExactAnswerReward(),
        }

    def score(self, samples: Sequence[Sample]) -> list[float]:
        kinds: dict[str, list[int]] = {}
        for i, s in enumerate(samples):
            kind = next((k for k in self._by_kind if s.meta.get(k) is not None), None)
            if kind is None:
                task = s.meta.get("task_id")
                raise DataError(f"sample {i}{f' (task {task})' if task is not None else ''} has nothing to "
                                "check against: give 'answer' or 'tests', or use another --reward", field="answer")
            kinds.setdefault(kind, []).append(i)
        out = [0.0] * len(samples)
        for kind, rows in kinds.items():
            for i, v in zip(rows, self._by_kind[kind].score([samples[i] for i in rows])):
                out[i] = float(v)
        return out


def _demo_gold(sample: Sample) -> float:
    return gold_reward(sample.meta["task"], sample.response)


@dataclass(frozen=True)
class EnsembleReduction:
    """How an ensemble's E rewards become one: `mode` of `losses.reward.ensemble_reduce`
    (mean, min, mean_minus_std) and its k (mean − k·std)."""

    mode: str = "mean"
    k: float = 1.0

    def __str__(self) -> str:
        return f"mean-{self.k:g}std" if self.mode == "mean_minus_std" else self.mode


_REDUCTION = re.compile(r"(mean|min)|mean-(\d+\.?\d*|\.\d+)?std")


def parse_reduction(text: str) -> EnsembleReduction:
    """'mean' | 'min' | 'mean-Kstd' ('mean-std' is K = 1) → an `EnsembleReduction`."""
    m = _REDUCTION.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"unknown ensemble reduction '{text}' (use mean, min or mean-Kstd, e.g. mean-1.0std)")
    if m.group(1):
        return EnsembleReduction(m.group(1))
    return EnsembleReduction("mean_minus_std", float(m.group(2)) if m.group(2) else 1.0)


def split_reduction(arg: str) -> tuple[str, EnsembleReduction]:
    """'PATH@REDUCTION' → (PATH, reduction); a plain PATH (or one whose '@' is part of a folder
    name, i.e. followed by a '/') reduces by the mean."""
    path, at, tail = arg.rpartition("@")
    if not at or "/" in tail:
        return arg, EnsembleReduction()
    return path, parse_reduction(tail)


class RewardModelSource:
    """A trained reward model (or an ensemble of heads) as a RewardSource: one scalar per
    (prompt, response), the heads combined by `ensemble_mode` (mean, min, mean_minus_std;
    mean − k·std with `k`).

    The text is rendered with the reward model's own chat template, so its tokenizer need
    not match the policy's.
    """

    def __init__(self, path: str, *, ensemble_mode: str = "mean", k: float = 1.0, batch_size: int = 16,
                 name: str = "rm") -> None:
        self.model, self.tokenizer = load_trained_reward_model(path)
        if ensemble_mode == "mean_minus_std" and self.model.n_heads < 2:
            raise ValueError(f"mean-{k:g}std needs an ensemble of at least 2 heads; {path} has {self.model.n_heads}")
        self.model.to(inference_device())
        self.ensemble_mode, self.k, self.batch_size, self.name = ensemble_mode, k, batch_size, name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        prompts = [s.meta.get("conversation") or as_conversation(s.prompt) for s in samples]
        members = score_responses(self.model, self.tokenizer, prompts, [s.response for s in samples],
                                  batch_size=self.batch_size)                     # (E, N)
        return ensemble_reduce(members, self.ensemble_mode, self.k).tolist()


def _reward_model(arg: str | None) -> RewardSource:
    path, reduction = split_reduction(arg or "")
    return RewardModelSource(path, ensemble_mode=reduction.mode, k=reduction.k)


def split_classifier_arg(arg: str) -> tuple[str, int | str | None]:
    """'PATH[:LABEL]' → (PATH, LABEL): a label index when it is digits, a label name otherwise,
    None when absent."""
    path, colon, label = arg.rpartition(":")
    if not colon or not label or "/" in label:
        return arg, None
    return path, int(label) if label.isdigit() else label


def _classifier(arg: str | None) -> RewardSource:
    path, label = split_classifier_arg(arg or "")
    if not Path(path).is_dir() and not looks_like_hub_id(path):
        raise ValueError("no such folder")
    model, tokenizer = load_sequence_classifier(path)
    if label is None:
        labels = model.config.num_labels
        if labels > 2:
            names = [model.config.id2label.get(i, str(i)) for i in range(labels)]
            raise ValueError(f"the classifier has {labels} labels {names}: name one, classifier:PATH:LABEL")
        label = labels - 1  # the one output, or the positive class of a binary classifier
    return ClassifierReward(model.to(inference_device()), tokenizer, label=label)


def _length_reward(arg: str | None) -> RewardSource:
    if arg is None:
        return LengthReward(max_words=50)
    if "-" not in arg:
        return LengthReward(target_words=int(arg))
    lo, hi = arg.split("-")
    return LengthReward(min_words=int(lo) if lo else None, max_words=int(hi) if hi else None)


# ============================================================================ the spec
@dataclass(frozen=True)
class RewardTerm:
    """One term of a --reward spec: source name, its argument (or None), weight."""

    source: str
    arg: str | None
    weight: float
    text: str = ""        # the term as written, for errors


@dataclass(frozen=True)
class RewardKind:
    """A --reward source: how to build it from its argument (None: built by a higher layer,
    see `build_reward`'s `builders`), and whether it takes one."""

    build: Callable[[str | None], RewardSource] | None
    argument: str         # "none", "optional" or "required"
    arg_name: str = ""    # shown in errors


REWARD_KINDS: dict[str, RewardKind] = {
    "gold": RewardKind(lambda arg: GoldReward(), "none"),
    "exact": RewardKind(lambda arg: ExactAnswerReward(), "none"),
    "code": RewardKind(lambda arg: CodeExecutionReward(), "none"),
    "format": RewardKind(lambda arg: FormatReward(arg), "required", "REGEX"),
    "length": RewardKind(_length_reward, "optional", "MIN-MAX"),
    "rm": RewardKind(_reward_model, "required", "PATH[@mean|@min|@mean-Kstd]"),
    "prm": RewardKind(lambda arg: ProcessRewardSource(arg or ""), "required", "PATH"),
    "classifier": RewardKind(_classifier, "required", "PATH[:LABEL]"),
    "judge": RewardKind(None, "optional", "embedded|tiny|local:PATH|URL#MODEL"),
    "judge-ref": RewardKind(None, "optional", "embedded|tiny|local:PATH|URL#MODEL"),
}
REWARD_SOURCES = tuple(sorted(REWARD_KINDS))
# A comma starts a new term only when a name follows (then ':' or the end), so a regex
# such as \d{1,3} keeps its comma, and a misspelled name is reported rather than swallowed.
_TERM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z_-]*\s*(?::|,|$))")
_WEIGHT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _term_error(raw: str, message: str) -> ConfigError:
    return ConfigError(f"--reward: term '{raw}': {message}")


def _check_arg(name: str, arg: str, raw: str) -> None:
    """Argument checks that need no model: they run when a config is built."""
    if name == "length" and not re.fullmatch(r"\d*-\d*|\d+", arg):
        raise _term_error(raw, "length takes MIN-MAX words (e.g. length:5-40) or a target (length:20)")
    if name == "format":
        try:
            re.compile(arg)
        except re.error as e:
            raise _term_error(raw, f"invalid regex: {e}") from None
    if name == "rm":
        try:
            path, _ = split_reduction(arg)
        except ValueError as e:
            raise _term_error(raw, str(e)) from None
        if not path:
            raise _term_error(raw, "needs a reward model folder before '@'")
    if name == "classifier" and not split_classifier_arg(arg)[0]:
        raise _term_error(raw, "needs a classifier folder: classifier:PATH[:LABEL]")
    if name in ("judge", "judge-ref"):
        if arg.startswith(("http://", "https://")):
            if not arg.partition("#")[2].strip():
                raise _term_error(raw, f"an HTTP judge needs the model it serves: {name}:URL#MODEL "
                                       f"(e.g. {name}:http://localhost:8000/v1#qwen)")
        elif arg not in ("embedded", "tiny") and not (arg.startswith("local:") and arg[6:]):
            raise _term_error(raw, f"the judge is embedded, tiny, local:PATH or an http(s) URL#MODEL, not '{arg}'")


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """Terms joined by commas, each `NAME[:ARG][:WEIGHT]` (weight default 1; see the module
    docstring for the names): 'gold:1.0,length:0.1', 'rm:runs/rm@min:0.5'. An argument that
    itself ends in ':<number>' (a regex, a port, a label index) needs an explicit weight after it."""
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError("--reward: empty spec; e.g. 'gold' or 'gold:1.0,length:0.1'")
    terms = []
    for raw in _TERM_SPLIT.split(spec):
        raw = raw.strip()
        name, _, rest = raw.partition(":")
        name = name.strip()
        if name not in REWARD_SOURCES:
            hint = did_you_mean(name, REWARD_SOURCES)
            raise _term_error(raw, f"unknown source '{name}' (choose from {', '.join(REWARD_SOURCES)}){hint}")
        kind = REWARD_KINDS[name]
        arg, weight = None, 1.0
        head, sep, tail = rest.rpartition(":")
        if kind.argument == "none" or (kind.argument == "optional" and _WEIGHT.fullmatch(rest.strip())):
            if rest and not _WEIGHT.fullmatch(rest.strip()):
                raise _term_error(raw, f"expected '{name}' or '{name}:WEIGHT'")
            weight = float(rest) if rest else 1.0
        elif sep and _WEIGHT.fullmatch(tail.strip()):
            arg, weight = head, float(tail)
        else:
            arg = rest or None
        if kind.argument == "required" and not arg:
            raise _term_error(raw, f"needs an argument: {name}:{kind.arg_name}")
        if arg is not None:
            _check_arg(name, arg, raw)
        if not math.isfinite(weight):
            raise _term_error(raw, "weight must be finite")
        terms.append(RewardTerm(name, arg, weight, raw))
    return terms


class _Named:
    """A source under another name (two terms of one kind need distinct names to be logged)."""

    def __init__(self, source: RewardSource, name: str):
        self.source, self.name = source, name

    def score(self, samples):
        return self.source.score(samples)


RewardBuilders = Mapping[str, Callable[[str | None], RewardSource]]


def build_reward(spec: str, *, normalize: bool = False, builders: RewardBuilders | None = None) -> WeightedRewards:
    """The weighted combination a --reward spec names (see `parse_reward_spec`).

    `builders` adds the sources this layer cannot build, by name: the judge terms, from
    `rlhfkit.judge.reward.JUDGE_REWARD_BUILDERS`. A source that fails to load (no such folder,
    not a classifier, an unknown label) is a one-line ConfigError naming its term.
    """
    sources: list[tuple[RewardSource, float]] = []
    seen: dict[str, int] = {}
    for term in parse_reward_spec(spec):
        build = (builders or {}).get(term.source) or REWARD_KINDS[term.source].build
        if build is None:
            raise _term_error(term.text, "judge rewards are built by rlhfkit.judge.reward: pass "
                                         "builders=JUDGE_REWARD_BUILDERS to build_reward")
        try:
            source = build(term.arg)
        except (ConfigError, ModelNotFound, OSError, ValueError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise _term_error(term.text, message.removeprefix(f"--reward: term '{term.text}': ")) from None
        seen[term.source] = seen.get(term.source, 0) + 1
        name = term.source if seen[term.source] == 1 else f"{term.source}_{seen[term.source]}"
        sources.append((source if name == source.name else _Named(source, name), term.weight))
    return WeightedRewards(sources, normalize=normalize, name="reward")
