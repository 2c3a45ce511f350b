"""The --reward terms beyond the rule checks: classifier:PATH[:LABEL], judge / judge-ref, and
rm:PATH@REDUCTION; expected values worked by hand (or from one plain forward of the model)."""

from __future__ import annotations

import math

import httpx
import pytest
import torch

from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import as_conversation
from rlhfkit.judge.backends import LocalModelBackend, OpenAICompatibleBackend, ScriptedBackend
from rlhfkit.judge.reward import JUDGE_REWARD_BUILDERS, JudgeReward, parse_score, yes_probability
from rlhfkit.losses.reward import ensemble_reduce
from rlhfkit.models.reward import score_responses, tiny_reward_model
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.rollout.reward_spec import (
    EnsembleReduction,
    build_reward,
    parse_reduction,
    parse_reward_spec,
)
from rlhfkit.rollout.rewards import Sample


def _terms(spec):
    return [(t.source, t.arg, t.weight) for t in parse_reward_spec(spec)]


# ----------------------------------------------------------------------------- grammar
def test_new_terms_parse_with_their_arguments_and_weights():
    assert _terms("exact,classifier:/models/tox:toxic:-0.5") == [
        ("exact", None, 1.0), ("classifier", "/models/tox:toxic", -0.5)]
    assert _terms("rm:runs/rm@mean-1.0std:0.5,judge,judge-ref:local:runs/sft/final:0.3") == [
        ("rm", "runs/rm@mean-1.0std", 0.5), ("judge", None, 1.0), ("judge-ref", "local:runs/sft/final", 0.3)]
    assert _terms("judge:2,judge:http://localhost:8000/v1#qwen") == [
        ("judge", None, 2.0), ("judge", "http://localhost:8000/v1#qwen", 1.0)]


