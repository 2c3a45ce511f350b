"""The DPO-family recipe end to end on the tiny random model: step-0 values by hand, the
reference cache (equal to a direct computation, computed once, reused on resume), one packed
forward for chosen + rejected, learning on a synthetic preference set, KTO, LoRA."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhfkit.config import ConfigError
from rlhfkit.data import reference_cache
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.packing import plan_batches
from rlhfkit.data.preference_batches import (
    collate_pairs,
    encode_feedback,
    encode_preference_pairs,
    mismatched_partners,
)
from rlhfkit.data.readers import read_preferences
from rlhfkit.data.reference_cache import sequence_sums
from rlhfkit.data.schemas import UnpairedFeedback, as_conversation
from rlhfkit.data.tokenize import encode_pair
from rlhfkit.losses.preference_registry import LOSS_DEFAULTS, PREFERENCE_LOSSES
from rlhfkit.models.loading import LoraSettings, load_model
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.recipes import dpo
from rlhfkit.recipes.dpo import DPOConfig, preference_task, run_dpo
from rlhfkit.train.metrics import read_metrics

WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "rocket", "maple", "comet",
         "otter", "bison", "cedar", "delta", "ember", "flute", "grape", "heron", "igloo", "jelly"]
MARKER = " +"  # the preferred responses end with it


def write_pairs(path: Path, words: list[str]) -> Path:
    """Synthetic preferences: the chosen response carries MARKER, the rejected one does not."""
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": f"Name {w}.", "chosen": f"{w}{MARKER}", "rejected": w}) + "\n"
                     for w in words)
    return path


def write_unpaired(path: Path, words: list[str]) -> Path:
    """Synthetic thumbs up/down: a response with MARKER is desirable, one without is not."""
    with open(path, "w") as f:
        for i, w in enumerate(words):
            good = i % 2 == 0
            f.write(json.dumps({"prompt": f"Name {w}.", "completion": f"{w}{MARKER}" if good else w,
                                "label": good}) + "\n")
    return path


def tiny_dpo_config(tmp_path: Path, train_data: Path, **overrides) -> DPOConfig:
    """The whole recipe on model='tiny' in fp32: a run takes a second or two."""
    base = {"model": "tiny", "train_data": str(train_data), "output_dir": str(tmp_path / "run"), "max_steps": 2,
            "batch_size": 8, "lr": 3e-3, "precision": "fp32", "progress": False, "seed": 3, "schedule": "constant"}
    base.update(overrides)
    return DPOConfig(**base)


@pytest.fixture(scope="session")
def direct_sum_logprob(token_logprobs_from_logits):
    """direct_sum_logprob(model, enc) → Σ log π over the response tokens from a plain
    full-logits forward of one sequence."""

    def direct(model, enc) -> float:
        ids = torch.tensor([enc.input_ids])
        labels = torch.tensor([enc.labels])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return float(token_logprobs_from_logits(logits, labels).sum())

    return direct


def encoded_pairs(path: Path):
    tok = tiny_tokenizer()
    return encode_preference_pairs(tok, read_preferences(path), 512, SkipReport(), str(path), drop_identical=True)


def losses_by_step(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "loss" in m}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    # threads waiting on each other made each forward ~50× slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_calls(monkeypatch):
    """count_calls(obj, name) wraps obj.name and returns the list its calls are appended to."""
    def wrap(obj, name):
        calls = []
        original = getattr(obj, name)

        def counted(*args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, counted)
        return calls
    return wrap


# ----------------------------------------------------------------------------- config


def test_config_names_the_nearest_loss_and_rejects_unused_hyperparameters():
    with pytest.raises(ConfigError, match="Did you mean 'dpo'"):
        DPOConfig(train_data="x.jsonl", loss="dpp")
    with pytest.raises(ConfigError, match="'label_smoothing' is not used by loss 'ipo'"):
        DPOConfig(train_data="x.jsonl", loss="ipo", label_smoothing=0.1)
    with pytest.raises(ConfigError, match="reference-free"):
        DPOConfig(train_data="x.jsonl", loss="simpo", reference="some/model")
    with pytest.raises(ConfigError, match="flip_rate"):
        DPOConfig(train_data="x.jsonl", loss="robust", flip_rate=0.5)
    with pytest.raises(ConfigError, match="beta"):
        DPOConfig(train_data="x.jsonl", beta=0.0)
    # Every registered loss has a default for exactly its hyper-parameters.
    for name, spec in PREFERENCE_LOSSES.items():
        assert set(LOSS_DEFAULTS[name]) == set(spec.hyperparameters), name
    assert DPOConfig(train_data="x.jsonl", loss="simpo").loss_hyperparameters == {"beta": 2.0, "gamma": 1.0}
    assert DPOConfig(train_data="x.jsonl", beta=0.3).loss_hyperparameters == {"beta": 0.3, "label_smoothing": 0.0}


def test_cli_reports_an_unknown_loss_in_one_line():
    from rlhfkit.cli import app

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # the CLI callback replaces them
    try:
        result = CliRunner(env={"COLUMNS": "200", "NO_COLOR": "1"}).invoke(
            app, ["dpo", "--loss", "kt0", "--train-data", "x.jsonl"])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert result.exit_code == 2
    assert "Did you mean 'kto'" in " ".join(result.output.split())


def test_over_length_and_identical_pairs_are_skipped_and_counted(tmp_path):
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n")
        f.write(json.dumps({"prompt": "Hi", "chosen": "same", "rejected": "same"}) + "\n")
        f.write(json.dumps({"prompt": "Hi", "chosen": "x" * 40, "rejected": "b"}) + "\n")
    skipped = SkipReport()
    # Prompt "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n": 1+4+1+2+1+1+1+9+1 = 21
    # tokens (bytes, specials one each); "a<|im_end|>\n" 3 more → 24 ≤ 32 < 21 + 40 + 2 = 63.
    kept = encode_preference_pairs(tiny_tokenizer(), read_preferences(path), 32, skipped, str(path),
                                   drop_identical=True)
    assert len(kept) == 1 and len(kept[0].chosen) == 24
    assert skipped.counts == {"identical responses": 1, "longer than max_length": 1}
    with pytest.raises(DataError, match="every training record was skipped"):
        run_dpo(tiny_dpo_config(tmp_path, path, max_length=8))


def test_ties_drop_leaves_out_tied_training_pairs_and_counts_them(tmp_path):
    path = tmp_path / "p.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n")
        f.write(json.dumps({"prompt": "Hi", "chosen": "c", "rejected": "d", "label": 0.5}) + "\n")
        f.write(json.dumps({"prompt": "Yo", "chosen": "e", "rejected": "f", "label": 0.5}) + "\n")
    spec = dpo.get_preference_loss("dpo")
    for ties, kept_pairs, counts in (("keep", 3, {}), ("drop", 1, {"tie (ties=drop)": 2})):
        skipped = SkipReport()
        cfg = tiny_dpo_config(tmp_path, path, ties=ties)
        assert len(dpo.load_items(str(path), spec, tiny_tokenizer(), cfg, skipped)) == kept_pairs
        assert skipped.counts == counts
    # Held-out pairs keep their ties whatever `ties` says (accuracy reports them apart).
    eval_items = dpo.load_items(str(path), spec, tiny_tokenizer(), tiny_dpo_config(tmp_path, path, ties="drop"),
                                SkipReport(), pairs_for_eval=True)
    assert len(eval_items) == 3


def test_paired_loss_on_unpaired_file_names_the_file(tmp_path):
    data = write_unpaired(tmp_path / "thumbs.jsonl", WORDS[:4])
    with pytest.raises(DataError, match="thumbs.jsonl.*use --loss kto"):
        run_dpo(tiny_dpo_config(tmp_path, data))


# ----------------------------------------------------------------------------- step 0 by hand


# With policy = reference every log-ratio is 0, so h = 0 for every pair and:
#   dpo     −log σ(0)                                  = log 2
#   cdpo    −[t·log σ(0) + (1 − t)·log σ(0)]            = log 2  (any smoothing)
#   ipo     (0 − 1/(2β))²  with β = 0.25               = 2² = 4
#   hinge   max(0, 1 − 0)                              = 1
#   robust  [(1 − ε)·log 2 − ε·log 2] / (1 − 2ε)        = log 2
STEP0 = [("dpo", {"beta": 0.1}, math.log(2)),
         ("dpo", {"beta": 0.1, "label_smoothing": 0.2}, math.log(2)),
         ("ipo", {"beta": 0.25}, 4.0),
         ("hinge", {"beta": 0.1}, 1.0),
         ("robust", {"beta": 0.1, "flip_rate": 0.2}, math.log(2))]


@pytest.mark.parametrize("packing", [True, False])
def test_step0_loss_by_hand_for_every_batch(tmp_path, packing):
    pairs = encoded_pairs(write_pairs(tmp_path / "p.jsonl", WORDS[:10]))
    policy = TokenLogprobs(tiny_causal_lm(seed=5))
    ref = reference_cache.compute_reference_logps(policy, {"train": [p.sequences for p in pairs]}, batch_size=6,
                                                  pad_id=0, packing=packing, device="cpu")["train"]
    batches = plan_batches([len(p) for p in pairs], 4, seed=0, epoch=0, group_by_length=False)
    assert [len(b) for b in sorted(batches, key=len)] == [2, 4, 4]
    for name, hyper, expected in STEP0:
        task = preference_task(PREFERENCE_LOSSES[name], hyper, pairs, [], pad_id=0, packing=packing, ref_train=ref)
        for idx in batches:
            value, sums = task.loss(policy, task.make_batch(idx), float(len(idx)))  # normalizer = B: the mean
            # The reference pass packed other rows, so h is 0 up to float rounding (~1e-7).
            assert float(value.detach()) == pytest.approx(expected, abs=1e-5), (name, idx)
            assert float(sums["loss"]) == pytest.approx(expected * len(idx), abs=1e-4)
            assert float(sums["rewards/margin"]) == pytest.approx(0.0, abs=1e-5)


def test_nll_weight_adds_alpha_times_the_preferred_responses_mean_nll(tmp_path):
    """RPO: at step 0 (policy = reference) DPO is log 2, so the step loss is log 2 + α · mean_i
    (−π_c,i / |y_c,i|), with π_c computed directly by the policy here."""
    pairs = encoded_pairs(write_pairs(tmp_path / "p.jsonl", WORDS[:4]))
    policy = TokenLogprobs(tiny_causal_lm(seed=5))
    ref = reference_cache.compute_reference_logps(policy, {"train": [p.sequences for p in pairs]}, batch_size=8,
                                                  pad_id=0, packing=False, device="cpu")["train"]
    task = preference_task(PREFERENCE_LOSSES["dpo"], {"beta": 0.1}, pairs, [], pad_id=0, packing=False,
                           ref_train=ref, nll_weight=0.5)
    idx = list(range(len(pairs)))
    with torch.no_grad():
        value, sums = task.loss(policy, task.make_batch(idx), float(len(idx)))
    per_token = [float(ref[i, 0]) / sum(t != -100 for t in p.chosen.labels) for i, p in enumerate(pairs)]
    nll = -sum(per_token) / len(per_token)
    assert float(sums["nll/preferred"]) / len(idx) == pytest.approx(nll, rel=1e-4)
    assert float(value) == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4)
    with pytest.raises(ConfigError, match="unpaired"):
        DPOConfig(train_data="x.jsonl", loss="kto", nll_weight=0.1)


def test_kto_step0_by_hand(tmp_path):
    # r = 0 and z0 = max(0, 0) = 0 → desirable: λ_D − λ_D·σ(0) = λ_D/2 = 1,
    # undesirable: λ_U/2 = 0.25. Micro-batch of flags [T, F, T, T]: (1 + 0.25 + 1 + 1)/4 = 0.8125.
    tok = tiny_tokenizer()
    flags = [True, False, True, True]
    feedback = [UnpairedFeedback(as_conversation(f"Name {w}."), w, d) for w, d in zip(WORDS, flags)]
    items = encode_feedback(tok, feedback, 512, SkipReport(), "mem", seed=0)
    policy = TokenLogprobs(tiny_causal_lm(seed=5))
    ref = reference_cache.compute_reference_logps(policy, {"train": [f.sequences for f in items]}, batch_size=8,
                                                  pad_id=0, packing=True, device="cpu")["train"]
    hyper = {"beta": 0.1, "desirable_weight": 2.0, "undesirable_weight": 0.5}
    task = preference_task(PREFERENCE_LOSSES["kto"], hyper, items, [], pad_id=0, packing=True, ref_train=ref)
    value, sums = task.loss(policy, task.make_batch([0, 1, 2, 3]), 4.0)
    assert float(value.detach()) == pytest.approx(0.8125, abs=1e-6)
    assert float(sums["kto/desirable_fraction"]) == 3


# ----------------------------------------------------------------------------- one forward


def test_packed_chosen_rejected_forward_equals_padded_and_is_one_backbone_call(tmp_path, direct_sum_logprob):
    pairs = encoded_pairs(write_pairs(tmp_path / "p.jsonl", WORDS[:5]))
    model = tiny_causal_lm(seed=2)
    policy = TokenLogprobs(model)
    backbone_calls = []
    model.model.register_forward_hook(lambda *a: backbone_calls.append(1))
    packed = collate_pairs(pairs, pad_id=0, packed=True)
    assert packed.sequences.input_ids.shape == (1, sum(len(p) for p in pairs))  # no padding at all
    with torch.no_grad():
        sums_packed = sequence_sums(policy, packed.sequences, 2 * len(pairs))
    assert len(backbone_calls) == 1
    padded = collate_pairs(pairs, pad_id=0, packed=False)
    with torch.no_grad():
        sums_padded = sequence_sums(policy, padded.sequences, 2 * len(pairs))
    torch.testing.assert_close(sums_packed, sums_padded, atol=1e-5, rtol=0)
    # chosen first, then rejected, each equal to an independent full-logits forward
    direct = ([direct_sum_logprob(model, p.chosen) for p in pairs]
              + [direct_sum_logprob(model, p.rejected) for p in pairs])
    torch.testing.assert_close(sums_packed, torch.tensor(direct), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- reference cache


def test_reference_cache_equals_direct_computation_and_is_reused_on_resume(tmp_path, count_calls,
                                                                           direct_sum_logprob):
    data = write_pairs(tmp_path / "p.jsonl", WORDS[:6])
    computed = count_calls(reference_cache, "compute_reference_logps")
    cfg = tiny_dpo_config(tmp_path, data, max_steps=3, save_every=2, batch_size=4)
    first = run_dpo(cfg)
    assert first["reference"]["reused"] is False and len(computed) == 1
    # A run that died after its step-2 checkpoint resumes and reuses the cache.
    second = run_dpo(cfg)
    assert second["reference"]["reused"] is True and len(computed) == 1
    assert sorted(losses_by_step(cfg.output_dir)) == [1, 2, 3]
    # The cached numbers are the starting model's log-probs, from a plain forward per sequence.
    blob = torch.load(Path(cfg.output_dir) / reference_cache.CACHE_FILE, weights_only=True)
    start = tiny_causal_lm(seed=cfg.seed)
    direct = torch.tensor([[direct_sum_logprob(start, p.chosen), direct_sum_logprob(start, p.rejected)]
                           for p in encoded_pairs(data)])
    torch.testing.assert_close(blob["splits"]["train"], direct, atol=1e-5, rtol=0)


def test_reference_key_changes_with_tokens_precision_and_model():
    tok = tiny_tokenizer()
    a = encode_pair(tok, as_conversation("Hi"), "yes")
    b = encode_pair(tok, as_conversation("Hi"), "yet")
    key = reference_cache.reference_key("tiny(seed=0)", {"train": [a]}, "fp32")
    assert key == reference_cache.reference_key("tiny(seed=0)", {"train": [a]}, "fp32")
    assert key != reference_cache.reference_key("tiny(seed=0)", {"train": [b]}, "fp32")
    assert key != reference_cache.reference_key("tiny(seed=0)", {"train": [a]}, "bf16")
    assert key != reference_cache.reference_key("tiny(seed=1)", {"train": [a]}, "fp32")


def test_reference_pass_in_bf16_autocast_matches_a_direct_bf16_forward(tmp_path, direct_sum_logprob):
    pairs = encoded_pairs(write_pairs(tmp_path / "p.jsonl", WORDS[:3]))
    model = tiny_causal_lm(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = reference_cache.compute_reference_logps(TokenLogprobs(model), {"train": [p.sequences for p in pairs]},
                                                         batch_size=6, pad_id=0, packing=True, device="cpu")["train"]
        direct = torch.tensor([[direct_sum_logprob(model, p.chosen), direct_sum_logprob(model, p.rejected)]
                               for p in pairs])
    fp32 = torch.tensor([[direct_sum_logprob(model, p.chosen), direct_sum_logprob(model, p.rejected)] for p in pairs])
    # Measured: packed-vs-single bf16 rounding ≈ 3e-5, bf16-vs-fp32 ≈ 1e-3 on these sums. So the
    # cache matches a bf16 forward, and would not if the pass had ignored the autocast.
    torch.testing.assert_close(cached, direct, atol=3e-4, rtol=0)
    assert (cached - fp32).abs().max() > 5e-4
    assert cached.dtype == torch.float32


@pytest.mark.parametrize("precompute", [True, False])
def test_bf16_first_step_sees_policy_equal_to_reference(tmp_path, precompute):
    # Training switches the model to eager attention on CPU (Engine.setup); the reference pass
    # runs before setup, and a live reference is a separate model. Both must use the same kernel,
    # or in bf16 the first step's log-ratios are not 0 and the DPO loss is not ln 2.
    data = write_pairs(tmp_path / "p.jsonl", WORDS[:8])
    cfg = tiny_dpo_config(tmp_path, data, precision="bf16", max_steps=1, precompute_reference=precompute)
    # Measured on the tiny model: 2e-9 with one kernel, 4e-6 with SDPA for the reference only.
    assert run_dpo(cfg)["metrics"]["loss"] == pytest.approx(math.log(2), abs=1e-7)


# ----------------------------------------------------------------------------- learning


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dpo")
    train = write_pairs(tmp / "train.jsonl", WORDS[:16])
    held_out = write_pairs(tmp / "eval.jsonl", WORDS[16:])
    cfg = tiny_dpo_config(tmp, train, eval_data=str(held_out), max_steps=16)
    return cfg, run_dpo(cfg)


def test_short_dpo_run_learns_the_marker(dpo_run):
    cfg, result = dpo_run
    steps = losses_by_step(cfg.output_dir)
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # step 1 is scored before any update
    assert steps[1]["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    last = steps[cfg.max_steps]
    assert last["loss"] < 0.6
    assert last["rewards/accuracy"] == 1.0 and last["rewards/margin"] > 0.2
    # Held-out pairs (unseen words): the implicit reward prefers the marker there too
    # (at step 0 every margin is 0 up to float rounding).
    assert result["metrics"]["eval/rewards/accuracy"] == 1.0
    assert result["metrics"]["eval/rewards/margin"] > 0.1


def test_live_reference_gives_the_same_losses_as_the_cache(tmp_path, dpo_run, count_calls):
    cfg, _ = dpo_run
    loads = count_calls(dpo, "load_model")
    live = run_dpo(cfg.replace(output_dir=str(tmp_path / "live"), max_steps=2, eval_data="",
                               precompute_reference=False))
    assert live["reference"] is None and not (tmp_path / "live" / reference_cache.CACHE_FILE).exists()
    assert len(loads) == 2  # full fine-tuning scored live needs a frozen copy of the start
    cached, scored_live = losses_by_step(cfg.output_dir), losses_by_step(tmp_path / "live")
    for step in (1, 2):  # the constant schedule makes steps 1–2 independent of max_steps
        assert scored_live[step]["loss"] == pytest.approx(cached[step]["loss"], abs=1e-5)


def test_packed_pairs_sharing_their_prompt_train_as_unshared_ones(tmp_path, dpo_run, monkeypatch):
    # share_prompts (the default) stores each packed pair's prompt once; the losses and gradient
    # norms of 3 steps are those of the unshared packed run, and the shared layout was used.
    from rlhfkit.data import preference_batches

    calls = []
    real = preference_batches.collate_shared_prompts
    monkeypatch.setattr(preference_batches, "collate_shared_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg, _ = dpo_run
    run_dpo(cfg.replace(output_dir=str(tmp_path / "plain"), max_steps=3, eval_data="", packing=True,
                        share_prompts=False))
    assert not calls
    run_dpo(cfg.replace(output_dir=str(tmp_path / "shared"), max_steps=3, eval_data="", packing=True))
    assert calls
    plain, shared = losses_by_step(tmp_path / "plain"), losses_by_step(tmp_path / "shared")
    for step in (1, 2, 3):
        assert shared[step]["loss"] == pytest.approx(plain[step]["loss"], abs=1e-5)
        assert shared[step]["grad_norm"] == pytest.approx(plain[step]["grad_norm"], rel=1e-4)


def test_loss_is_normalized_by_the_pairs_of_the_whole_step(tmp_path, dpo_run):
    # 2 micro-batches of 4 pairs must give the gradient of 1 micro-batch of 8 (packed plans
    # keep the shuffled order, so the pairs are the same): same gradient norm — Adam would
    # hide a constant factor in the losses, the norm does not — and the same losses.
    cfg, _ = dpo_run
    run_dpo(cfg.replace(output_dir=str(tmp_path / "whole"), max_steps=3, eval_data="", packing=True))
    run_dpo(cfg.replace(output_dir=str(tmp_path / "accum"), max_steps=3, eval_data="", batch_size=4, grad_accum=2,
                        packing=True))
    whole, accumulated = losses_by_step(tmp_path / "whole"), losses_by_step(tmp_path / "accum")
    for step in (1, 2, 3):
        assert accumulated[step]["loss"] == pytest.approx(whole[step]["loss"], abs=1e-5)
        assert accumulated[step]["units"] == 8
        assert accumulated[step]["grad_norm"] == pytest.approx(whole[step]["grad_norm"], rel=1e-4)


def test_kto_on_unpaired_feedback_runs_and_its_loss_decreases(tmp_path):
    data = write_unpaired(tmp_path / "thumbs.jsonl", WORDS[:16])
    held_out = write_unpaired(tmp_path / "held_out.jsonl", WORDS[16:])
    result = run_dpo(tiny_dpo_config(tmp_path, data, loss="kto", max_steps=12, eval_data=str(held_out)))
    steps = losses_by_step(tmp_path / "run")
    assert steps[1]["loss"] == pytest.approx(0.5, abs=1e-5)  # λ − λ·σ(0) with λ = 1
    assert steps[12]["loss"] < steps[1]["loss"] - 0.05
    assert steps[12]["rewards/accuracy"] > 0.5
    # the cache holds the completion and its mismatched sequence for every example
    blob = torch.load(tmp_path / "run" / reference_cache.CACHE_FILE, weights_only=True)
    assert blob["splits"]["train"].shape == (16, 2)
    assert result["reference"]["reused"] is False
    # unseen words: the desirable class (with the marker) gets the higher implicit reward
    assert result["metrics"]["eval/rewards/margin"] > 0


def test_mismatched_partners_never_share_a_prompt():
    keys = [(1,), (1,), (2,), (2,), (3,), (3,), (4,)]  # pairs split for KTO sit side by side
    partners = mismatched_partners(keys, seed=0)
    assert partners == mismatched_partners(keys, seed=0)
    assert all(keys[j] != keys[i] for i, j in enumerate(partners))
    with pytest.raises(DataError, match="two different prompts"):
        mismatched_partners([(1,), (1,)], seed=0)


# ----------------------------------------------------------------------------- reference-free


@pytest.mark.parametrize("loss", ["simpo", "orpo"])
def test_reference_free_losses_skip_the_reference(tmp_path, loss, count_calls, direct_sum_logprob):
    data = write_pairs(tmp_path / "p.jsonl", WORDS[:8])
    loads = count_calls(dpo, "load_model")
    computed = count_calls(reference_cache, "compute_reference_logps")
    cfg = tiny_dpo_config(tmp_path, data, loss=loss, max_steps=1)
    result = run_dpo(cfg)
    assert result["reference"] is None and not computed and len(loads) == 1
    assert not (tmp_path / "run" / reference_cache.CACHE_FILE).exists()
    # Step 1 (one micro-batch = all 8 pairs) from the starting model's log-probs by hand:
    #   simpo: −log σ(β·(π_c/|c| − π_r/|r|) − γ), β = 2, γ = 1
    #   orpo:  mean(−π_c/|c|) + 0.1 · mean(−log σ(o_c − o_r)),  o = log p − log(1 − p), log p = π/|y|
    start = tiny_causal_lm(seed=cfg.seed)
    pairs = encoded_pairs(data)
    pc = torch.tensor([direct_sum_logprob(start, p.chosen) for p in pairs], dtype=torch.float64)
    pr = torch.tensor([direct_sum_logprob(start, p.rejected) for p in pairs], dtype=torch.float64)
    nc = torch.tensor([sum(lab != -100 for lab in p.chosen.labels) for p in pairs], dtype=torch.float64)
    nr = torch.tensor([sum(lab != -100 for lab in p.rejected.labels) for p in pairs], dtype=torch.float64)
    if loss == "simpo":
        expected = -torch.nn.functional.logsigmoid(2.0 * (pc / nc - pr / nr) - 1.0).mean()
    else:
        def odds(x):
            return x - torch.log1p(-torch.exp(x))
        expected = (-pc / nc).mean() - 0.1 * torch.nn.functional.logsigmoid(odds(pc / nc) - odds(pr / nr)).mean()
    assert losses_by_step(tmp_path / "run")[1]["loss"] == pytest.approx(float(expected), abs=1e-4)


# ----------------------------------------------------------------------------- LoRA


def test_lora_reference_is_the_base_with_the_adapter_disabled(tmp_path, count_calls, direct_sum_logprob):
    data = write_pairs(tmp_path / "p.jsonl", WORDS[:6])
    loads = count_calls(dpo, "load_model")
    cfg = tiny_dpo_config(tmp_path, data, lora_r=4, lr=1e-2, max_steps=2)
    run_dpo(cfg)
    assert len(loads) == 1  # no second model
    steps = losses_by_step(cfg.output_dir)
    assert steps[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert steps[2]["loss"] < steps[1]["loss"]  # the adapter trains
    blob = torch.load(Path(cfg.output_dir) / reference_cache.CACHE_FILE, weights_only=True)
    base = tiny_causal_lm(seed=cfg.seed)
    pairs = encoded_pairs(data)
    direct = torch.tensor([[direct_sum_logprob(base, p.chosen), direct_sum_logprob(base, p.rejected)] for p in pairs])
    torch.testing.assert_close(blob["splits"]["train"], direct, atol=1e-5, rtol=0)

    # With a trained (non-zero) adapter the reference still scores the base weights.
    peft_model = load_model("tiny", lora=LoraSettings(r=4), seed=cfg.seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    policy = TokenLogprobs(peft_model)
    reference = ReferencePolicy(peft_model, identity="tiny")
    batch = collate_pairs(pairs[:2], pad_id=0, packed=True).sequences
    with torch.no_grad():
        adapted = sequence_sums(policy, batch, 4)
    scored = reference.sequence_sums(batch, 4)
    torch.testing.assert_close(scored, direct[:2].T.reshape(-1), atol=1e-5, rtol=0)
    assert (adapted - scored).abs().max() > 1e-2
    assert policy.training  # scoring restored the mode
