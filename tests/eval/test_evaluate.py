"""`rlhf eval` and its pieces: KL on the policy's own samples, calibration of stated confidence,
diversity numbers, prompt loading, and the whole evaluation on tiny models with a scripted judge."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import as_conversation, prompt_text
from rlhfkit.data.tokenize import encode_prompt
from rlhfkit.eval import evaluate as evaluate_module
from rlhfkit.eval.calibration import confidence_calibration, stated_confidence
from rlhfkit.eval.diversity import diversity_numbers
from rlhfkit.eval.evaluate import EvalConfig, evaluate, model_label, unique_labels
from rlhfkit.eval.kl import kl_from_logprobs, policy_reference_kl, response_batch
from rlhfkit.eval.prompts import load_eval_prompts
from rlhfkit.judge.backends import ScriptedBackend
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.rollout.generate import Generation, SamplingConfig, generate

# ----------------------------------------------------------------------------- KL

def test_response_batch_scores_only_response_tokens_from_the_position_before():
    ids, attention, labels = response_batch([([5, 6], [7, 8]), ([9], [3])], pad_id=0)
    # Row 0: position 1 (token 6) predicts 7, position 2 predicts 8. Row 1 is right-padded.
    assert ids.tolist() == [[5, 6, 7, 8], [9, 3, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, 7, 8, IGNORE_INDEX], [3, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_kl_from_logprobs_by_hand():
    # Response 1: log π = (−1, −2), log π_ref = (−1.5, −2.5) → k1 sum 0.5 + 0.5 = 1.0.
    # Response 2: log π = (−0.5,), log π_ref = (−0.2,)      → k1 sum −0.3.
    # Mean 0.35 nats/response; per token k1 (0.5 + 0.5 − 0.3)/3 = 0.7/3.
    # k3 = e^r − r − 1 with r = ref − logp: r = −0.5 twice, r = +0.3 once.
    est = kl_from_logprobs([torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])],
                           [torch.tensor([-1.5, -2.5]), torch.tensor([-0.2])], n_boot=200)
    k3 = (2 * (math.exp(-0.5) + 0.5 - 1) + (math.exp(0.3) - 0.3 - 1)) / 3
    assert est.mean == pytest.approx(0.35)
    assert est.per_token == pytest.approx(0.7 / 3)
    assert est.per_token_k3 == pytest.approx(k3)
    assert (est.n_responses, est.n_tokens) == (2, 3)
    assert -0.3 <= est.ci_low <= est.mean <= est.ci_high <= 1.0  # bootstrap means of {1.0, −0.3}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def sampled(tok):
    """Four samples (temperature 1) from the seed-0 tiny model on two prompts."""
    model = tiny_causal_lm(seed=0)
    prompts = [as_conversation("Tell me about rain."), as_conversation("2+2?")]
    return model, generate(model, tok, prompts, SamplingConfig(max_new_tokens=6, temperature=1.0, n=2, seed=1))


def test_kl_of_a_model_to_itself_is_zero(tok, sampled):
    model, gens = sampled
    est = policy_reference_kl(model, model, [(g.prompt_ids, g.response_ids) for g in gens], pad_id=tok.pad_token_id)
    assert est.n_responses == 4 and est.n_tokens == sum(len(g.response_ids) for g in gens) > 0
    assert (est.mean, est.per_token, est.per_token_k3, est.ci_low, est.ci_high) == (0.0, 0.0, 0.0, 0.0, 0.0)


def test_kl_between_two_models_matches_full_logits(tok, sampled, token_logprobs_from_logits):
    model, gens = sampled
    reference = tiny_causal_lm(seed=5)
    est = policy_reference_kl(model, reference, [(g.prompt_ids, g.response_ids) for g in gens],
                              pad_id=tok.pad_token_id, batch_size=3)  # batches of 3 and 1: padding exercised
    expected = []
    for g in gens:  # one unpadded sequence at a time, full-vocabulary log-softmax
        ids = torch.tensor([g.prompt_ids + g.response_ids])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[0, len(g.prompt_ids) - 1:-1] = torch.tensor(g.response_ids)
        with torch.no_grad():
            mine = token_logprobs_from_logits(model(ids).logits, labels).sum()
            theirs = token_logprobs_from_logits(reference(ids).logits, labels).sum()
        expected.append(float(mine - theirs))
    assert est.mean == pytest.approx(sum(expected) / len(expected), abs=1e-4)
    assert est.per_token_k3 > 0


# ----------------------------------------------------------------------------- small pieces

def test_stated_confidence_and_its_calibration_error():
    assert stated_confidence("Answer: 4\nConfidence: 80%") == pytest.approx(0.8)
    assert stated_confidence("confidence level = 55.5 %") == pytest.approx(0.555)
    assert stated_confidence("I am sure.") is None
    # Stated (0.8, correct) and (0.6, wrong) fall in bins 8 and 6: ECE = (|1 − 0.8| + |0 − 0.6|) / 2 = 0.4.
    cal = confidence_calibration(["Answer: 4\nConfidence: 80%", "Confidence: 60%", "no number"],
                                 [True, False, True])
    assert cal["n_stated"] == 2 and cal["ece"] == pytest.approx(0.4)
    assert confidence_calibration(["a", "b"], [True, False]) is None


def test_diversity_numbers_by_hand():
    # Prompt 1's two samples are identical (self-similarity 1), prompt 2's share no word (0):
    # mean 0.5. Pooled words a b a b c d e f: 6 distinct of 8. Greedy answers identical: 1.0.
    out = diversity_numbers([["a b", "a b"], ["c d", "e f"]], ["x y", "x y"])
    assert out["within_prompt_self_similarity"] == pytest.approx(0.5)
    assert out["distinct_1"] == pytest.approx(6 / 8)
    assert out["across_prompt_self_similarity"] == 1.0
    assert (out["n_prompts"], out["n_samples"]) == (2, 4)


def test_model_labels_are_short_and_unique():
    assert model_label("runs/demo/dpo/final") == "dpo"
    assert model_label("runs/demo/dpo/final/") == "dpo"
    assert model_label("embedded") == "embedded"
    assert model_label("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M"
    assert unique_labels(["a/final", "b/a/final"]) == ["a", "a (2)"]
    assert unique_labels(["x", "y"], ["one", "two"]) == ["one", "two"]


def test_eval_prompts_from_the_demo_a_task_file_or_a_prompt_file(tmp_path):
    demo = load_eval_prompts("demo", n_per_family=2)
    assert sum(p.checkable for p in demo) == 8 and sum(not p.checkable for p in demo) == 2
    plain = tmp_path / "prompts.jsonl"
    plain.write_text(json.dumps({"prompt": "Hi"}) + "\n"
                     + json.dumps({"id": "x", "prompt": [{"role": "user", "content": "Yo"}]}) + "\n")
    loaded = load_eval_prompts(str(plain))
    assert [(p.id, p.family, p.checkable, prompt_text(p.prompt)) for p in loaded] == [
        ("prompt-0001", "open", False, "Hi"), ("x", "open", False, "Yo")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2.*prompt"):
        load_eval_prompts(str(bad))


# ----------------------------------------------------------------------------- the whole evaluation

@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """A second tiny model (other weights) saved as a checkpoint folder."""
    path = tmp_path_factory.mktemp("models") / "ref" / "final"
    tiny_causal_lm(seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


def longer_wins(conversation) -> str:
    text = prompt_text(conversation)
    a = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]", text, re.DOTALL).group(1)
    b = re.search(r"\[Answer B\]\n(.*?)\n\nThink", text, re.DOTALL).group(1)
    if len(a) == len(b):
        return "Verdict: tie"
    return "Verdict: A" if len(a) > len(b) else "Verdict: B"


@pytest.fixture
def scripted_greedy(monkeypatch, reference_dir):
    """Greedy decoding of random tiny models says nothing; script it: the policy ('tiny') gives a
    long answer, the reference checkpoint a short one. Sampling (temperature 1) stays real."""
    def fake_generate(model, tokenizer, prompts, cfg, *, progress=False):
        if cfg.temperature > 0:
            return generate(model, tokenizer, prompts, cfg)
        is_reference = reference_dir in str(getattr(model.config, "_name_or_path", ""))
        text = "short" if is_reference else "a much longer answer with many words"
        out = []
        for i, p in enumerate(prompts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append(Generation(i, text, encode_prompt(tokenizer, p), ids, True))
        return out

    monkeypatch.setattr(evaluate_module, "generate", fake_generate)


def _cfg(tmp_path, reference_dir, **kw):
    base = dict(model=("tiny", reference_dir), reference=reference_dir, n_per_family=2, max_new_tokens=6,
                samples_per_prompt=2, sample_prompts=3, batch_size=8, n_boot=200, judge_cache="none",
                output_dir=str(tmp_path / "eval"), keep_samples=2)
    base.update(kw)
    return EvalConfig(**base)


def test_evaluate_judges_the_model_against_the_reference(tmp_path, reference_dir, scripted_greedy):
    backend = ScriptedBackend(longer_wins)
    result = evaluate(_cfg(tmp_path, reference_dir), judge_backend=backend)
    on_disk = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert on_disk["models"] == result["models"]
    assert result["prompts"] == {"checkable": 8, "open": 2, "sampled": 3}
    policy, ref = result["models"]
    assert (policy["name"], ref["name"], ref["is_reference"]) == ("tiny", "ref", True)
    # The policy's answer is longer on both open prompts; the judge prefers it in both orders.
    wr = policy["win_rate"]
    assert (wr["mean"], wr["wins"], wr["ties"], wr["losses"], wr["n"]) == (1.0, 2, 0, 0, 2)
    assert wr["inconsistent"] == 0 and wr["position_bias"] == 0.0
    assert backend.calls == 4  # 2 open prompts × 2 orders; the reference is not judged against itself
    assert policy["lc_win_rate"]["n"] == 2 and ref.get("win_rate") is None
    # Exact match ran on all 8 checkable tasks (the scripted answers are never right), so the gold
    # win rate against the (also never right) reference is 8 ties; none for the reference itself.
    assert policy["exact_match"]["n"] == 8 and policy["exact_match"]["accuracy"] == 0.0
    gold = policy["gold_win_rate"]
    assert (gold["mean"], gold["ties"], gold["n"], gold["judge"]) == (0.5, 8, 8, "exact checker")
    assert ref.get("gold_win_rate") is None and ref["exact_match"]["n"] == 8
    # KL on each model's own samples: 0 for the reference, positive for the other model.
    assert ref["kl"]["mean"] == 0.0 and ref["kl"]["per_token_k3"] == 0.0
    assert policy["kl"]["per_token_k3"] > 0 and policy["kl"]["n_responses"] == 6
    assert policy["length"]["mean_words"] > ref["length"]["mean_words"]
    # Greedy answers across prompts: 8 empty checkable ones and 2 equal open ones. Of the 45 pairs,
    # 28 + 1 are identical (similarity 1) and 16 share nothing (0): 29/45.
    assert policy["diversity"]["n_samples"] == 6
    assert policy["diversity"]["across_prompt_self_similarity"] == pytest.approx(29 / 45)
    # Side-by-side samples: 2 open (with the reference's answer) and 2 checkable prompts.
    assert len(result["samples"]) == 4
    open_sample = result["samples"][0]
    assert open_sample["reference"] == "short" and open_sample["answer"] is None
    assert open_sample["responses"]["tiny"]["text"] == "a much longer answer with many words"
    assert result["samples"][2]["responses"]["ref"]["correct"] is False
    assert result["judge"]["name"] == "scripted"


def test_a_position_biased_judge_gives_half(tmp_path, reference_dir, scripted_greedy):
    result = evaluate(_cfg(tmp_path, reference_dir, model=("tiny",), sample_prompts=0),
                      judge_backend=ScriptedBackend(lambda c: "Verdict: A"))
    wr = result["models"][0]["win_rate"]
    assert (wr["mean"], wr["ties"], wr["inconsistent"], wr["position_bias"]) == (0.5, 2, 2, 1.0)
    assert "kl" not in result["models"][0]  # no samples, no KL


def test_reward_model_accuracy_and_scores(tmp_path, reference_dir, scripted_greedy):
    from rlhfkit.eval.reward import evaluate_file
    from rlhfkit.models.reward import tiny_reward_model

    rm_dir = tmp_path / "rm" / "final"
    tiny_reward_model(seed=0).model.save_pretrained(rm_dir)
    tiny_tokenizer().save_pretrained(rm_dir)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "q", "chosen": "good answer", "rejected": "bad"},
        {"prompt": "p", "chosen": "yes", "rejected": "no", "label": 0.5}]))
    result = evaluate(_cfg(tmp_path, reference_dir, model=("tiny",), judge="none", sample_prompts=0,
                           reward_model=str(rm_dir), pairs=str(pairs)))
    rm = result["reward_model"]
    direct = evaluate_file(str(rm_dir), str(pairs))
    assert (rm["num_pairs"], rm["num_ties"]) == (2, 1)
    assert rm["accuracy"] == direct["accuracy"] and rm["ece"] == pytest.approx(direct["ece"])
    assert result["models"][0]["reward"]["n"] == 10  # every greedy answer scored
    assert result["judge"] is None and "win_rate" not in result["models"][0]


# ----------------------------------------------------------------------------- rlhf eval

runner = CliRunner(env={"COLUMNS": "220", "NO_COLOR": "1"})


def test_cli_eval_prints_the_table_and_writes_eval_json(tmp_path, reference_dir, monkeypatch, restore_root_logger):
    from rlhfkit.cli import app

    built = []
    monkeypatch.setattr(evaluate_module, "backend_from_spec",
                        lambda spec, **kw: built.append(spec) or ScriptedBackend(longer_wins, name=f"s:{spec}"))
    out = tmp_path / "ev"
    result = runner.invoke(app, ["eval", "--model", f"tiny,{reference_dir}", "--reference", reference_dir,
                                 "--names", "policy,sft", "--n-per-family", "1", "--max-new-tokens", "4",
                                 "--samples-per-prompt", "2", "--sample-prompts", "2", "--n-boot", "100",
                                 "--judge", "http://127.0.0.1:9/v1", "--judge-cache", "none", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    assert built == ["http://127.0.0.1:9/v1"]
    data = json.loads((out / "eval.json").read_text())
    assert [m["name"] for m in data["models"]] == ["policy", "sft"]
    # Random tiny models answer nothing in greedy decoding: identical empty answers are ties.
    assert data["models"][0]["win_rate"]["mean"] == 0.5
    text = " ".join(result.output.split())
    assert "held-out evaluation (4 checkable, 1 open prompts)" in text
    assert "policy" in text and "sft (reference)" in text and "50.0%" in text
    assert f"rlhf report {out}" in text


def test_cli_eval_rejects_bad_flags_and_missing_models(tmp_path, restore_root_logger):
    from rlhfkit.cli import app

    result = runner.invoke(app, ["eval", "--model", "tiny", "--pairs", "p.jsonl", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--pairs needs --reward-model" in result.output
    # A missing model fails before the first model runs, with one line naming it.
    result = runner.invoke(app, ["eval", "--model", "tiny,runs/nothing/final", "--judge", "none",
                                 "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no such model folder: runs/nothing/final" in result.output
    assert not (tmp_path / "eval.json").exists()


def test_gold_win_rate_by_hand():
    from rlhfkit.eval.evaluate import gold_win_rate

    # prompts: only model right, only reference right, both right, neither, only model right
    model = [True, False, True, False, True]
    reference = [False, True, True, False, False]
    g = gold_win_rate(model, reference, n_boot=500, seed=0)
    # outcomes 1, 0, ½, ½, 1 → mean 3/5; = ½ + ½·(accuracy 3/5 − accuracy 2/5)
    assert g["mean"] == pytest.approx(0.6) and (g["wins"], g["ties"], g["losses"], g["n"]) == (2, 2, 1, 5)
    assert 0.0 <= g["ci_low"] <= 0.6 <= g["ci_high"] <= 1.0
    with pytest.raises(ValueError, match="5 model answers but 4"):
        gold_win_rate(model, reference[:4], n_boot=10, seed=0)
