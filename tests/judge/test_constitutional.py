"""Constitutional AI with a scripted backend: principles, critique → revise, SFT records, AI
preference labels, caching, and the `rlhf judge` commands."""

from __future__ import annotations

import json
import logging
import re

import pytest
from typer.testing import CliRunner

from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import read_preferences, read_sft
from rlhfkit.data.schemas import Conversation, prompt_text
from rlhfkit.judge.backends import ScriptedBackend
from rlhfkit.judge.cache import JudgeCache
from rlhfkit.judge.constitutional import (
    CRITIQUE_PLACEHOLDERS,
    DEFAULT_PRINCIPLES,
    clean_revision,
    constitutional_preferences,
    constitutional_sft_dataset,
    critique_and_revise,
    critique_and_revise_many,
    load_named_template,
    load_principles,
    parse_principles,
    sample_principle,
)
from rlhfkit.judge.records import preference_record

PRINCIPLES = ("Be polite.", "Be brief.")


def between(text: str, start: str, end: str) -> str:
    match = re.search(re.escape(start) + r"\n(.*?)\n\n" + re.escape(end), text, re.DOTALL)
    assert match, text
    return match.group(1)


def editor(conversation: Conversation) -> str:
    """Critiques name the principle; revisions strip the word 'stupid' and add a label to strip."""
    text = prompt_text(conversation)
    if "[Critique]" in text:  # a revision request
        answer = between(text, "[Answer]", "[Principle]")
        return "Revision: " + answer.replace("stupid ", "") + " (revised)"
    principle = between(text, "[Principle]", "Point out")
    return f"Against '{principle}': it calls the question stupid."


# ----------------------------------------------------------------------------- principles

def test_principles_are_the_markdown_list_items_with_continuations():
    text = ("# My constitution\n\nSome intro text that is not a principle.\n\n"
            "- Be kind,\n  even when the question is odd.\n"
            "* Be brief.\n"
            "1. Answer in English.\n"
            "\nA closing paragraph.\n")
    assert parse_principles(text) == ("Be kind, even when the question is odd.", "Be brief.", "Answer in English.")


def test_a_file_without_list_items_is_a_clear_error(tmp_path):
    path = tmp_path / "p.md"
    path.write_text("Just prose, no list.\n")
    with pytest.raises(DataError, match=r"p\.md.*principles.*no principles found"):
        load_principles(path)
    with pytest.raises(DataError, match="principles file not found"):
        load_principles(tmp_path / "missing.md")


def test_the_default_principles_file_loads():
    principles = load_principles(None)
    assert DEFAULT_PRINCIPLES.is_file()
    assert 5 <= len(principles) <= 10
    assert all(p.startswith("The answer") for p in principles)  # continuations joined, prose ignored


def test_principle_draws_are_seeded_and_use_every_principle():
    draws = [sample_principle(PRINCIPLES, seed=0, item=i, round=0) for i in range(40)]
    assert draws == [sample_principle(PRINCIPLES, seed=0, item=i, round=0) for i in range(40)]
    assert set(draws) == set(PRINCIPLES)


def test_templates_missing_a_placeholder_are_rejected():
    with pytest.raises(DataError, match=r"template.*\{principle\}"):
        load_named_template("Critique {prompt} {response}", CRITIQUE_PLACEHOLDERS)
    assert "{critique}" in load_named_template("revision", ("prompt", "response", "principle", "critique"))


# ----------------------------------------------------------------------------- critique → revise