@pytest.mark.parametrize("spec, message", [
    ("judge:http://localhost/v1", r"--reward: term 'judge:http://localhost/v1': an HTTP judge needs the model"),
    ("judge-ref:gpt", r"--reward: term 'judge-ref:gpt': the judge is embedded, tiny, local:PATH"),
    ("rm:runs/rm@median", r"--reward: term 'rm:runs/rm@median': unknown ensemble reduction 'median'"),
    ("rm:@min", r"--reward: term 'rm:@min': needs a reward model folder"),
    ("classifier", r"--reward: term 'classifier': needs an argument: classifier:PATH\[:LABEL\]"),
    ("exact,clasifier:x", r"--reward: term 'clasifier:x': unknown source .*did you mean 'classifier'"),
])
def test_a_bad_term_is_one_line_naming_it(spec, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_reward_spec(spec)
    assert "\n" not in str(err.value)


def test_a_missing_classifier_folder_names_the_term(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=rf"^--reward: term 'classifier:{missing}': no such folder$"):
        build_reward(f"classifier:{missing}")


def test_judge_terms_need_the_judge_builders():
    with pytest.raises(ConfigError, match="term 'judge:tiny': judge rewards are built by rlhfkit.judge.reward"):
        build_reward("judge:tiny")


# ----------------------------------------------------------------------------- rm@REDUCTION
def test_reductions_parse():
    assert parse_reduction("mean") == EnsembleReduction("mean")
    assert parse_reduction("min") == EnsembleReduction("min")
    assert parse_reduction("mean-std") == EnsembleReduction("mean_minus_std", 1.0)
    assert parse_reduction("mean-0.5std") == EnsembleReduction("mean_minus_std", 0.5)
    assert str(parse_reduction("mean-2std")) == "mean-2std"


def test_ensemble_reductions_by_hand():
    # E = 2 members, B = 2 examples. Column 0: (1, 3), column 1: (2, 6).
    members = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    assert ensemble_reduce(members, "mean").tolist() == [2.0, 4.0]
    assert ensemble_reduce(members, "min").tolist() == [1.0, 2.0]
    # sample std: √((1−2)² + (3−2)²) = √2 and √((2−4)² + (6−4)²) = √8 = 2√2
    got = ensemble_reduce(members, "mean_minus_std", 0.5).tolist()
    assert got == pytest.approx([2 - 0.5 * math.sqrt(2), 4 - math.sqrt(2)])


@pytest.fixture(scope="module")
def rm_ensemble(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm") / "rm"
    rm = tiny_reward_model(seed=3, n_heads=2)
    tok = tiny_tokenizer()
    rm.model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, rm.eval(), tok


def test_rm_term_reduces_its_heads_as_named(rm_ensemble):
    path, rm, tok = rm_ensemble
    samples = [Sample("Add 2 and 3.", "5"), Sample("Add 2 and 3.", "It is five, I think.")]
    members = score_responses(rm, tok, [as_conversation(s.prompt) for s in samples],
                              [s.response for s in samples])                           # (2, 2)
    lo, mean = members.min(0).values.tolist(), members.mean(0).tolist()
    assert build_reward(f"rm:{path}").score(samples) == pytest.approx(mean, abs=1e-5)
    assert build_reward(f"rm:{path}@min:2").score(samples) == pytest.approx([2 * x for x in lo], abs=1e-5)
    spread = [abs(a - b) / math.sqrt(2) for a, b in zip(*members.tolist())]  # std of two values
    assert build_reward(f"rm:{path}@mean-1.5std").score(samples) == pytest.approx(
        [m - 1.5 * s for m, s in zip(mean, spread)], abs=1e-5)


def test_mean_minus_std_of_a_single_head_is_refused(tmp_path):
    rm = tiny_reward_model(seed=1)
    rm.model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer().save_pretrained(tmp_path / "rm")
    with pytest.raises(ConfigError, match=r"term 'rm:.*@mean-std': mean-1std needs an ensemble of at least 2"):
        build_reward(f"rm:{tmp_path / 'rm'}@mean-std")


# ----------------------------------------------------------------------------- classifier
@pytest.fixture(scope="module")
def toxicity(tmp_path_factory):
    """A tiny random two-label classifier saved as a folder, labels clean / toxic."""
    path = tmp_path_factory.mktemp("tox") / "tox"
    model = tiny_reward_model(seed=5, n_heads=2).model
    model.config.id2label = {0: "clean", 1: "toxic"}
    model.config.label2id = {"clean": 0, "toxic": 1}
    model.config.problem_type = "single_label_classification"
    model.save_pretrained(path)
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    return path, model.eval(), tok


def _p_toxic(model, tok, text):
    with torch.no_grad():
        logits = model(**tok([text], return_tensors="pt")).logits[0]
    return torch.softmax(logits.float(), -1)[1].item()


def test_classifier_as_a_penalty_weighted_with_exact(toxicity):
    path, model, tok = toxicity
    samples = [Sample("2+2?", "4", {"answer": "4"}), Sample("2+2?", "you fool, 5", {"answer": "4"})]
    p = [_p_toxic(model, tok, s.response) for s in samples]
    reward = build_reward(f"exact,classifier:{path}:toxic:-0.5")
    combined, raw = reward.score_detailed(samples)
    assert raw["exact"] == [1.0, 0.0]
    assert raw["classifier"] == pytest.approx(p, abs=1e-5)
    assert combined == pytest.approx([1 - 0.5 * p[0], -0.5 * p[1]], abs=1e-5)
    # no label: the positive class of a binary classifier; a label index needs a weight after it
    assert build_reward(f"classifier:{path}").score(samples) == pytest.approx(p, abs=1e-5)
    assert build_reward(f"classifier:{path}:0:1").score(samples) == pytest.approx([1 - x for x in p], abs=1e-5)


def test_an_unknown_classifier_label_names_the_term(toxicity):
    path = toxicity[0]
    with pytest.raises(ConfigError, match=rf"^--reward: term 'classifier:{path}:rude': .*label 'rude' not in"):
        build_reward(f"classifier:{path}:rude")


# ----------------------------------------------------------------------------- judge
def test_yes_probability_and_score_parsing_by_hand():
    assert yes_probability(math.log(0.6), math.log(0.2)) == pytest.approx(0.75)   # .6 / (.6 + .2)
    assert yes_probability(-1000.0, 0.0) == pytest.approx(0.0)
    assert parse_score("Good answer.\nScore: 7") == pytest.approx(6 / 9)
    assert parse_score("**Score:** 10/10") == 1.0
    assert parse_score("Score: 1\nOn reflection...\nScore: 4") == pytest.approx(3 / 9)
    assert parse_score("Score: 11") is None
    assert parse_score("I like it") is None


def test_judge_prob_mode_reads_yes_against_no():
    seen = []

    def score_fn(conversation, prefix, choices):
        seen.append((conversation[0].content, prefix, tuple(choices)))
        return [math.log(0.6), math.log(0.2)] if "four" in conversation[0].content else [math.log(0.1)] * 2

    judge = JudgeReward(ScriptedBackend(lambda c: "", score_fn=score_fn), mode="prob")
    assert judge.score([Sample("2+2?", "four"), Sample("2+2?", "fish")]) == pytest.approx([0.75, 0.5])
    assert seen[0][1:] == ("Answer:", (" yes", " no")) and "[Response]\nfour" in seen[0][0]


def test_judge_ref_shows_the_reference_and_needs_one():
    backend = ScriptedBackend(lambda c: "Score: 10" if "[Reference answer]\n4" in c[0].content else "Score: 1")
    judge = JudgeReward(backend, reference=True)
    assert judge.mode == "score"
    assert judge.score([Sample("2+2?", "4", {"answer": "4"}), Sample("3+3?", "6", {"answer": "5"})]) == [1.0, 0.0]
    with pytest.raises(DataError, match="sample 1 .*no reference 'answer' for judge-ref"):
        judge.score([Sample("2+2?", "4", {"answer": "4"}), Sample("hi", "hello", {"task_id": "t"})])


def test_an_unreadable_judge_output_scores_the_middle_and_is_counted():
    judge = JudgeReward(ScriptedBackend(lambda c: "no idea"))
    assert judge.score([Sample("q", "a"), Sample("q", "b")]) == [0.5, 0.5]
    assert judge.invalid == 2


def test_judge_terms_with_the_tiny_local_model():
    reward = build_reward("judge:tiny:0.5,judge-ref:local:tiny", builders=JUDGE_REWARD_BUILDERS)
    (judge, w1), (judge_ref, w2) = reward.sources
    assert isinstance(judge.backend, LocalModelBackend) and judge.mode == "prob" and (w1, w2) == (0.5, 1.0)
    samples = [Sample("2+2?", "4", {"answer": "4"}), Sample("2+2?", "five", {"answer": "4"})]
    combined, raw = reward.score_detailed(samples)
    for name, source in (("judge", judge), ("judge-ref", judge_ref)):
        pairs = source.backend.choice_logprobs([source.request(s) for s in samples], "Answer:", (" yes", " no"))
        expected = [1 / (1 + math.exp(no - yes)) for yes, no in pairs]
        assert raw[name] == pytest.approx(expected, abs=1e-6)
        assert all(0 < x < 1 for x in raw[name])
    assert combined == pytest.approx([0.5 * a + b for a, b in zip(raw["judge"], raw["judge-ref"])])


def test_judge_term_with_an_http_endpoint_goes_through_the_openai_backend(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    reward = build_reward("judge:http://judge.invalid/v1#tiny-judge:-2", builders=JUDGE_REWARD_BUILDERS)
    (source, weight), = reward.sources
    assert isinstance(source.backend, OpenAICompatibleBackend) and source.mode == "score" and weight == -2
    assert (source.backend.url, source.backend.model) == ("http://judge.invalid/v1/chat/completions", "tiny-judge")
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:  # a stub server: no network
        sent.append(request)
        return httpx.Response(200, json={"choices": [{"message": {"content": "Fine.\nScore: 4"}}]})

    source.backend._client = httpx.Client(transport=httpx.MockTransport(handler))
    assert reward.score([Sample("q", "a")]) == pytest.approx([-2 * 3 / 9])
    assert len(sent) == 1 and b"tiny-judge" in sent[0].content
