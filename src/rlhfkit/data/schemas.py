"""The records every stage of the loop exchanges.

One set of plain, frozen dataclasses for the four kinds of data the seeds describe:
supervised examples, pairwise preferences, K-way rankings with ties, and unpaired
good/bad feedback. Every feedback record carries its provenance (who or what labeled it,
in which round, from which model version), so data from humans, AI judges and rules can
be mixed and traced.

A prompt is always stored as a list of chat messages; a plain string prompt becomes one
user message. Responses are assistant text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROLES: tuple[str, ...] = ("system", "user", "assistant")

# A preference label this close to 0.5 is a tie: it says nothing about which response is better,
# so it is left out of accuracy (it still trains a model, through the soft-label loss).
TIE_TOLERANCE = 1e-6


def is_tie(label: float) -> bool:
    """Whether a preference label P(first ≻ second) says "neither is better"."""
    return abs(label - 0.5) <= TIE_TOLERANCE


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


Conversation = tuple[Message, ...]


def as_conversation(prompt: str | list | tuple) -> Conversation:
    """A plain string becomes one user turn; a list of {role, content} dicts is kept."""
    if isinstance(prompt, str):
        return (Message("user", prompt),)
    return tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in prompt)


def prompt_text(prompt: Conversation) -> str:
    """The last user turn: a stable, readable key for a prompt (splits, dedupe, display)."""
    for m in reversed(prompt):
        if m.role == "user":
            return m.content
    return prompt[-1].content if prompt else ""


@dataclass(frozen=True)
class Provenance:
    """Where a label came from. Every field is optional; all are kept through export."""

    annotator: str | None = None
    source: str = "unknown"
    rationale: str | None = None
    round: int | None = None
    model_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class SFTExample:
    """A prompt (chat turns) and the assistant response the model should learn.

    In a multi-turn conversation the earlier assistant turns are part of `prompt`; SFT trains
    on them too unless told to train the last turn only. `weight` (≥ 0) multiplies the
    example's token losses; `desirable` is False for a KTO record labelled undesirable, which
    SFT leaves out (and counts)."""

    prompt: Conversation
    response: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    weight: float = 1.0
    desirable: bool = True


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` judged at least as good as `rejected` for `prompt`.

    `label` is P(chosen ≻ rejected) as the annotators gave it: 1.0 for a clear preference,
    0.5 for a tie (a soft label, never dropped), anything between for soft labels pooled
    from several annotators. `margin` is an optional strength (e.g. 1–3 on a Likert scale).
    `both_bad` marks pairs where the annotator rejected both responses.
    """

    prompt: Conversation
    chosen: str
    rejected: str
    label: float = 1.0
    margin: float | None = None
    both_bad: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def is_tie(self) -> bool:
        return is_tie(self.label)


@dataclass(frozen=True)
class Ranking:
    """K responses ranked best-first with ties: `ranks[i]` is the rank of `responses[i]`
    (0 = best, equal ranks = tie). D > C > A = B over [A, B, C, D] is ranks (2, 2, 1, 0)."""

    prompt: Conversation
    responses: tuple[str, ...]
    ranks: tuple[int, ...]
    both_bad: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class UnpairedFeedback:
    """One response with a thumbs up (`desirable=True`) or down, for KTO-style training."""

    prompt: Conversation
    response: str
    desirable: bool
    provenance: Provenance = field(default_factory=Provenance)
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def conversation_to_dicts(prompt: Conversation) -> list[dict[str, str]]:
    return [m.to_dict() for m in prompt]