def test_critique_then_revise_chains_rounds_and_cleans_the_label():
    backend = ScriptedBackend(editor)
    result = critique_and_revise(backend, "Why is the sky blue?", "What a stupid question. Rayleigh scattering.",
                                 PRINCIPLES, rounds=2)
    # Round 1 removes "stupid " and appends " (revised)"; round 2 revises round 1's text.
    assert result.original == "What a stupid question. Rayleigh scattering."
    assert result.steps[0].revision == "What a question. Rayleigh scattering. (revised)"
    assert result.revision == "What a question. Rayleigh scattering. (revised) (revised)"
    assert backend.calls == 4  # critique, revision, critique, revision
    kinds = ["revision" if "[Critique]" in prompt_text(r) else "critique" for r in backend.requests]
    assert kinds == ["critique", "revision", "critique", "revision"]
    # The second critique reads the first revision, and every step names its drawn principle.
    assert "Rayleigh scattering. (revised)" in prompt_text(backend.requests[2])
    for step in result.steps:
        assert step.principle in PRINCIPLES
        assert step.critique == f"Against '{step.principle}': it calls the question stupid."
        assert step.revised
    assert result.critique == result.steps[-1].critique


def test_braces_in_answers_are_left_alone():
    backend = ScriptedBackend(lambda c: "fine" if "[Critique]" not in prompt_text(c) else "use {x} and {critique}")
    result = critique_and_revise(backend, "Format {prompt}", "a {response} b", PRINCIPLES)
    assert "a {response} b" in prompt_text(backend.requests[0])
    assert "Format {prompt}" in prompt_text(backend.requests[0])
    assert result.revision == "use {x} and {critique}"


def test_an_empty_rewrite_keeps_the_previous_answer(caplog):
    backend = ScriptedBackend(lambda c: "Revision:   " if "[Critique]" in prompt_text(c) else "too long")
    with caplog.at_level(logging.WARNING):
        result = critique_and_revise(backend, "q", "original answer", PRINCIPLES)
    assert result.revision == "original answer" and not result.steps[0].revised
    assert "1 of 1 rewrites were empty" in caplog.text


def test_clean_revision_strips_only_a_leading_label():
    assert clean_revision("**Revised answer:** Hello.") == "Hello."
    assert clean_revision("Rewritten response: A\nRevision: B") == "A\nRevision: B"
    assert clean_revision("Newton's laws: three of them.") == "Newton's laws: three of them."


def test_sft_dataset_is_readable_by_read_sft_and_keeps_original_and_critique(tmp_path):
    backend = ScriptedBackend(editor)
    items = [("Why is the sky blue?", "A stupid question. Scattering."),
             ([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], "stupid 4")]
    out = tmp_path / "cai" / "sft.jsonl"
    results = constitutional_sft_dataset(backend, items, PRINCIPLES, out, rounds=1)
    examples = read_sft(out)
    assert [e.response for e in examples] == ["A question. Scattering. (revised)", "4 (revised)"]
    assert [e.response for e in examples] == [r.revision for r in results]
    assert examples[0].meta["original"] == "A stupid question. Scattering."
    assert examples[0].meta["critique"].startswith("Against '")
    assert examples[1].prompt[0].role == "system"  # multi-turn prompts kept as messages
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records[0]["prompt"] == "Why is the sky blue?" and records[0]["source"] == "ai"
    assert records[0]["rounds"][0]["principle"] in PRINCIPLES


def test_a_rerun_with_the_cache_asks_the_backend_nothing(tmp_path):
    items = [("q1", "stupid a"), ("q2", "stupid b")]
    with JudgeCache(tmp_path / "cache.sqlite") as cache:
        first = ScriptedBackend(editor)
        a = critique_and_revise_many(first, items, PRINCIPLES, rounds=2, cache=cache)
        second = ScriptedBackend(editor)
        b = critique_and_revise_many(second, items, PRINCIPLES, rounds=2, cache=cache)
    assert first.calls == 8 and second.calls == 0
    assert a == b


# ----------------------------------------------------------------------------- AI preferences

def polite_judge(conversation: Conversation) -> str:
    """Consistent: prefers whichever shown answer does not contain 'stupid'."""
    text = prompt_text(conversation)
    a = between(text, "[Answer A]", "[Answer B]")
    b = re.search(r"\[Answer B\]\n(.*?)\n\n", text, re.DOTALL).group(1)  # any template: the next blank line ends it
    if ("stupid" in a) == ("stupid" in b):
        return "Verdict: tie"
    return "Polite one wins.\nVerdict: " + ("B" if "stupid" in a else "A")


