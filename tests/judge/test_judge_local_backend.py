"""LocalModelBackend on a tiny random Llama with a byte-level tokenizer built in the test."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlhfkit.judge.backends import JudgeBackend, LocalModelBackend

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    # One token per byte (BPE without merges) plus three specials: 259 tokens.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval()


def greedy_one_by_one(model, tokenizer, messages, steps):
    """Reference: greedy decoding of one unpadded prompt, token by token, no generate()."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    new = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(input_ids=ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_left_padded_generation_matches_unpadded_greedy(model, tokenizer):
    requests = [
        "hi",
        "a much longer prompt, so the others in its batch need left padding",
        [{"role": "system", "content": "judge fairly"}, {"role": "user", "content": "mid"}],
    ]
    backend = LocalModelBackend(model, tokenizer, max_new_tokens=5, batch_size=2)
    assert isinstance(backend, JudgeBackend)
    out = backend.complete(requests)  # batches of 2 and 1
    expected = [greedy_one_by_one(model, tokenizer,
                                  [{"role": "user", "content": r}] if isinstance(r, str) else r, 5)
                for r in requests]
    assert out == expected
    assert backend.name == "local:LlamaForCausalLM"


def test_requires_a_chat_template(model, tokenizer):
    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer,
                                   pad_token="<pad>", eos_token="</s>")
    with pytest.raises(ValueError, match="chat template"):
        LocalModelBackend(model, bare)


def _direct_choice_logprob(model, tokenizer, request, prefix, choice):
    """Reference: one unpadded sequence, log P of the choice's tokens summed by hand."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": request}], add_generation_prompt=True,
                                         tokenize=False)
    ctx = tokenizer(text, add_special_tokens=False)["input_ids"] + tokenizer(prefix, add_special_tokens=False)[
        "input_ids"]
    suffix = tokenizer(prefix + choice, add_special_tokens=False)["input_ids"][len(ctx) - len(
        tokenizer(text, add_special_tokens=False)["input_ids"]):]
    ids = torch.tensor([ctx + suffix])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    return sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(suffix))


def test_choice_logprobs_match_a_direct_unpadded_computation(model, tokenizer):
    requests = ["hi", "a much longer prompt, so the other one in its batch needs left padding"]
    backend = LocalModelBackend(model, tokenizer, batch_size=2)
    from rlhfkit.judge.pairwise import resolve_judge_mode

    assert resolve_judge_mode("auto", backend) == "logprob"  # a local judge is read from its log-probs
    got = backend.choice_logprobs(requests, "Verdict: ", ["A", "B!"])  # "B!": a two-token choice
    for row, request in zip(got, requests):
        expected = [_direct_choice_logprob(model, tokenizer, request, "Verdict: ", c) for c in ("A", "B!")]
        assert row == pytest.approx(expected, abs=1e-4)


def test_choice_logprobs_refuse_a_prefix_merged_with_the_choice(model, tokenizer):
    from rlhfkit.judge.backends import JudgeError

    class Merging:  # a tokenizer whose "ab" is one token
        chat_template = "x"

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [99] if text == "ab" else [ord(c) for c in text]}

    backend = LocalModelBackend(model, tokenizer)
    backend.tokenizer = Merging()
    with pytest.raises(JudgeError, match="merges the prefix"):
        backend.choice_logprobs(["q"], "a", ["b"])
