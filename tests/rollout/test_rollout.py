"""Rollouts: log-probs from the chunked forward, the reference (frozen copy / LoRA off), masks
after the stop token, the row layout, prompts, reward specs and the reward-model source."""

import dataclasses
import json

import pytest
import torch
from torch import nn

from rlhfkit.config import ConfigError
from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import as_conversation
from rlhfkit.models.loading import LoraSettings, load_model
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.models.tiny import tiny_causal_lm, tiny_tokenizer
from rlhfkit.models.value import PolicyValueModel
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.prompts import RLPrompt, demo_prompts, read_prompts
from rlhfkit.rollout.reward_spec import GoldReward, RewardModelSource, build_reward, parse_reward_spec
from rlhfkit.rollout.rewards import FunctionReward, Sample, WeightedRewards
from rlhfkit.rollout.rollout import Rollout, build_rollout, micro_batches

EOS = 2  # <|im_end|> in the tiny tokenizer
PAD = 0


@pytest.fixture(autouse=True)
def one_thread():
    # The tiny model is latency-bound: extra threads only contend on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _prompts():
    return [RLPrompt(as_conversation("Add 2 and 3.")), RLPrompt(as_conversation("Name a colour, please."))]


def _length_reward():
    return WeightedRewards([(FunctionReward("chars", lambda s: float(len(s.response))), 1.0)])


def _fresh_response_logprobs(model, rollout: Rollout, row: int, temperature: float) -> torch.Tensor:
    """log π(response tokens) from one unpadded full-vocabulary forward of prompt + response."""
    prompt = rollout.prompt_ids[row][rollout.prompt_mask[row].bool()]
    response = rollout.response_ids[row][rollout.response_mask[row].bool()]
    ids = torch.cat([prompt, response])[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    predicting = logits[len(prompt) - 1: len(prompt) - 1 + len(response)]
    return torch.log_softmax(predicting, -1).gather(1, response[:, None]).squeeze(1)


def test_old_logprobs_equal_a_fresh_forward_and_match_the_reference_before_training():
    model, tok = tiny_causal_lm(seed=0), tiny_tokenizer()
    policy = PolicyValueModel(model, chunk_size=7)  # chunks that do not divide the token count
    sampling = SamplingConfig(max_new_tokens=6, temperature=0.7, n=3, seed=1)
    # micro-batch 4 over 6 rows: the last micro-batch is short, so padding widths differ
    rollout = build_rollout(policy, ReferencePolicy(model), tok, _prompts(), _length_reward(), sampling,
                            micro_batch_size=4, chunk_size=7)
    assert rollout.num_rows == 6 and rollout.group_size == 3
    assert rollout.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for row in range(rollout.num_rows):
        n = int(rollout.response_mask[row].sum())
        fresh = _fresh_response_logprobs(model, rollout, row, temperature=0.7)
        torch.testing.assert_close(rollout.old_logprobs[row, :n], fresh, atol=1e-5, rtol=1e-5)
        assert torch.all(rollout.old_logprobs[row, n:] == 0)
    # Before any update the reference is the policy: the same log-probs, KL exactly 0.
    torch.testing.assert_close(rollout.ref_logprobs, rollout.old_logprobs, atol=1e-6, rtol=0)
    # scores come from the reward source, per response, in row order
    assert rollout.scores.tolist() == [float(len(t)) for t in rollout.texts]
    assert rollout.source_scores["chars"].tolist() == rollout.scores.tolist()


def test_micro_batches_group_rows_of_similar_length_and_cover_each_row_once():
    # total lengths (prompt + response) of 6 rows: 5, 9, 4, 9, 2, 7
    prompt_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
    response_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0],
                                  [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]).float()
    n = 6
    rollout = Rollout(prompt_ids=torch.zeros(n, 3, dtype=torch.long), prompt_mask=prompt_mask,
                      response_ids=torch.zeros(n, 6, dtype=torch.long), response_mask=response_mask,
                      scores=torch.zeros(n), source_scores={}, prompt_index=torch.arange(n), group_size=1,
                      finished=torch.ones(n, dtype=torch.bool), texts=("",) * n)
    groups = micro_batches(rollout, range(n), 4)
    assert [g.tolist() for g in groups] == [[4, 2, 0, 5], [1, 3]]  # ties (rows 1, 3) keep their order
    # a minibatch's rows (any order, any subset) are split the same way: by their own lengths
    assert [g.tolist() for g in micro_batches(rollout, torch.tensor([3, 5, 0]), 2)] == [[0, 5], [3]]
    # the padded width of a micro-batch is its longest row, not the rollout's
    assert rollout.select(groups[0]).response_mask.shape[1] == 4


