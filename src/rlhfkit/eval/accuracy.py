"""Gold exact-match accuracy on the checkable tasks (greedy decoding)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit.data.schemas import as_conversation
from rlhfkit.eval.winrate import win_rate
from rlhfkit.rollout.generate import SamplingConfig, generate
from rlhfkit.tasks.check import check
from rlhfkit.tasks.generate import Task


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    per_family: dict[str, float]
    mean_response_words: float
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci_low": self.ci_low, "ci_high": self.ci_high, "n": self.n,
                "per_family": self.per_family, "mean_response_words": self.mean_response_words}


def exact_match(model, tokenizer, tasks: list[Task], *, max_new_tokens: int = 48, batch_size: int = 32,
                keep_samples: int = 8, progress: bool = False) -> AccuracyResult:
    """Greedy-decode every checkable task and score it with its exact checker.

    The interval is a bootstrap 95% CI over prompts (`eval.winrate.win_rate` on 0/1 outcomes).
    """
    tasks = [t for t in tasks if t.checkable]
    if not tasks:
        raise ValueError("no checkable tasks to evaluate")
    gens = generate(model, tokenizer, [as_conversation(t.prompt) for t in tasks],
                    SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size),
                    progress=progress)
    outcomes = [float(check(t, g.text)) for t, g in zip(tasks, gens)]
    fams: dict[str, list[float]] = {}
    for t, o in zip(tasks, outcomes):
        fams.setdefault(t.family, []).append(o)
    wr = win_rate(outcomes)
    samples = [{"task_id": t.id, "prompt": t.prompt, "response": g.text, "correct": bool(o)}
               for t, g, o in list(zip(tasks, gens, outcomes))[:keep_samples]]
    words = sum(len(g.text.split()) for g in gens) / len(gens)
    return AccuracyResult(accuracy=sum(outcomes) / len(outcomes), ci_low=wr.ci_low, ci_high=wr.ci_high,
                          n=len(outcomes), per_family={f: sum(v) / len(v) for f, v in sorted(fams.items())},
                          mean_response_words=words, samples=samples)
