"""Multi-turn loss masks: every assistant turn is trained by default, or only the last.

The tiny tokenizer is byte-level ChatML (<|im_start|> = 1, <|im_end|> = 2, one token per
byte), so the masks below are counted by hand from the rendered text."""

import pytest

from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import Message
from rlhfkit.data.tokenize import encode_conversation, encode_pair
from rlhfkit.models.tiny import tiny_tokenizer

IGNORE = -100
PROMPT = (Message("user", "hi"), Message("assistant", "ab"), Message("user", "x"))
# Rendered:  <|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n   1+5+2+1+1+1+10 = 21 tokens (0..20)
#            ab<|im_end|>\n                                             4 tokens (21..24), trained
#            <|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n    1+5+1+1+1+1+10 = 20 tokens (25..44)
#            cd<|im_end|>\n                                             4 tokens (45..48), trained
# labels[t] is the token at t + 1, so the counted label positions are one to the left.
FIRST_REPLY = list(range(20, 24))
LAST_REPLY = list(range(44, 48))


def counted(enc) -> list[int]:
    return [t for t, label in enumerate(enc.labels) if label != IGNORE]


def test_every_assistant_turn_is_trained_by_default():
    tok = tiny_tokenizer()
    enc = encode_conversation(tok, PROMPT, "cd")
    assert len(enc) == 49
    assert counted(enc) == FIRST_REPLY + LAST_REPLY
    assert tok.decode([enc.labels[t] for t in counted(enc)]) == "ab<|im_end|>\ncd<|im_end|>\n"
    assert enc.prompt_len == 21  # tokens before the first trained one


def test_last_turn_only_matches_encode_pair():
    tok = tiny_tokenizer()
    enc = encode_conversation(tok, PROMPT, "cd", assistant_turns="last", weight=2.0)
    assert counted(enc) == LAST_REPLY
    assert enc.weight == 2.0
    pair = encode_pair(tok, PROMPT, "cd")
    assert (enc.input_ids, enc.labels) == (pair.input_ids, pair.labels)


def test_single_turn_is_the_same_either_way():
    tok = tiny_tokenizer()
    prompt = (Message("system", "s"), Message("user", "q"))
    assert encode_conversation(tok, prompt, "a") == encode_pair(tok, prompt, "a")


def test_all_turns_without_a_chat_template_end_each_reply_with_eos():
    tok = tiny_tokenizer()
    tok.chat_template = None
    enc = encode_conversation(tok, PROMPT, "cd")
    # "User: hi\nAssistant:" (19) " ab<|im_end|>" (4, trained) "\nUser: x\nAssistant:" (19) " cd<|im_end|>" (4)
    assert len(enc) == 46
    assert counted(enc) == list(range(18, 22)) + list(range(41, 45))
    assert tok.decode([enc.labels[t] for t in counted(enc)]) == " ab<|im_end|> cd<|im_end|>"


def test_template_that_rewrites_history_is_refused():
    tok = tiny_tokenizer()
    # drops every assistant turn but the last, like templates that strip earlier reasoning
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|im_start|>"
                         "{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(DataError) as info:
        encode_conversation(tok, PROMPT, "cd")
    assert "assistant_turns: last" in str(info.value)
    assert counted(encode_conversation(tok, PROMPT, "cd", assistant_turns="last"))  # still trainable that way