def test_micro_batches_by_prompt_keep_each_prompts_rows_together_in_order():
    rollout = _shared_rollout()
    # rows of prompts 0, 0, 1, 0 (a minibatch shuffled them): prompt 0's rows first, in the order given
    assert [g.tolist() for g in micro_batches(rollout, torch.tensor([3, 0, 2, 1]), 3, by_prompt=True)] == \
        [[3, 0, 1], [2]]


def _shared_rollout() -> Rollout:
    """Rows 0, 1 and 3 answer the prompt 5 6 7, row 2 the prompt 5 6."""
    I = PAD
    return Rollout(prompt_ids=torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, I], [5, 6, 7]]),
                   prompt_mask=torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]),
                   response_ids=torch.tensor([[8, 9, EOS], [10, I, I], [11, EOS, I], [12, 13, I]]),
                   response_mask=torch.tensor([[1.0, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 0]]),
                   scores=torch.zeros(4), source_scores={}, prompt_index=torch.tensor([0, 0, 1, 0]), group_size=3,
                   finished=torch.ones(4, dtype=torch.bool), texts=("",) * 4)


def test_shared_prompt_rows_keep_the_response_layout():
    """Rows 0 and 1 share their prompt (consecutive); row 3 has it too but follows another
    prompt, so it gets its own copy. Values read back in the response layout are the
    unshared layout's, row for row."""
    rollout = _shared_rollout()
    batch = rollout.lm_batch(PAD, share_prompts=True)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, EOS, 7, 10, 5, 6, 11, EOS, 5, 6, 7, 12, 13]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4]]
    I = IGNORE_INDEX
    assert batch.labels.tolist() == [[I, I, 8, 9, EOS, I, 10, I, I, 11, EOS, I, I, I, 12, 13, I]]
    counted = torch.zeros(batch.labels.shape)
    counted[batch.labels != I] = torch.arange(1.0, 9.0)
    assert rollout.response_layout(counted, batch).tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0], [7, 8, 0]]
    plain = rollout.lm_batch(PAD)
    flat = torch.zeros(plain.labels.shape)
    flat[plain.labels != I] = torch.arange(1.0, 9.0)
    assert rollout.response_layout(flat, plain).tolist() == rollout.response_layout(counted, batch).tolist()


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_shared_prompts_give_the_same_logprobs_entropy_values_and_gradients(critic):
    """build_rollout's old/ref log-probs and entropy and a forward's values and gradients, with
    each prompt stored once for its 3 samples (both attention kernels) or once per row."""
    from rlhfkit.models import attention
    from rlhfkit.rollout.rollout import policy_outputs

    tok = tiny_tokenizer()
    for kernel in (attention.NAME, attention.PACKED_SDPA):
        results = []
        for share in (False, True):
            model = tiny_causal_lm(seed=3)
            attention.register()
            model.set_attn_implementation(kernel)
            policy = PolicyValueModel(model, critic=critic, chunk_size=7)
            rollout = build_rollout(policy, ReferencePolicy(model), tok, _prompts(), _length_reward(),
                                    SamplingConfig(max_new_tokens=6, temperature=0.7, n=3, seed=1),
                                    micro_batch_size=4, chunk_size=7, with_values=True, share_prompts=share)
            out = policy_outputs(policy, rollout, PAD, temperature=0.7, with_entropy=True, with_values=True,
                                 share_prompts=share)
            (out.logprobs.sum() + out.entropy.sum() + out.values.sum()).backward()
            grads = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
            results.append((rollout.old_logprobs, rollout.ref_logprobs, rollout.entropy, out.values.detach(), grads))
        for plain, shared in zip(*results, strict=True):
            torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-4)


