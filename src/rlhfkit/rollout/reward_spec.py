"""The `--reward` spec of the online recipes and the sources it names.

    gold | rm:PATH | format:REGEX | length[:MIN-MAX] | exact | code

each with an optional ':WEIGHT', joined by commas ('gold:1.0,length:0.1'). `parse_reward_spec`
checks a spec (configs call it when they are built, so a typo fails before a model loads);
`build_reward` turns it into one `WeightedRewards`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rlhfkit.config import ConfigError, did_you_mean
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import as_conversation
from rlhfkit.losses.reward import ensemble_reduce
from rlhfkit.models.device import inference_device
from rlhfkit.models.reward import load_trained_reward_model, score_responses
from rlhfkit.rollout.rewards import FunctionReward, RewardSource, Sample, WeightedRewards
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


class RewardModelSource:
    """A trained reward model (or an ensemble of heads) as a RewardSource: one scalar per
    (prompt, response), the heads combined by `ensemble_mode` (mean, min, mean_minus_std).

    The text is rendered with the reward model's own chat template, so its tokenizer need
    not match the policy's.
    """

    def __init__(self, path: str, *, ensemble_mode: str = "mean", batch_size: int = 16, name: str = "rm") -> None:
        self.model, self.tokenizer = load_trained_reward_model(path)
        self.model.to(inference_device())
        self.ensemble_mode, self.batch_size, self.name = ensemble_mode, batch_size, name

    def score(self, samples: Sequence[Sample]) -> list[float]:
        prompts = [s.meta.get("conversation") or as_conversation(s.prompt) for s in samples]
        members = score_responses(self.model, self.tokenizer, prompts, [s.response for s in samples],
                                  batch_size=self.batch_size)                     # (E, N)
        return ensemble_reduce(members, self.ensemble_mode).tolist()


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


@dataclass(frozen=True)
class RewardKind:
    """A --reward source: how to build it from its argument, and whether it takes one."""

    build: Callable[[str | None], RewardSource]
    argument: str         # "none", "optional" or "required"
    arg_name: str = ""    # shown in errors


REWARD_KINDS: dict[str, RewardKind] = {
    "gold": RewardKind(lambda arg: GoldReward(), "none"),
    "exact": RewardKind(lambda arg: ExactAnswerReward(), "none"),
    "code": RewardKind(lambda arg: CodeExecutionReward(), "none"),
    "format": RewardKind(lambda arg: FormatReward(arg), "required", "REGEX"),
    "length": RewardKind(_length_reward, "optional", "MIN-MAX"),
    "rm": RewardKind(lambda arg: RewardModelSource(arg), "required", "PATH"),
}
REWARD_SOURCES = tuple(sorted(REWARD_KINDS))
# A comma starts a new term only when a name follows (then ':' or the end), so a regex
# such as \d{1,3} keeps its comma, and a misspelled name is reported rather than swallowed.
_TERM_SPLIT = re.compile(r",(?=\s*[A-Za-z_]+\s*(?::|,|$))")
_WEIGHT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_reward_spec(spec: str) -> list[RewardTerm]:
    """'gold' | 'rm:PATH' | 'format:REGEX' | 'length[:MIN-MAX]' | 'exact' | 'code', each with an
    optional ':WEIGHT' (default 1), joined by commas: 'gold:1.0,length:0.1'. A regex or path
    that itself ends in ':<number>' needs an explicit weight after it."""
    spec = (spec or "").strip()
    if not spec:
        raise ConfigError("reward: empty spec; e.g. 'gold' or 'gold:1.0,length:0.1'")
    terms = []
    for raw in _TERM_SPLIT.split(spec):
        raw = raw.strip()
        name, _, rest = raw.partition(":")
        name = name.strip()
        if name not in REWARD_SOURCES:
            hint = did_you_mean(name, REWARD_SOURCES)
            raise ConfigError(f"reward: unknown source '{name}' in '{raw}' (choose from "
                              f"{', '.join(REWARD_SOURCES)}){hint}")
        kind = REWARD_KINDS[name]
        arg, weight = None, 1.0
        head, sep, tail = rest.rpartition(":")
        if kind.argument == "none" or (kind.argument == "optional" and _WEIGHT.fullmatch(rest.strip())):
            if rest and not _WEIGHT.fullmatch(rest.strip()):
                raise ConfigError(f"reward: '{raw}': expected '{name}' or '{name}:WEIGHT'")
            weight = float(rest) if rest else 1.0
        elif sep and _WEIGHT.fullmatch(tail.strip()):
            arg, weight = head, float(tail)
        else:
            arg = rest or None
        if kind.argument == "required" and not arg:
            raise ConfigError(f"reward: '{raw}' needs an argument: {name}:{kind.arg_name}")
        if name == "length" and arg is not None and not re.fullmatch(r"\d*-\d*|\d+", arg):
            raise ConfigError(f"reward: '{raw}': length takes MIN-MAX words (e.g. length:5-40) or a target (length:20)")
        if name == "format" and arg is not None:
            try:
                re.compile(arg)
            except re.error as e:
                raise ConfigError(f"reward: '{raw}': invalid regex: {e}") from None
        if not math.isfinite(weight):
            raise ConfigError(f"reward: '{raw}': weight must be finite")
        terms.append(RewardTerm(name, arg, weight))
    return terms


class _Named:
    """A source under another name (two terms of one kind need distinct names to be logged)."""

    def __init__(self, source: RewardSource, name: str):
        self.source, self.name = source, name

    def score(self, samples):
        return self.source.score(samples)


def build_reward(spec: str, *, normalize: bool = False) -> WeightedRewards:
    """The weighted combination a --reward spec names (see `parse_reward_spec`)."""
    sources: list[tuple[RewardSource, float]] = []
    seen: dict[str, int] = {}
    for term in parse_reward_spec(spec):
        source = REWARD_KINDS[term.source].build(term.arg)
        seen[term.source] = seen.get(term.source, 0) + 1
        name = term.source if seen[term.source] == 1 else f"{term.source}_{seen[term.source]}"
        sources.append((source if name == source.name else _Named(source, name), term.weight))
    return WeightedRewards(sources, normalize=normalize, name="reward")