def test_constitutional_preferences_label_by_principle_in_both_orders(tmp_path):
    backend = ScriptedBackend(polite_judge)
    items = [("q1", "stupid answer", "kind answer"), ("q2", "kind", "also kind"),
             {"prompt": "q3", "response_a": "fine", "response_b": "stupid"}]
    pairs, summary = constitutional_preferences(backend, items, PRINCIPLES, seed=3)
    assert [(p.chosen, p.rejected, p.label) for p in pairs] == [
        ("kind answer", "stupid answer", 1.0), ("kind", "also kind", 0.5), ("fine", "stupid", 1.0)]
    assert all(p.provenance.source == "ai" and p.provenance.annotator == "scripted" for p in pairs)
    # (stupid, kind) shown as A, B → "B"; then as B, A → "A": both name "kind".
    assert pairs[0].provenance.rationale == ("[order ab]\nPolite one wins.\nVerdict: B\n\n"
                                             "[order ba]\nPolite one wins.\nVerdict: A")
    assert backend.calls == 6  # three pairs, both orders
    for i, p in enumerate(pairs):
        assert p.meta["principle"] == sample_principle(PRINCIPLES, 3, i, 0)
    # The principle drawn for a pair is written into the prompt the judge saw for it.
    for request in backend.requests:
        text = prompt_text(request)
        assert between(text, "[Principle]", "[Request]") in PRINCIPLES
    assert summary["ties"] == 1 and summary["n"] == 3 and sum(summary["per_principle"].values()) == 3

    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(preference_record(p)) + "\n" for p in pairs))
    back = read_preferences(path)
    assert [(p.chosen, p.label, p.provenance.source) for p in back] == [
        ("kind answer", 1.0, "ai"), ("kind", 0.5, "ai"), ("fine", 1.0, "ai")]
    assert back[0].meta["principle"] == pairs[0].meta["principle"]


def test_a_position_biased_judge_gives_only_ties():
    backend = ScriptedBackend(lambda c: "Verdict: A")
    pairs, summary = constitutional_preferences(backend, [("q", "x", "y"), ("q2", "u", "v")], PRINCIPLES)
    assert [p.label for p in pairs] == [0.5, 0.5]
    assert summary["inconsistent"] == 2 and summary["ties"] == 2


# ----------------------------------------------------------------------------- rlhf judge ...