def test_reference_with_lora_disabled_equals_the_base_model():
    base = tiny_causal_lm(seed=0)
    model = load_model("tiny", lora=LoraSettings(r=4, alpha=8), seed=0)  # same base weights as `base`
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0 so the policy differs from the base
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    tok = tiny_tokenizer()
    rollout = build_rollout(PolicyValueModel(model), ReferencePolicy(model), tok, _prompts(), _length_reward(),
                            SamplingConfig(max_new_tokens=5, temperature=1.0, n=2, seed=0), micro_batch_size=8)
    for row in range(rollout.num_rows):
        n = int(rollout.response_mask[row].sum())
        torch.testing.assert_close(rollout.ref_logprobs[row, :n],
                                   _fresh_response_logprobs(base, rollout, row, 1.0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rollout.old_logprobs[row, :n],
                                   _fresh_response_logprobs(model, rollout, row, 1.0), atol=1e-5, rtol=1e-5)
    mask = rollout.response_mask.bool()
    assert (rollout.old_logprobs[mask] - rollout.ref_logprobs[mask]).abs().max() > 1e-3  # the adapter acts
    # and it is switched back on after the reference pass
    assert not torch.allclose(_fresh_response_logprobs(model, rollout, 0, 1.0),
                              _fresh_response_logprobs(base, rollout, 0, 1.0))


def test_response_mask_stops_after_the_stop_token():
    model, tok = tiny_causal_lm(seed=0), tiny_tokenizer()
    # An output bias that makes <|im_end|> likely (p ≈ 0.15 per token): some responses stop early.
    head = nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.get_output_embeddings().weight)
        head.bias.zero_()
        head.bias[EOS] = 4.0
    model.lm_head = head
    prompts = [RLPrompt(as_conversation(f"Count to {i}.")) for i in range(4)]
    rollout = build_rollout(PolicyValueModel(model), ReferencePolicy(model), tok, prompts, _length_reward(),
                            SamplingConfig(max_new_tokens=12, temperature=1.0, n=4, seed=0), micro_batch_size=16)
    lengths = rollout.response_mask.sum(-1).long().tolist()
    finished = rollout.finished.tolist()
    assert any(finished) and not all(finished), "the seed should give both kinds of rows"
    for row, (n, done) in enumerate(zip(lengths, finished)):
        ids = rollout.response_ids[row].tolist()
        mask = rollout.response_mask[row].tolist()
        assert mask[:n] == [1.0] * n and all(m == 0 for m in mask[n:])
        assert EOS not in ids[:n - 1]  # nothing after a stop token is kept
        if done:
            assert ids[n - 1] == EOS  # the stop token itself is a response token (the model learns to stop)
        else:
            assert n == 12
        assert all(t == PAD for t in ids[n:])
        assert torch.all(rollout.old_logprobs[row, :n] < 0) and torch.all(rollout.old_logprobs[row, n:] == 0)
        assert "<|im_end|>" not in rollout.texts[row]


def _hand_rollout() -> Rollout:
    # row 0: prompt [5, 6, 7], response [8, 9, EOS]; row 1: prompt [5, 6], response [8]
    return Rollout(prompt_ids=torch.tensor([[5, 6, 7], [5, 6, PAD]]), prompt_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
                   response_ids=torch.tensor([[8, 9, EOS], [8, PAD, PAD]]),
                   response_mask=torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),
                   scores=torch.tensor([1.0, 0.0]), source_scores={}, prompt_index=torch.tensor([0, 1]),
                   group_size=1, finished=torch.tensor([True, False]), texts=("a", "b"))


def test_rows_are_prompt_then_response_with_labels_on_the_response():
    rollout = _hand_rollout()
    batch = rollout.lm_batch(PAD)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, EOS], [5, 6, 8, PAD, PAD, PAD]]
    assert batch.attention_mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    I = IGNORE_INDEX
    # label at position P−1+j is response token j: 8 is predicted from the last prompt token
    assert batch.labels.tolist() == [[I, I, 8, 9, EOS, I], [I, 8, I, I, I, I]]
    per_position = torch.arange(12, dtype=torch.float32).view(2, 6)
    assert rollout.response_layout(per_position, batch).tolist() == [[2.0, 3.0, 4.0], [7.0, 0.0, 0.0]]
    # a minibatch keeps its rows' values and trims the padding no kept row needs
    part = rollout.select([1])
    assert part.response_ids.tolist() == [[8]] and part.prompt_ids.tolist() == [[5, 6]]
    assert part.texts == ("b",) and part.scores.tolist() == [0.0]


# ---------------------------------------------------------------------------- prompts and rewards

