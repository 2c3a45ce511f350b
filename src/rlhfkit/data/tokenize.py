"""Chat-template tokenization with a loss mask on the response tokens only.

The prompt is rendered with the model's chat template and the generation prompt
(`<|im_start|>assistant\\n` for ChatML); the response is the rest of the rendered
conversation (its text plus the template's end-of-turn marker, so the model learns to
stop). Prompt and response are tokenized separately, exactly as they meet at inference
time, when the model continues the tokenized prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import Conversation, Message, conversation_to_dicts


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ids (T,) and shifted labels (T,) (IGNORE_INDEX outside the response)."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    weight: float = 1.0  # multiplies this example's token losses (SFT's per-example `weight`)

    def __len__(self) -> int:
        return len(self.input_ids)


def pad_token_id(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad token, else its end-of-sequence token, else 0.

    Padded positions are masked out everywhere, so the value only has to be a valid id."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def render_prompt(tokenizer, prompt: Conversation) -> str:
    """The prompt as text, ending where the assistant's reply begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conversation_to_dicts(prompt), add_generation_prompt=True,
                                             tokenize=False)
    # No chat template (a base model): plain turns, the reply follows "Assistant:". An earlier
    # reply ends with the end-of-sequence token exactly as `render_response` trains it.
    eos = tokenizer.eos_token or ""
    turns = "".join(f"{m.role.capitalize()}: {m.content}{eos if m.role == 'assistant' else ''}\n" for m in prompt)
    return turns + "Assistant:"


def render_response(tokenizer, prompt: Conversation, response: str, prompt_text: str | None = None) -> str:
    """The response text as the template writes it after the prompt (with the end-of-turn marker)."""
    prompt_text = render_prompt(tokenizer, prompt) if prompt_text is None else prompt_text
    if getattr(tokenizer, "chat_template", None):
        full = tokenizer.apply_chat_template(
            conversation_to_dicts(prompt) + [{"role": "assistant", "content": response}], tokenize=False)
        if full.startswith(prompt_text):
            return full[len(prompt_text):]
    return " " + response + (tokenizer.eos_token or "")


def encode_prompt(tokenizer, prompt: Conversation) -> list[int]:
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, prompt: Conversation, response: str,
                prompt_ids: list[int] | None = None) -> Encoded:
    """Tokenize prompt + response; labels[t] = ids[t+1] on response tokens, else IGNORE_INDEX."""
    prompt_text = render_prompt(tokenizer, prompt)
    if prompt_ids is None:
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    resp_ids = tokenizer(render_response(tokenizer, prompt, response, prompt_text),
                         add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(resp_ids)
    p = len(prompt_ids)
    labels = [IGNORE_INDEX] * (p - 1) + list(resp_ids) + [IGNORE_INDEX]
    if p == 0:  # no prompt tokens: the first response token cannot be predicted
        labels = list(resp_ids[1:]) + [IGNORE_INDEX]
    return Encoded(ids, labels, p)


ASSISTANT_TURNS = ("all", "last")


def encode_conversation(tokenizer, prompt: Conversation, response: str, *, assistant_turns: str = "all",
                        weight: float = 1.0) -> Encoded:
    """Tokenize a conversation with the loss on every assistant reply ("all") or on the last one.

    The conversation (`prompt` + the final `response`) is cut into pieces: the template's
    text up to each assistant reply (not trained) and the reply with its end-of-turn marker
    (trained). Each piece is tokenized on its own, as `encode_pair` does for one reply, so
    with a single reply both give the same tokens and labels.
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}")
    conv = (*prompt, Message("assistant", response))
    replies = [i for i, m in enumerate(conv) if m.role == "assistant"]
    if assistant_turns == "last" or len(replies) == 1:
        return replace(encode_pair(tokenizer, prompt, response), weight=weight)
    ids: list[int] = []
    trained: list[bool] = []
    done = ""
    for i in replies:
        before = render_prompt(tokenizer, conv[:i])
        if not before.startswith(done):
            raise DataError("the chat template renders earlier turns differently once later turns follow, so "
                            "each assistant turn cannot be masked on its own: train the last turn only "
                            "(assistant_turns: last)")
        reply = render_response(tokenizer, conv[:i], conv[i].content, before)
        for text, train in ((before[len(done):], False), (reply, True)):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
            ids += piece
            trained += [train] * len(piece)
        done = before + reply
    labels = [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]
    return Encoded(ids, labels, trained.index(True), weight)
