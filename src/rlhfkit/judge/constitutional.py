"""Constitutional AI: written principles instead of human labels, in both stages.

Supervised stage (critique → revise): for an answer y₀ to prompt x, each round k samples
one principle c_k from the constitution, asks the model to critique y_{k-1} against c_k,
then to rewrite y_{k-1} so that it follows c_k and fixes what the critique found:

    critique_k = M(critique_template(x, y_{k-1}, c_k))
    y_k        = M(revision_template(x, y_{k-1}, c_k, critique_k))

The final revision y_K becomes the SFT target for x (the original and the critiques are kept
alongside, for inspection).

RL stage (AI preference labels): for two answers (a, b) to x, a principle c is sampled and
the judge is asked which answer follows c better — the pairwise judge of
`rlhfkit.judge.pairwise` with a template that names the principle, so both presentation
orders are asked and disagreement is a tie. The result is a `PreferencePair` with source "ai".

Principles live in a Markdown file (one list item each, see `principles/default.md`); the
prompt templates are plain text files in `templates/` (`critique.txt`, `revision.txt`,
`constitutional_pairwise.txt`) that can be copied, edited and passed by path.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import (
    Conversation,
    Message,
    PreferencePair,
    as_conversation,
)
from rlhfkit.io import atomic_write_text
from rlhfkit.judge.backends import JudgeBackend
from rlhfkit.judge.cache import JudgeCache, cache_key
from rlhfkit.judge.loading import load_local_model
from rlhfkit.judge.pairwise import (
    TEMPLATE_DIR,
    PairwiseJudge,
    label_pairs_with_judge,
    render_conversation,
)
from rlhfkit.judge.records import preference_record, prompt_field, write_jsonl
from rlhfkit.rollout.generate import SamplingConfig, generate

logger = logging.getLogger(__name__)

PRINCIPLES_DIR = Path(__file__).parent / "principles"
DEFAULT_PRINCIPLES = PRINCIPLES_DIR / "default.md"
CRITIQUE_PLACEHOLDERS = ("prompt", "response", "principle")
REVISION_PLACEHOLDERS = ("prompt", "response", "principle", "critique")
PREFERENCE_PLACEHOLDERS = ("principle", "prompt", "response_a", "response_b")

_LIST_ITEM = re.compile(r"^\s{0,3}(?:[-*+]|\d+[.)])\s+(.*\S)\s*$")
_CONTINUATION = re.compile(r"^\s{2,}(\S.*?)\s*$")
# A label a model may echo before its rewrite ("Revision:", "**Rewritten answer:**").
_REVISION_LABEL = re.compile(r"^[\s*_#]*(?:revised|rewritten|revision)(?:\s+(?:answer|response))?"
                             r"[\s*_]*:[\s*_]*", re.IGNORECASE)


# ----------------------------------------------------------------------------- principles and templates

def parse_principles(text: str, *, path: str | None = None) -> tuple[str, ...]:
    """The list items of a Markdown text, one principle each (indented lines continue an item).

    Headings and paragraphs are ignored, so the file can explain itself. No item → DataError.
    """
    principles: list[list[str]] = []
    in_item = False
    for line in text.splitlines():
        item = _LIST_ITEM.match(line)
        if item:
            principles.append([item.group(1)])
            in_item = True
            continue
        continuation = _CONTINUATION.match(line)
        if in_item and continuation:
            principles[-1].append(continuation.group(1))
        else:
            in_item = False  # a blank line or a paragraph ends the item
    found = tuple(" ".join(parts) for parts in principles)
    if not found:
        raise DataError("no principles found: write one Markdown list item ('- ...') per principle",
                        path=path, field="principles")
    return found


def load_principles(source: str | Path | Sequence[str] | None = None) -> tuple[str, ...]:
    """Principles from a Markdown file (None → the built-in `principles/default.md`), or a
    list of strings given directly."""
    if source is None:
        source = DEFAULT_PRINCIPLES
    if not isinstance(source, (str, Path)):
        principles = tuple(str(p).strip() for p in source)
        if not principles or not all(principles):
            raise DataError("expected a non-empty list of non-empty principles", field="principles")
        return principles
    path = Path(source)
    if not path.is_file():
        raise DataError("principles file not found", path=str(path), field="principles")
    return parse_principles(path.read_text(encoding="utf-8"), path=str(path))


def load_named_template(template: str | Path, placeholders: Sequence[str]) -> str:
    """Template text from a built-in name ("critique"), a file path, or the text itself (a
    string containing any of its `{placeholders}`); checks every placeholder is there."""
    text, source = None, "<template>"
    if isinstance(template, str) and any(f"{{{name}}}" in template for name in placeholders):
        text = template
    else:
        path = Path(template)
        builtin = TEMPLATE_DIR / f"{template}.txt"
        if isinstance(template, str) and "/" not in template and builtin.is_file():
            path = builtin
        if not path.is_file():
            raise DataError(f"template not found (built-in names: "
                            f"{sorted(p.stem for p in TEMPLATE_DIR.glob('*.txt'))})",
                            path=str(path), field="template")
        text, source = path.read_text(encoding="utf-8"), str(path)
    missing = [f"{{{name}}}" for name in placeholders if f"{{{name}}}" not in text]
    if missing:
        raise DataError(f"template lacks the placeholder(s) {', '.join(missing)}",
                        path=source, field="template")
    return text


def fill(template: str, values: dict[str, str]) -> str:
    """Substitute `{name}` for each key in one pass, so braces inside the values stay as they are."""
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def sample_principle(principles: Sequence[str], seed: int, item: int, round: int) -> str:
    """The principle for (item, round): a seeded draw, the same whatever the batch looks like."""
    return random.Random(f"rlhfkit-constitution/{seed}/{item}/{round}").choice(list(principles))


# ----------------------------------------------------------------------------- calls, cached

def complete_cached(backend: JudgeBackend, requests: Sequence[Conversation], *, template: str,
                    cache: JudgeCache | None = None) -> list[str]:
    """One completion per request, reusing (and filling) `cache`; duplicates are asked once."""
    keys = [cache_key(backend.name, backend.model, template, r) for r in requests]
    known: dict[str, str] = cache.get_many(keys) if cache is not None else {}
    todo: dict[str, Conversation] = {}
    for key, request in zip(keys, requests):
        if key not in known and key not in todo:
            todo[key] = request
    if todo:
        texts = backend.complete(list(todo.values()))
        if len(texts) != len(todo):
            raise RuntimeError(f"backend {backend.name} returned {len(texts)} completions for "
                               f"{len(todo)} requests")
        fresh = dict(zip(todo, texts))
        if cache is not None:
            cache.put_many(fresh, backend=backend.name, model=backend.model)
        known.update(fresh)
    return [known[k] for k in keys]


def _user(text: str) -> Conversation:
    return (Message("user", text),)


def clean_revision(text: str) -> str:
    """The rewrite without an echoed label ("Revision: ...") and surrounding blank space."""
    return _REVISION_LABEL.sub("", text.strip(), count=1).strip()


# ----------------------------------------------------------------------------- supervised stage

@dataclass(frozen=True)
class CritiqueStep:
    """One round: the principle drawn, the critique, and the answer after the revision.

    `revised` is False when the model returned no usable rewrite; the answer is then kept.
    """

    principle: str
    critique: str
    revision: str
    revised: bool


@dataclass(frozen=True)
class ConstitutionalRevision:
    """An answer before and after `len(steps)` critique → revise rounds."""

    prompt: Conversation
    original: str
    steps: tuple[CritiqueStep, ...]

    @property
    def revision(self) -> str:
        return self.steps[-1].revision if self.steps else self.original

    @property
    def critique(self) -> str:
        """The last round's critique ("" without rounds)."""
        return self.steps[-1].critique if self.steps else ""