def test_read_prompts_fields_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"prompt": "What is 2+2?", "answer": 4, "task_id": "t1"}) + "\n"
                    + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}], "tests": ["assert f() == 1"]}) + "\n")
    prompts = read_prompts(good)
    assert prompts[0].meta["answer"] == "4" and prompts[0].id == "t1"
    assert [m.role for m in prompts[1].prompt] == ["system", "user"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", "answer": {"a": 1}}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'answer'"):
        read_prompts(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl:1: field 'prompt'"):
        read_prompts(missing)


def test_reward_spec_parsing():
    assert [(t.source, t.arg, t.weight) for t in parse_reward_spec("gold:1.0,length:0.1")] == [
        ("gold", None, 1.0), ("length", None, 0.1)]
    # a regex may hold commas and colons; a trailing number after ':' is the weight
    assert [(t.source, t.arg, t.weight) for t in parse_reward_spec(r"format:^\d{1,3}$:2,length:5-40")] == [
        ("format", r"^\d{1,3}$", 2.0), ("length", "5-40", 1.0)]
    assert [(t.source, t.arg) for t in parse_reward_spec("rm:runs/rm/final")] == [("rm", "runs/rm/final")]
    with pytest.raises(ConfigError, match="did you mean 'gold'"):
        parse_reward_spec("glod")
    with pytest.raises(ConfigError, match="needs an argument"):
        parse_reward_spec("format")
    with pytest.raises(ConfigError, match="invalid regex"):
        parse_reward_spec("format:(")
    with pytest.raises(ConfigError, match="gold:WEIGHT"):
        parse_reward_spec("gold:x")


def test_weighted_reward_from_a_spec_scores_and_keeps_each_source():
    reward = build_reward("format:^A:2,length:1-2:0.5,format:z")
    combined, raw = reward.score_detailed([Sample("q", "A b c"), Sample("q", "zz")])
    # "A b c": format 1 (×2), 3 words → 1 over max 2 by 1, tolerance 1 → 0 (×0.5), no z → 0
    # "zz":    format 0,       1 word → 1 (×0.5),                                   z → 1
    assert raw == {"format": [1.0, 0.0], "length": [0.0, 1.0], "format_2": [0.0, 1.0]}
    assert combined == [2.0, 1.5]


def test_gold_reward_uses_the_demo_checker_or_the_answer():
    task_prompt = demo_prompts("train", 1, families=("arithmetic",))[0]
    task = task_prompt.meta["task"]
    gold = GoldReward()
    samples = [Sample(task.prompt, f"Answer: {task.answer}", task_prompt.meta),
               Sample(task.prompt, "Answer: -1", task_prompt.meta),
               Sample("2+2?", "It is 4.", {"answer": "4"}),
               Sample("2+2?", "It is 5.", {"answer": "4"})]
    assert gold.score(samples) == [1.0, 0.0, 1.0, 0.0]
    with pytest.raises(DataError, match="nothing to check against"):
        gold.score([Sample("hi", "hello", {"task_id": "x"})])


def test_reward_model_source_scores_with_the_trained_model(tmp_path):
    reward_models = pytest.importorskip("rlhfkit.models.reward")
    from rlhfkit.data.tokenize import encode_pair
    rm = reward_models.tiny_reward_model(seed=1)
    tok = tiny_tokenizer()
    rm.model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    source = RewardModelSource(str(tmp_path / "rm"))
    samples = [Sample("Add 2 and 3.", "5"), Sample("Add 2 and 3.", "It is five, I think.")]
    scores = source.score(samples)
    for s, got in zip(samples, scores):  # one unpadded forward per (prompt, response)
        from rlhfkit.data.packing import collate_padded

        enc = encode_pair(tok, as_conversation(s.prompt), s.response)
        with torch.no_grad():
            expected = float(rm.eval()(collate_padded([enc], PAD))[0])
        assert got == pytest.approx(expected, abs=1e-5)
    assert scores[0] != pytest.approx(scores[1])
    assert build_reward(f"rm:{tmp_path / 'rm'}:0.5").score(samples) == pytest.approx([0.5 * x for x in scores])


def test_policy_sampler_decodes_with_a_synced_low_precision_copy():
    from rlhfkit.rollout.generate import PolicySampler, generate

    tok = tiny_tokenizer()
    model = tiny_causal_lm(seed=0)
    sampler = PolicySampler(model, torch.bfloat16)
    assert sampler.model is not model and next(sampler.model.parameters()).dtype == torch.bfloat16
    prompts = [p.prompt for p in _prompts()]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0)
    # The policy changes (an optimizer step); until sync the sampler still holds the old weights.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = dict(sampler.model.named_parameters())["model.embed_tokens.weight"].clone()
    sampler.sync()
    for name, p in sampler.model.named_parameters():
        torch.testing.assert_close(p, dict(model.named_parameters())[name].to(torch.bfloat16), rtol=0, atol=0)
    assert not torch.equal(before, dict(sampler.model.named_parameters())["model.embed_tokens.weight"])
    # It decodes exactly what a bf16 cast of the updated policy decodes.
    expected = generate(_bf16_copy(model), tok, prompts, greedy)
    got = sampler.generate(tok, prompts, greedy)
    assert [g.response_ids for g in got] == [g.response_ids for g in expected]
    # fp32 runs decode with the policy itself; sync is a no-op.
    same = PolicySampler(model, None)
    same.sync()
    assert same.model is model and same.syncs == 0 and sampler.syncs == 1