runner = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture
def scripted_cli(monkeypatch):
    """`--judge anything` builds this scripted backend instead of loading a model."""
    from rlhfkit.cli import judge as judge_cli

    backends: list[ScriptedBackend] = []

    def fake(spec, **kwargs):
        def answer(conversation):
            text = prompt_text(conversation)
            if "[Answer A]" in text:
                return polite_judge(conversation)
            return editor(conversation) if "[Principle]" in text else "stupid first answer"
        backends.append(ScriptedBackend(answer, name=f"scripted:{spec}"))
        return backends[-1]

    monkeypatch.setattr(judge_cli, "backend_from_spec", fake)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield backends
    root.handlers[:] = handlers
    root.setLevel(level)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_judge_pairs_writes_ai_preferences(tmp_path, scripted_cli):
    from rlhfkit.cli import app

    data = _jsonl(tmp_path / "pairs.jsonl", [
        {"id": 7, "prompt": "q1", "response_a": "stupid", "response_b": "kind"},
        {"id": 8, "prompt": "q2", "response_a": "kind", "response_b": "kind too"}])
    out = tmp_path / "ai.jsonl"
    args = ["judge", "pairs", "--data", str(data), "--out", str(out), "--judge", "x", "--cache",
            str(tmp_path / "c.sqlite"), "--round", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 pairs: a 0 / b 1 / tie 1" in result.output and "4 judge calls" in result.output
    pairs = read_preferences(out)
    assert [(p.chosen, p.label) for p in pairs] == [("kind", 1.0), ("kind", 0.5)]
    assert pairs[0].provenance.source == "ai" and pairs[0].provenance.round == 2
    assert pairs[0].provenance.annotator == "scripted:x" and pairs[0].meta["id"] == 7
    again = runner.invoke(app, args)  # same cache: nothing asked twice
    assert again.exit_code == 0 and "0 judge calls" in again.output


def test_cli_judge_pairs_names_file_line_and_field_of_a_bad_record(tmp_path, scripted_cli):
    from rlhfkit.cli import app

    data = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "response_a": "a", "response_b": "b"},
                                             {"prompt": "q", "response_a": "a"}])
    result = runner.invoke(app, ["judge", "pairs", "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2
    assert "pairs.jsonl:2" in result.output and "response_b" in result.output
    assert not scripted_cli  # failed before any backend was built


def test_cli_judge_agreement_against_human_export(tmp_path, scripted_cli):
    from rlhfkit.cli import app

    # Human labels as the labeling app exports them; the judge agrees on the first two only:
    # pair 1 human a (1.0) / judge a; pair 2 human tie / judge tie; pair 3 human a / judge b.
    human = _jsonl(tmp_path / "export.jsonl", [
        {"prompt": "q1", "chosen": "kind", "rejected": "stupid", "label": 1.0, "annotator": "ann", "source": "human"},
        {"prompt": "q2", "chosen": "ok", "rejected": "fine", "label": 0.5, "annotator": "ann", "source": "human"},
        {"prompt": "q3", "chosen": "stupid", "rejected": "nice", "label": 1.0, "annotator": "bob", "source": "human"}])
    out = tmp_path / "agreement.json"
    result = runner.invoke(app, ["judge", "agreement", "--data", str(human), "--out", str(out), "--cache", "none"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 3 and report["agreement"] == pytest.approx(2 / 3)
    assert report["confusion"]["b"]["a"] == 1 and report["confusion"]["tie"]["tie"] == 1
    # κ = (p_o − p_e)/(1 − p_e): judge {a,tie,b}, human {a,tie,a}: p_e = (1/3·2/3) + (1/3·1/3) + 0 = 1/3.
    assert report["cohen_kappa"] == pytest.approx((2 / 3 - 1 / 3) / (1 - 1 / 3))
    assert "agreement 66.7%" in result.output


def test_cli_judge_constitutional_writes_sft_and_preferences(tmp_path, scripted_cli):
    from rlhfkit.cli import app

    principles = tmp_path / "p.md"
    principles.write_text("- Be polite.\n- Be brief.\n")
    prompts = _jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "q1", "response": "stupid reply"},          # revised as given
        {"prompt": "q2"},                                       # the judge model answers first
        {"prompt": "q3", "response": "stupid x", "response_a": "stupid", "response_b": "kind"}])
    out = tmp_path / "cai"
    result = runner.invoke(app, ["judge", "constitutional", "--prompts", str(prompts), "--output-dir", str(out),
                                 "--principles", str(principles), "--cache", "none"])
    assert result.exit_code == 0, result.output
    sft = read_sft(out / "sft.jsonl")
    assert [e.response for e in sft] == ["reply (revised)", "first answer (revised)", "x (revised)"]
    assert sft[1].meta["original"] == "stupid first answer"
    prefs = read_preferences(out / "preferences.jsonl")
    # q1, q2: original vs revision (the revision is polite); q3: the record's own pair.
    assert [(p.chosen, p.rejected) for p in prefs] == [
        ("reply (revised)", "stupid reply"), ("first answer (revised)", "stupid first answer"), ("kind", "stupid")]
    assert [p.meta["pair_origin"] for p in prefs] == ["original_vs_revision"] * 2 + ["record"]
    assert all(p.meta["principle"] in ("Be polite.", "Be brief.") for p in prefs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["principles"] == ["Be polite.", "Be brief."] and summary["changed"] == 3
