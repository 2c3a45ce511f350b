"""Tiny random-initialized models and a byte-level tokenizer, built offline, for tests.

The tokenizer speaks ChatML like the embedded model, so chat templates, loss masks and
generation exercise the same code paths as the real model, in milliseconds.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level ChatML tokenizer of 259 tokens (3 special + 256 bytes)."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL)})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(vocab_size: int = 288, hidden_size: int = 32, layers: int = 2, heads: int = 4,
                kv_heads: int = 2, max_positions: int = 1024):
    # `transformers.LlamaConfig` loads the Llama modeling stack (~1 s), and this module is
    # imported by the model loader on every CLI start: imported when a tiny model is built.
    from transformers import LlamaConfig  # noqa: PLC0415 — see above

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_causal_lm(seed: int = 0, **config_kwargs):
    """A 2-layer Llama with random weights (≈40k parameters), deterministic for a seed."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(**config_kwargs), dtype=torch.float32)
    return model