def test_samples_of_one_prompt_share_its_prefill_and_decode_what_separate_prefills_decode(monkeypatch):
    from rlhfkit.rollout import generate as gen_module

    tok, model = tiny_tokenizer(), tiny_causal_lm(seed=0)
    prompts = [p.prompt for p in _prompts()]
    # The shared cache equals the one a full forward of each row builds: the next-token logits
    # after it match an unshared forward of the whole prompt, left padding included.
    from rlhfkit.data.tokenize import encode_prompt

    encoded = [encode_prompt(tok, p) for p in prompts]
    width = max(map(len, encoded))
    rows = [0, 0, 1, 1, 1]
    ids = torch.tensor([[PAD] * (width - len(encoded[i])) + encoded[i] for i in rows])
    attn = (torch.arange(width)[None] >= torch.tensor([width - len(encoded[i]) for i in rows])[:, None]).long()
    cache = gen_module.shared_prompt_cache(model, ids, attn, rows)
    assert cache.get_seq_length() == width - 1
    positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)
    with torch.no_grad():
        shared = model(input_ids=ids[:, -1:], attention_mask=attn, position_ids=positions[:, -1:],
                       **{gen_module.cache_argument(model): cache}).logits[:, -1]
        full = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    assert gen_module.shared_prompt_cache(model, ids[[0, 2]], attn[[0, 2]], [0, 1]) is None  # nothing repeats
    # Sampling n = 3 with the shared prefill decodes what generate decodes without it.
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, n=3, seed=4)
    got = gen_module.generate(model, tok, prompts, sampling)
    monkeypatch.setattr(gen_module, "shared_prompt_cache", lambda *a: None)
    expected = gen_module.generate(model, tok, prompts, sampling)
    assert [g.response_ids for g in got] == [g.response_ids for g in expected]
    assert len({tuple(g.response_ids) for g in got}) > 2  # the samples differ: a real test of sampling


def _bf16_copy(model):
    import copy

    return copy.deepcopy(model).to(torch.bfloat16)


def test_reference_copy_is_moved_to_the_training_device_and_the_policy_stays():
    """Recipes build π_ref before the engine moves the policy (on a GPU machine the policy is
    still on the CPU then): the copy goes to the device it is given; the policy is untouched
    and the copy shares no storage with it."""
    model = tiny_causal_lm(seed=0)
    ref = ReferencePolicy(model, "meta")
    assert {p.device.type for p in ref.model.parameters()} == {"meta"}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert all(p.requires_grad for p in model.parameters())
    assert not any(p.requires_grad for p in ref.model.parameters())


def test_a_samplers_logprobs_are_kept_per_token_and_logged_against_the_trainers():
    from rlhfkit.rollout.generate import Generation
    from rlhfkit.rollout.rollout import assemble_rollout, rollout_metrics

    gens = [Generation(0, "a", [1, 2], [5, 6], True, (-1.0, -2.0)), Generation(0, "b", [1, 2], [7], True, (-0.5,))]
    rollout = assemble_rollout(gens, torch.zeros(2), {}, group_size=2, pad_id=0)
    assert rollout.sampler_logprobs.tolist() == [[-1.0, -2.0], [-0.5, 0.0]]  # 0 on padding
    old = torch.tensor([[-1.5, -1.0], [-0.5, 0.0]])
    m = rollout_metrics(dataclasses.replace(rollout, old_logprobs=old, ref_logprobs=old))
    # Σ_t (log μ − log π_old) per response: (0.5 − 1.0) and 0 → mean −0.25; largest |difference| 1.0
    assert m["sampler/kl"] == pytest.approx(-0.25) and m["sampler/max_abs_logprob_diff"] == pytest.approx(1.0)
    # an in-process sampler reports no log-probs: nothing kept, nothing logged
    plain = assemble_rollout([dataclasses.replace(g, logprobs=None) for g in gens], torch.zeros(2), {},
                             group_size=2, pad_id=0)
    assert plain.sampler_logprobs is None
    assert "sampler/kl" not in rollout_metrics(dataclasses.replace(plain, old_logprobs=old, ref_logprobs=old))
