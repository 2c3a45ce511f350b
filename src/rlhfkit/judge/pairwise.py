"""Pairwise LLM-as-judge: which of two responses is better, judged in both orders.

A judge model tends to prefer whichever response it reads first (or second): position bias.
Showing each pair twice, (a, b) and (b, a), cancels it: when the two orders name the same
response, that response wins; when they disagree, the pair is a tie. A judge that always
answers "A" therefore produces only ties, and its `position_bias` is 1.0.

Outputs are parsed strictly: the judge must end with a line `Verdict: A`, `Verdict: B` or
`Verdict: tie` (see `parse_verdict` for the tolerated spellings). Anything else is recorded as
`invalid`, counted, and treated as a tie — never guessed.

Scored mode (`mode="logprob"`, for judges that expose log-probs: a local model). A small
judge's generated verdict is often the same letter whatever it reads (the embedded 135M
model answers "A" for 85–90% of pairs), so both-order voting turns everything into ties.
Instead of generating, read the judge's preference directly: after the filled template and
an assistant turn starting "Verdict:", s = log P(" A") − log P(" B"). For one pair,

    s_ab = q + c + ε₁          (response a shown first)
    s_ba = −q + c + ε₂         (response b shown first)

where q is the judge's preference for a and c its position bias. c is estimated per batch as
the mean of (s_ab + s_ba)/2 over its pairs, and each order's evidence for a is e_ab = s_ab − c,
e_ba = −(s_ba − c). If both favour the same response it wins; if they disagree the pair is a
tie, exactly as in verdict mode. `Verdict.score` = (e_ab + e_ba)/2 = (s_ab − s_ba)/2, the
judge's margin for a in nats, which c cancels from.

Templates are plain text files with three placeholders, `{prompt}`, `{response_a}` and
`{response_b}`; the filled template is sent as a single user message. The built-in one is
`templates/pairwise.txt`; copy and edit it, then pass its path.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import (
    Conversation,
    Message,
    PreferencePair,
    Provenance,
    as_conversation,
)
from rlhfkit.judge.backends import JudgeBackend, LocalModelBackend
from rlhfkit.judge.cache import JudgeCache, cache_key

logger = logging.getLogger(__name__)

Winner = Literal["a", "b", "tie"]
Choice = Literal["A", "B", "tie", "invalid"]
TEMPLATE_DIR = Path(__file__).parent / "templates"
PLACEHOLDERS = ("prompt", "response_a", "response_b")
_PLACEHOLDER_RE = re.compile(r"\{(prompt|response_a|response_b)\}")

# A verdict line: optional markdown decoration, "verdict", a separator, an optional
# "answer"/"response" word, then exactly one of A / B / tie and only closing punctuation.
_VERDICT_LINE = re.compile(
    r"""^[\s*_#>`-]*verdict[\s*_`]*[:=\-][\s*_`"'\[(]*
        (?:(?:answer|response|assistant|output)\s+)?
        (a|b|tie)
        [\s*_`"'\])\].!]*$""",
    re.IGNORECASE | re.VERBOSE)
# A whole output that is nothing but the choice ("A", "[[B]]", "tie.").
_BARE_CHOICE = re.compile(r"""^[\s*_`"'\[(]*(a|b|tie)[\s*_`"'\])\].!]*$""", re.IGNORECASE)


def parse_verdict(text: str) -> Choice:
    """The choice in a judge's output, in the positions it saw: "A", "B", "tie" or "invalid".

    The last line of the form `Verdict: X` decides (X one of A, B, tie; case, markdown
    emphasis, brackets, quotes, a trailing period and a leading "Answer"/"Response" word are
    tolerated). An output that is nothing but the choice is also accepted. Anything else,
    e.g. `Verdict: A or B` or no verdict line, is "invalid".
    """
    choice = None
    for line in text.splitlines():
        match = _VERDICT_LINE.match(line)
        if match:
            choice = match.group(1)
    if choice is None:
        match = _BARE_CHOICE.match(text.strip())
        if match:
            choice = match.group(1)
    if choice is None:
        return "invalid"
    return "tie" if choice.lower() == "tie" else choice.upper()  # type: ignore[return-value]


def load_template(template: str | Path) -> str:
    """Template text from a `Path`, a file path, a built-in name ("pairwise"), or the text
    itself (any string containing `{response_a}`). Checks all three placeholders are there."""
    source = "<template>"
    if isinstance(template, Path) or "{response_a}" not in template:
        path = Path(template)
        builtin = TEMPLATE_DIR / f"{template}.txt"
        if not isinstance(template, Path) and "/" not in str(template) and builtin.is_file():
            path = builtin
        if not path.is_file():
            raise DataError(f"judge template not found (built-in names: "
                            f"{sorted(p.stem for p in TEMPLATE_DIR.glob('*.txt'))})",
                            path=str(path), field="template")
        source = str(path)
        text = path.read_text(encoding="utf-8")
    else:
        text = template
    missing = [f"{{{name}}}" for name in PLACEHOLDERS if f"{{{name}}}" not in text]
    if missing:
        raise DataError(f"judge template lacks the placeholder(s) {', '.join(missing)}",
                        path=source, field="template")
    return text


def render_conversation(prompt: Conversation) -> str:
    """The prompt as the judge reads it: a single user turn verbatim, else one line per turn."""
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n\n".join(f"{m.role.capitalize()}: {m.content}" for m in prompt)


def fill_template(template: str, prompt: Conversation, first: str, second: str) -> str:
    """Substitute the placeholders in one pass, so braces inside responses are left alone."""
    values = {"prompt": render_conversation(prompt), "response_a": first, "response_b": second}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class JudgeItem:
    """One pair to judge: `response_a` and `response_b` answering `prompt`."""

    prompt: Conversation
    response_a: str
    response_b: str


@dataclass(frozen=True)
class OrderResult:
    """The judge's answer for one presentation order.

    `order` is "ab" when response_a was shown as A, "ba" when response_b was. `choice` is in
    the positions the judge saw (A = shown first); `winner` maps it back to a / b / tie
    (invalid counts as tie).
    """

    order: Literal["ab", "ba"]
    text: str
    choice: Choice

    @property
    def winner(self) -> Winner:
        if self.choice == "A":
            return "a" if self.order == "ab" else "b"
        if self.choice == "B":
            return "b" if self.order == "ab" else "a"
        return "tie"


_P_A: dict[str, float] = {"a": 1.0, "tie": 0.5, "b": 0.0}


@dataclass(frozen=True)
class Verdict:
    """The judged outcome of one pair.

    `winner`: "a", "b" or "tie"; `p_a`: 1.0 / 0.5 / 0.0, the outcome as a win-rate value for
    response_a; `raw`: the per-order results ((a, b) first); `consistent`: both orders named
    the same winner (True when only one order was judged).
    """

    winner: Winner
    p_a: float
    raw: tuple[OrderResult, ...]
    consistent: bool
    score: float | None = None  # logprob mode: the judge's margin for response_a, nats

    @property
    def rationale(self) -> str:
        """The judge's text, order by order."""
        if len(self.raw) == 1:
            return self.raw[0].text
        return "\n\n".join(f"[order {r.order}]\n{r.text}" for r in self.raw)


def combine_orders(results: Sequence[OrderResult]) -> Verdict:
    """Agreeing orders → that winner; any disagreement (including tie vs a win) → tie."""
    winners = {r.winner for r in results}
    winner: Winner = winners.pop() if len(winners) == 1 else "tie"
    return Verdict(winner=winner, p_a=_P_A[winner], raw=tuple(results),
                   consistent=len({r.winner for r in results}) == 1)


@dataclass(frozen=True)
class JudgeBatch:
    """Verdicts for a batch of pairs, with the counts that say how far to trust them.

    `position_bias`: among pairs judged in both orders, the fraction where the response
    shown first won in both orders (so the two calls named different responses). 0 for an
    order-blind judge, 1 for one that always answers "A". `second_position_bias` likewise
    for the response shown second; both NaN when no pair was judged in both orders.
    `n_invalid`: judge outputs (per order) that did not parse.
    """

    verdicts: tuple[Verdict, ...]
    n_invalid: int
    n_inconsistent: int
    position_bias: float
    second_position_bias: float
    n_backend_calls: int = field(default=0, compare=False)
    position_offset: float | None = None  # logprob mode: c, the batch's mean preference for the first answer

    def __len__(self) -> int:
        return len(self.verdicts)

    @property
    def outcomes(self) -> list[float]:
        """`p_a` per pair: the input `rlhfkit.eval.winrate.win_rate` expects."""
        return [v.p_a for v in self.verdicts]

    def summary(self) -> dict[str, float | int]:
        wins = sum(v.winner == "a" for v in self.verdicts)
        losses = sum(v.winner == "b" for v in self.verdicts)
        return {"n": len(self.verdicts), "a_wins": wins, "b_wins": losses,
                "ties": len(self.verdicts) - wins - losses, "invalid_outputs": self.n_invalid,
                "inconsistent": self.n_inconsistent, "position_bias": self.position_bias,
                "second_position_bias": self.second_position_bias}


def _position_bias(verdicts: Sequence[Verdict]) -> dict[str, float]:
    """Among pairs judged in both orders, how often the answer shown first (second) won both."""
    both = [v for v in verdicts if len(v.raw) == 2]
    if not both:
        return {"position_bias": float("nan"), "second_position_bias": float("nan")}
    return {"position_bias": sum(all(r.choice == "A" for r in v.raw) for v in both) / len(both),
            "second_position_bias": sum(all(r.choice == "B" for r in v.raw) for v in both) / len(both)}


def _as_item(item: Any, index: int) -> JudgeItem:
    if isinstance(item, JudgeItem):
        return item
    if isinstance(item, dict):
        try:
            item = (item["prompt"], item["response_a"], item["response_b"])
        except KeyError as err:
            raise DataError(f"missing key {err}", field=f"items[{index}]") from None
    if not isinstance(item, (tuple, list)) or len(item) != 3:
        raise DataError("expected (prompt, response_a, response_b)", field=f"items[{index}]")
    prompt, a, b = item
    if not isinstance(a, str) or not isinstance(b, str):
        raise DataError("responses must be strings", field=f"items[{index}]")
    try:
        conversation = as_conversation(prompt)
    except (KeyError, TypeError) as err:
        raise DataError(f"prompt is neither text nor chat messages ({err})",
                        field=f"items[{index}].prompt") from None
    return JudgeItem(conversation, a, b)


class PairwiseJudge:
    """Judges pairs of responses with `backend`, filling `template`, in one or both orders.

    All requests of a batch go to the backend in one `complete` call (after dropping those
    found in `cache` and duplicates); new completions are written back to the cache.
    """

    SCORE_PREFIX = "Verdict:"
    SCORE_CHOICES = (" A", " B")

    def __init__(self, backend: JudgeBackend, template: str | Path = "pairwise", *,
                 both_orders: bool = True, cache: JudgeCache | None = None,
                 mode: Literal["verdict", "logprob"] = "verdict"):
        if mode not in ("verdict", "logprob"):
            raise ValueError(f"mode must be 'verdict' or 'logprob', got {mode!r}")
        if mode == "logprob" and not callable(getattr(backend, "choice_logprobs", None)):
            raise ValueError(f"judge {backend.name} cannot score answers (no log-probs): use mode='verdict', "
                             "or a local model judge")
        self.backend = backend
        self.template = load_template(template)
        self.both_orders = both_orders
        self.cache = cache
        self.mode = mode

    def _requests(self, item: JudgeItem) -> list[tuple[Literal["ab", "ba"], Conversation]]:
        orders: list[tuple[Literal["ab", "ba"], Conversation]] = [
            ("ab", (Message("user", fill_template(self.template, item.prompt,
                                                  item.response_a, item.response_b)),))]
        if self.both_orders:
            orders.append(("ba", (Message("user", fill_template(
                self.template, item.prompt, item.response_b, item.response_a)),)))
        return orders

    def _cached(self, tag: str, requests: list[Conversation],
                compute: Callable[[list[Conversation]], list[str]]) -> tuple[list[str], int]:
        """One text per request: from the cache (key: backend, model, `tag`, request) or from
        `compute` on the requests not found (each distinct one once), written back. Returns the
        texts and how many requests `compute` got."""
        keys = [cache_key(self.backend.name, self.backend.model, tag, r) for r in requests]
        known: dict[str, str] = self.cache.get_many(keys) if self.cache is not None else {}
        todo: dict[str, Conversation] = {}
        for key, request in zip(keys, requests):
            if key not in known and key not in todo:
                todo[key] = request
        if todo:
            texts = compute(list(todo.values()))
            if len(texts) != len(todo):
                raise RuntimeError(f"judge backend {self.backend.name} returned {len(texts)} "
                                   f"answers for {len(todo)} requests")
            fresh = dict(zip(todo, texts))
            if self.cache is not None:
                self.cache.put_many(fresh, backend=self.backend.name, model=self.backend.model)
            known.update(fresh)
        return [known[k] for k in keys], len(todo)

    def _complete_cached(self, requests: list[Conversation]) -> tuple[list[str], int]:
        return self._cached(self.template, requests, self.backend.complete)

    def _scores_cached(self, requests: list[Conversation]) -> tuple[list[float], int]:
        """s = log P(" A") − log P(" B") per request (cached as JSON text under a key of its own)."""
        def score(todo: list[Conversation]) -> list[str]:
            scored = self.backend.choice_logprobs(todo, self.SCORE_PREFIX, self.SCORE_CHOICES)  # type: ignore[attr-defined]
            return [json.dumps(v) for v in scored]

        tag = f"{self.template}\n#logprob {self.SCORE_PREFIX}{'|'.join(self.SCORE_CHOICES)}"
        texts, n_calls = self._cached(tag, requests, score)
        out = []
        for text in texts:
            lp_a, lp_b = json.loads(text)
            out.append(lp_a - lp_b)
        return out, n_calls

    def _judge_scored(self, pairs: list[JudgeItem], plan) -> tuple[list[Verdict], int, float | None]:
        flat = [request for orders in plan for _, request in orders]
        scores, n_calls = self._scores_cached(flat)
        per_pair, cursor = [], 0
        for orders in plan:
            per_pair.append({order: scores[cursor + i] for i, (order, _) in enumerate(orders)})
            cursor += len(orders)
        both = [s for s in per_pair if len(s) == 2]
        offset = sum((s["ab"] + s["ba"]) / 2 for s in both) / len(both) if both else 0.0
        verdicts = []
        for s in per_pair:
            raw = tuple(OrderResult(order=o, text=f"log P(A) − log P(B) = {v:+.4f}",
                                    choice="A" if v > 0 else "B" if v < 0 else "tie") for o, v in s.items())
            evidence = [s["ab"] - offset] if "ab" in s else []
            if "ba" in s:
                evidence.append(-(s["ba"] - offset))
            signs = {(e > 0) - (e < 0) for e in evidence}
            sign = next(iter(signs)) if len(signs) == 1 else 0
            winner: Winner = "a" if sign > 0 else "b" if sign < 0 else "tie"
            verdicts.append(Verdict(winner=winner, p_a=_P_A[winner], raw=raw, consistent=len(signs) == 1,
                                    score=sum(evidence) / len(evidence)))
        return verdicts, n_calls, offset if both else None

    def judge_many(self, items: Sequence[Any]) -> JudgeBatch:
        """Verdicts for `items`: `JudgeItem`s, `(prompt, response_a, response_b)` tuples or
        dicts with those keys; a prompt is text or chat messages."""
        pairs = [_as_item(item, i) for i, item in enumerate(items)]
        plan = [self._requests(p) for p in pairs]
        flat = [request for orders in plan for _, request in orders]
        if self.mode == "logprob":
            verdicts, n_calls, offset = self._judge_scored(pairs, plan)
            return JudgeBatch(verdicts=tuple(verdicts), n_invalid=0,
                              n_inconsistent=sum(not v.consistent for v in verdicts),
                              **_position_bias(verdicts), n_backend_calls=n_calls, position_offset=offset)
        texts, n_calls = self._complete_cached(flat)

        verdicts: list[Verdict] = []
        cursor = 0
        for orders in plan:
            results = []
            for order, _ in orders:
                text = texts[cursor]
                cursor += 1
                results.append(OrderResult(order=order, text=text, choice=parse_verdict(text)))
            verdicts.append(combine_orders(results))

        n_invalid = sum(r.choice == "invalid" for v in verdicts for r in v.raw)
        batch = JudgeBatch(
            verdicts=tuple(verdicts), n_invalid=n_invalid,
            n_inconsistent=sum(not v.consistent for v in verdicts),
            **_position_bias(verdicts), n_backend_calls=n_calls)
        if n_invalid:
            logger.warning("judge %s: %d of %d outputs had no parseable verdict (counted as ties)",
                           self.backend.name, n_invalid, len(flat))
        return batch

    def judge(self, prompt: str | Sequence[Any], response_a: str, response_b: str) -> Verdict:
        """The verdict on one pair."""
        return self.judge_many([(prompt, response_a, response_b)]).verdicts[0]


def resolve_judge_mode(mode: str, backend) -> str:
    """'auto' → 'logprob' for a local model judge (it exposes log-probs, and a small one's generated
    verdicts are mostly one letter), 'verdict' for anything else. A mode the backend cannot do is
    a ConfigError (one line on the command line)."""
    if mode not in ("auto", "verdict", "logprob"):
        raise ConfigError(f"judge mode must be auto, verdict or logprob, got {mode!r}")
    if mode == "auto":
        return "logprob" if isinstance(backend, LocalModelBackend) else "verdict"
    if mode == "logprob" and not callable(getattr(backend, "choice_logprobs", None)):
        raise ConfigError(f"judge {backend.name} cannot score answers (no log-probs): use --judge-mode verdict "
                          "or a local model judge")
    return mode


def label_pairs_with_judge(judge: PairwiseJudge, items: Sequence[Any], *,
                           round: int | None = None, model_version: str | None = None,
                           ) -> tuple[list[PreferencePair], JudgeBatch]:
    """RLAIF: judge each (prompt, response_a, response_b) and write it as a `PreferencePair`.

    The winner becomes `chosen` with label 1.0; a tie keeps (a, b) as (chosen, rejected) with
    label 0.5. Provenance: source "ai", annotator = the backend's name, rationale = the
    judge's text. `meta` records whether the orders agreed and the per-order choices.
    Returns the pairs and the batch (for the invalid / position-bias counts).
    """
    pairs_in = [_as_item(item, i) for i, item in enumerate(items)]
    batch = judge.judge_many(pairs_in)
    out: list[PreferencePair] = []
    for item, verdict in zip(pairs_in, batch.verdicts):
        chosen, rejected = ((item.response_b, item.response_a) if verdict.winner == "b"
                            else (item.response_a, item.response_b))
        out.append(PreferencePair(
            prompt=item.prompt, chosen=chosen, rejected=rejected,
            label=0.5 if verdict.winner == "tie" else 1.0,
            provenance=Provenance(annotator=judge.backend.name, source="ai",
                                  rationale=verdict.rationale, round=round,
                                  model_version=model_version),
            meta={"judge_consistent": verdict.consistent,
                  "judge_choices": [f"{r.order}:{r.choice}" for r in verdict.raw]}))
    return out, batch