def initial_responses(backend: JudgeBackend, prompts: Sequence[Any], *,
                      cache: JudgeCache | None = None) -> list[str]:
    """The backend's own first answers to `prompts` (text or chat messages), as in Constitutional
    AI, where the model that is critiqued is the one that answered."""
    conversations = [as_conversation(p) for p in prompts]
    return [t.strip() for t in complete_cached(backend, conversations, template="<answer>", cache=cache)]


def critique_and_revise_many(backend: JudgeBackend, items: Sequence[tuple[Any, str]],
                             principles: Sequence[str], *, rounds: int = 1, seed: int = 0,
                             critique_template: str | Path = "critique",
                             revision_template: str | Path = "revision",
                             cache: JudgeCache | None = None) -> list[ConstitutionalRevision]:
    """Critique → revise `rounds` times for every (prompt, response) in `items`.

    Each round sends all critiques in one `backend.complete` call, then all revisions in one,
    so an HTTP backend can run them concurrently and a local one batches them. The principle
    of item i in round k is `sample_principle(principles, seed, i, k)`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not principles:
        raise DataError("no principles given", field="principles")
    critique_text = load_named_template(critique_template, CRITIQUE_PLACEHOLDERS)
    revision_text = load_named_template(revision_template, REVISION_PLACEHOLDERS)
    prompts: list[Conversation] = []
    for i, (prompt, response) in enumerate(items):
        if not isinstance(response, str):
            raise DataError(f"expected the response as text, got {type(response).__name__}",
                            field=f"items[{i}].response")
        prompts.append(as_conversation(prompt))
    current = [response for _, response in items]
    originals = list(current)
    steps: list[list[CritiqueStep]] = [[] for _ in items]
    n_kept = 0
    for k in range(rounds):
        chosen = [sample_principle(principles, seed, i, k) for i in range(len(items))]
        shown = [render_conversation(p) for p in prompts]
        critiques = complete_cached(backend, [
            _user(fill(critique_text, {"prompt": x, "response": y, "principle": c}))
            for x, y, c in zip(shown, current, chosen)], template=critique_text, cache=cache)
        critiques = [c.strip() for c in critiques]
        rewrites = complete_cached(backend, [
            _user(fill(revision_text, {"prompt": x, "response": y, "principle": c, "critique": q}))
            for x, y, c, q in zip(shown, current, chosen, critiques)], template=revision_text, cache=cache)
        for i, rewrite in enumerate(rewrites):
            text = clean_revision(rewrite)
            revised = bool(text)
            if not revised:  # an empty rewrite would teach the model to say nothing
                text, n_kept = current[i], n_kept + 1
            steps[i].append(CritiqueStep(chosen[i], critiques[i], text, revised))
            current[i] = text
    if n_kept:
        logger.warning("constitutional revision: %d of %d rewrites were empty; the previous "
                       "answer was kept", n_kept, len(items) * rounds)
    return [ConstitutionalRevision(p, o, tuple(s)) for p, o, s in zip(prompts, originals, steps)]


def critique_and_revise(backend: JudgeBackend, prompt: Any, response: str, principles: Sequence[str],
                        rounds: int = 1, **kwargs: Any) -> ConstitutionalRevision:
    """Critique → revise one answer; `.revision` is the final text (see `critique_and_revise_many`)."""
    return critique_and_revise_many(backend, [(prompt, response)], principles, rounds=rounds, **kwargs)[0]


def sft_record(result: ConstitutionalRevision, *, annotator: str | None = None) -> dict[str, Any]:
    """The SFT layout `rlhfkit.data.readers.read_sft` reads: completion = the final revision;
    the original, the critiques and the principles ride along (kept in `meta`)."""
    return {"prompt": prompt_field(result.prompt), "completion": result.revision,
            "original": result.original, "critique": result.critique,
            "principle": result.steps[-1].principle if result.steps else None,
            "rounds": [dataclasses.asdict(s) for s in result.steps],
            "source": "ai", "annotator": annotator}


def constitutional_sft_dataset(backend: JudgeBackend, items: Sequence[tuple[Any, str]],
                               principles: Sequence[str], out_path: str | Path, *, rounds: int = 1,
                               seed: int = 0, cache: JudgeCache | None = None,
                               critique_template: str | Path = "critique",
                               revision_template: str | Path = "revision",
                               ) -> list[ConstitutionalRevision]:
    """Critique → revise every (prompt, response) and write one SFT record per item to
    `out_path` (JSONL: prompt, completion = revision, original, critique, rounds)."""
    results = critique_and_revise_many(backend, items, principles, rounds=rounds, seed=seed, cache=cache,
                                       critique_template=critique_template,
                                       revision_template=revision_template)
    write_jsonl(out_path, [sft_record(r, annotator=backend.name) for r in results])
    return results


# ----------------------------------------------------------------------------- RL stage

def constitutional_preferences(backend: JudgeBackend, items: Sequence[Any], principles: Sequence[str], *,
                               seed: int = 0, template: str | Path = "constitutional_pairwise",
                               both_orders: bool = True, cache: JudgeCache | None = None,
                               round: int | None = None, model_version: str | None = None,
                               ) -> tuple[list[PreferencePair], dict[str, Any]]:
    """AI preference labels against the constitution, for the RL stage.

    items: (prompt, response_a, response_b) tuples or dicts with those keys. For item i a
    principle is drawn (`sample_principle(principles, seed, i, 0)`) and written into the
    template; the pairwise judge then asks in both orders (a disagreement is a tie, label
    0.5). Returns the pairs in input order (source "ai", `meta["principle"]` set) and a
    summary: n, ties, invalid outputs, inconsistent orders, pairs per principle.
    """
    if not principles:
        raise DataError("no principles given", field="principles")
    text = load_named_template(template, PREFERENCE_PLACEHOLDERS)
    drawn = [sample_principle(principles, seed, i, 0) for i in range(len(items))]
    groups: dict[str, list[int]] = {}
    for i, principle in enumerate(drawn):
        groups.setdefault(principle, []).append(i)
    out: list[PreferencePair | None] = [None] * len(items)
    summary: dict[str, Any] = {"n": len(items), "ties": 0, "invalid_outputs": 0, "inconsistent": 0,
                               "per_principle": {}}
    for principle, indices in groups.items():
        # One judge per principle: the template with the principle written in is a template
        # of the ordinary pairwise kind, and the cache key tells principles apart.
        judge = PairwiseJudge(backend, fill(text, {"principle": principle}), both_orders=both_orders,
                              cache=cache)
        pairs, batch = label_pairs_with_judge(judge, [items[i] for i in indices], round=round,
                                              model_version=model_version)
        for i, pair in zip(indices, pairs):
            out[i] = dataclasses.replace(pair, meta={**pair.meta, "principle": principle})
        summary["ties"] += sum(p.is_tie for p in pairs)
        summary["invalid_outputs"] += batch.n_invalid
        summary["inconsistent"] += batch.n_inconsistent
        summary["per_principle"][principle] = len(indices)
    return [p for p in out if p is not None], summary


# ----------------------------------------------------------------------------- both stages, from files

def check_templates(critique_template: str | Path, revision_template: str | Path,
                    preference_template: str | Path) -> None:
    """A DataError for a missing template or placeholder, before any model is loaded or called."""
    load_named_template(critique_template, CRITIQUE_PLACEHOLDERS)
    load_named_template(revision_template, REVISION_PLACEHOLDERS)
    load_named_template(preference_template, PREFERENCE_PLACEHOLDERS)


def policy_samples(policy: str, prompts: Sequence[Conversation], *, temperature: float, max_new_tokens: int,
                   seed: int) -> list[list[str]]:
    """Two samples per prompt from the model at `policy` ('embedded', a folder or an HF id)."""
    tokenizer, model = load_local_model(policy)
    gens = generate(model, tokenizer, list(prompts), SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, n=2, seed=seed), progress=True)
    return [[gens[2 * i].text, gens[2 * i + 1].text] for i in range(len(prompts))]


def write_constitutional_data(backend: JudgeBackend, records: Sequence[dict[str, Any]],
                              prompts: Sequence[Conversation], principles: Sequence[str], out: str | Path, *,
                              samples: Sequence[Sequence[str]] | None = None, rounds: int = 1, seed: int = 0,
                              cache: JudgeCache | None = None, critique_template: str | Path = "critique",
                              revision_template: str | Path = "revision",
                              preference_template: str | Path = "constitutional_pairwise") -> dict[str, Any]:
    """Both stages for the records of `judge.records.read_constitutional_items`, into folder `out`.

    sft.jsonl: each record's answer — its `response`, else the first of its two `samples`, else
    the backend's own answer — critiqued and revised. preferences.jsonl: a pair per record — its
    `response_a`/`response_b`, else its two `samples`, else original vs revision when they
    differ — labeled against a drawn principle; `pair_origin` says which. Returns the summary,
    also written to summary.json.
    """
    answers: list[str | None] = [r.get("response") if "response" in r else
                                 (samples[i][0] if samples else None) for i, r in enumerate(records)]
    missing = [i for i, a in enumerate(answers) if a is None]
    if missing:
        own = initial_responses(backend, [prompts[i] for i in missing], cache=cache)
        for i, text in zip(missing, own):
            answers[i] = text
    out = Path(out)
    results = constitutional_sft_dataset(
        backend, list(zip(prompts, answers)), principles, out / "sft.jsonl", rounds=rounds, seed=seed,
        cache=cache, critique_template=critique_template, revision_template=revision_template)
    items, origin = [], []
    for i, rec in enumerate(records):
        if "response_a" in rec:
            items.append((prompts[i], rec["response_a"], rec["response_b"]))
            origin.append("record")
        elif samples:
            items.append((prompts[i], samples[i][0], samples[i][1]))
            origin.append("policy")
        elif results[i].revision != results[i].original:
            items.append((prompts[i], results[i].original, results[i].revision))
            origin.append("original_vs_revision")
    pairs, pref_summary = constitutional_preferences(backend, items, principles, seed=seed,
                                                     template=preference_template, cache=cache)
    write_jsonl(out / "preferences.jsonl",
                [{**preference_record(p), "pair_origin": o} for p, o in zip(pairs, origin)])
    summary = {"judge": backend.name, "principles": list(principles), "rounds": rounds,
               "sft_examples": len(results),
               "changed": sum(r.revision != r.original for r in results),
               "preferences": dict(pref_summary)}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary
