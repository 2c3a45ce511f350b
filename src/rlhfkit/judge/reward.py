"""An LLM judge as a reward source: the `judge` and `judge-ref` terms of `--reward`.

`judge` grades one response on its own; `judge-ref` asks whether the response agrees with the
prompt record's reference `answer` (a sample without one is a DataError: use `judge` there).
Both give a reward in [0, 1], read one of two ways:

  * `mode="prob"` (a backend that scores choices: a local model). After the filled prompt and an
    assistant turn starting "Answer:", with ℓ_yes = log P(" yes"), ℓ_no = log P(" no"),

        r = P(yes) / (P(yes) + P(no)) = σ(ℓ_yes − ℓ_no),

    a smooth score with no generation, renormalized over the two answers.
  * `mode="score"` (any backend that generates: an OpenAI-compatible endpoint). The judge ends
    with a line `Score: N`, N an integer 1..10, and r = (N − 1)/9. An output without a valid
    score line is counted in `invalid`, logged, and scored 0.5, the middle of the scale.

The term's argument picks the backend as `--judge` does ('embedded', 'tiny', 'local:PATH'),
or an HTTP endpoint as `URL#MODEL` (the model it serves), sent through
`OpenAICompatibleBackend` with the key in $OPENAI_API_KEY.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence

from rlhfkit.data.errors import DataError
from rlhfkit.judge.backends import JudgeBackend, LocalModelBackend
from rlhfkit.judge.loading import backend_from_spec
from rlhfkit.rollout.reward_spec import RewardBuilders
from rlhfkit.rollout.rewards import Sample

logger = logging.getLogger(__name__)

_GRADE = ("You are grading an assistant's response to a user's prompt.\n\n"
          "[Prompt]\n{prompt}\n\n[Response]\n{response}\n\n")
_REFERENCE = ("You are checking an assistant's response against a reference answer.\n\n"
              "[Prompt]\n{prompt}\n\n[Reference answer]\n{reference}\n\n[Response]\n{response}\n\n")
_ASK = {
    (False, "prob"): "Is the response correct, helpful and harmless? Answer with one word: yes or no.",
    (True, "prob"): "Does the response reach the same answer as the reference? Answer with one word: yes or no.",
    (False, "score"): ("Rate the response from 1 (useless or harmful) to 10 (correct, helpful and harmless). "
                       "Explain briefly, then end with a line `Score: N`."),
    (True, "score"): ("Rate from 1 (contradicts the reference) to 10 (reaches the same answer as the reference). "
                      "Explain briefly, then end with a line `Score: N`."),
}
_SCORE_LINE = re.compile(r"^[\s*_#>`-]*score[\s*_`]*[:=][\s*_`]*(\d+)(?:\s*/\s*10)?[\s*_`.]*$",
                         re.IGNORECASE | re.MULTILINE)
INVALID_SCORE = 0.5


def yes_probability(logp_yes: float, logp_no: float) -> float:
    """σ(ℓ_yes − ℓ_no): P(yes) renormalized over {yes, no}."""
    d = logp_yes - logp_no
    return 1.0 / (1.0 + math.exp(-d)) if d >= 0 else math.exp(d) / (1.0 + math.exp(d))


def parse_score(text: str) -> float | None:
    """(N − 1)/9 for the last `Score: N` line with N in 1..10 ('Score: 7/10' and markdown
    emphasis tolerated); None when there is none."""
    found = _SCORE_LINE.findall(text)
    if not found or not 1 <= int(found[-1]) <= 10:
        return None
    return (int(found[-1]) - 1) / 9


class JudgeReward:
    """r ∈ [0, 1] from a judge backend, per response (see the module docstring for the math)."""

    PREFIX = "Answer:"
    CHOICES = (" yes", " no")

    def __init__(self, backend: JudgeBackend, *, reference: bool = False, mode: str | None = None,
                 name: str | None = None) -> None:
        mode = mode or ("prob" if isinstance(backend, LocalModelBackend) else "score")
        if mode not in ("prob", "score"):
            raise ValueError(f"JudgeReward: mode must be 'prob' or 'score', got {mode!r}")
        if mode == "prob" and not callable(getattr(backend, "choice_logprobs", None)):
            raise ValueError(f"the judge {backend.name} cannot score answers; use mode='score'")
        self.backend, self.reference, self.mode = backend, reference, mode
        self.name = name or ("judge-ref" if reference else "judge")
        self.invalid = 0

    def request(self, sample: Sample, index: int = 0) -> str:
        """The filled prompt sent to the judge as one user message."""
        if not self.reference:
            return _GRADE.format(prompt=sample.prompt, response=sample.response) + _ASK[False, self.mode]
        answer = sample.meta.get("answer")
        if answer is None:
            task = sample.meta.get("task_id")
            raise DataError(f"sample {index}{f' (task {task})' if task is not None else ''} has no reference "
                            "'answer' for judge-ref; use the 'judge' term for prompts without one", field="answer")
        return (_REFERENCE.format(prompt=sample.prompt, reference=answer, response=sample.response)
                + _ASK[True, self.mode])

    def score(self, samples: Sequence[Sample]) -> list[float]:
        requests = [self.request(s, i) for i, s in enumerate(samples)]
        if self.mode == "prob":
            scored = self.backend.choice_logprobs(requests, self.PREFIX, self.CHOICES)  # type: ignore[attr-defined]
            return [yes_probability(yes, no) for yes, no in scored]
        scores = [parse_score(text) for text in self.backend.complete(requests)]
        bad = sum(s is None for s in scores)
        if bad:
            self.invalid += bad
            logger.warning("%s: %d of %d judge outputs had no 'Score: N' line (N in 1..10); scored %.1f",
                           self.name, bad, len(scores), INVALID_SCORE)
        return [INVALID_SCORE if s is None else s for s in scores]


def judge_backend(arg: str | None) -> JudgeBackend:
    """The backend a judge term names: 'embedded' (default), 'tiny', 'local:PATH' or 'URL#MODEL'."""
    spec = arg or "embedded"
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        return backend_from_spec(url, judge_model=model.strip())
    return backend_from_spec(spec)


JUDGE_REWARD_BUILDERS: RewardBuilders = {
    "judge": lambda arg: JudgeReward(judge_backend(arg)),
    "judge-ref": lambda arg: JudgeReward(judge_backend(arg), reference=True),
}
