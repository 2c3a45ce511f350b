"""Record layouts: one JSON-like record → an `SFTExample`, `PreferencePair`, `Ranking` or
`UnpairedFeedback`, or a `DataError` naming the record and the field.

Accepted layouts (public datasets read unchanged; other column names are renamed with
the recipes' `data_columns`):

- SFT: `prompt` + `completion` (or `response`); `messages` (TRL conversational); ShareGPT
  `conversations` of `{from: human|gpt|system, value}`; Alpaca `instruction` + `output`
  (+ `input`, appended to the instruction after a blank line when not empty).
- preference: `prompt` + `chosen` + `rejected`; without `prompt`, `chosen`/`rejected` as
  conversations sharing the prompt turns (TRL implicit prompt), as Anthropic HH-RLHF
  transcripts `\\n\\nHuman: … \\n\\nAssistant: …` (split at the last assistant turn), or as
  texts sharing leading words (TRL standard implicit prompt).
- ranking: `prompt` + `responses` + `ranks` (0 = best, equal = tie).
- unpaired: `prompt` + `completion` + `label` (true = desirable).

Messages are `{role, content}` with role system, user, assistant or tool. OpenAI tool calls
are kept as text: an assistant message's `tool_calls` are appended to its content (None
reads as "") as `<tool_call>\\n{"name": …, "arguments": …}\\n</tool_call>` blocks, the format
Hermes/Qwen chat templates render, so every chat template (tool-aware or not) shows the
model the same call and SFT trains the model to write it; `role: tool` results stay tool turns.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from rlhfkit.data.errors import DataError
from rlhfkit.data.schemas import (
    ROLES,
    Conversation,
    Message,
    PreferencePair,
    Provenance,
    Ranking,
    SFTExample,
    UnpairedFeedback,
)

MESSAGE_ROLES = (*ROLES, "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool"}

SFT_LAYOUTS = ("prompt + completion (or response)", "messages", "conversations (ShareGPT)",
               "instruction + output (Alpaca)")
PREFERENCE_LAYOUTS = ("prompt + chosen + rejected", "chosen + rejected conversations or HH-RLHF transcripts",
                      "prompt + responses + ranks")
COLUMNS_HINT = "rename other columns with data_columns, e.g. prompt=question"


@dataclass(frozen=True)
class Where:
    """Where a record came from: `line` of a text file, or (with `record=True`) the record's
    1-based position in a JSON list, a Parquet file or a `datasets` split."""

    path: str
    line: int | None
    record: bool = False

    def error(self, field: str | None, message: str) -> DataError:
        if self.record:
            return DataError(message, path=self.path, record=self.line, field=field)
        return DataError(message, path=self.path, line=self.line, field=field)


def no_layout(rec: dict, where: Where, kind: str, layouts: tuple[str, ...]) -> DataError:
    fields = ", ".join(f"'{k}'" for k in list(rec)[:8]) or "none"
    return where.error(None, f"no {kind} layout matches the fields ({fields}); accepted: "
                             f"{'; '.join(layouts)} ({COLUMNS_HINT})")


# ---------------------------------------------------------------------------- fields


def _text(rec: dict, key: str, where: Where, *, allow_empty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        raise where.error(key, "missing")
    v = rec[key]
    if isinstance(v, list):  # conversational completion: [{"role": "assistant", "content": ...}]
        conv = _conversation(v, key, where)
        v = "".join(m.content for m in conv if m.role == "assistant") if any(
            m.role == "assistant" for m in conv) else conv[-1].content
    if not isinstance(v, str):
        raise where.error(key, f"expected text, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise where.error(key, "empty text")
    return v


def _tool_calls_text(calls: Any, field: str, where: Where) -> str:
    if not isinstance(calls, list):
        raise where.error(field, "expected a list of tool calls")
    blocks = []
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise where.error(f"{field}[{j}]", "expected {'function': {'name': ..., 'arguments': ...}}")
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                pass
        blocks.append("<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
                      + "\n</tool_call>")
    return "\n".join(blocks)


def _message(m: Any, key: str, where: Where) -> Message:
    if isinstance(m, dict) and "from" in m and "value" in m and "role" not in m:  # ShareGPT turn
        if m["from"] not in SHAREGPT_ROLES:
            raise where.error(f"{key}.from", f"unknown speaker '{m['from']}' (use {', '.join(SHAREGPT_ROLES)})")
        m = {"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]}
    if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
        raise where.error(key, "expected a message with 'role' and 'content'")
    if m["role"] not in MESSAGE_ROLES:
        raise where.error(f"{key}.role", f"unknown role '{m['role']}' (use {', '.join(MESSAGE_ROLES)})")
    content = m.get("content")
    if content is None and m.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise where.error(f"{key}.content", "expected text")
    if m.get("tool_calls"):
        calls = _tool_calls_text(m["tool_calls"], f"{key}.tool_calls", where)
        content = f"{content}\n{calls}" if content.strip() else calls
    return Message(m["role"], content)


def _conversation(v: Any, key: str, where: Where) -> Conversation:
    if isinstance(v, str):
        if not v.strip():
            raise where.error(key, "empty text")
        return (Message("user", v),)
    if not isinstance(v, list) or not v:
        raise where.error(key, "expected text or a non-empty list of {role, content} messages")
    return tuple(_message(m, f"{key}[{i}]", where) for i, m in enumerate(v))


def _provenance(rec: dict, where: Where, default_source: str = "unknown") -> Provenance:
    rnd = rec.get("round")
    if rnd is not None and not isinstance(rnd, int):
        raise where.error("round", f"expected an integer, got {rnd!r}")
    return Provenance(annotator=_opt_str(rec, "annotator", where), source=rec.get("source") or default_source,
                      rationale=_opt_str(rec, "rationale", where), round=rnd,
                      model_version=_opt_str(rec, "model_version", where))


def _opt_str(rec: dict, key: str, where: Where) -> str | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, (str, int)):
        raise where.error(key, f"expected text, got {type(v).__name__}")
    return str(v)


def _opt_float(rec: dict, key: str, where: Where, lo: float = -math.inf, hi: float = math.inf) -> float | None:
    v = rec.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise where.error(key, f"expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


_META_SKIP = {"prompt", "completion", "response", "messages", "conversations", "instruction", "input", "output",
              "chosen", "rejected", "label", "margin", "weight", "both_bad", "annotator", "source", "rationale",
              "round", "model_version", "responses", "ranks"}


def _meta(rec: dict) -> dict[str, Any]:
    return {k: v for k, v in rec.items() if k not in _META_SKIP}


# ---------------------------------------------------------------------------- SFT


def _sft_conversation(conv: Conversation, key: str) -> tuple[Conversation, str, str | None]:
    """(turns before the last reply, the last reply, problem or None)."""
    if conv[-1].role != "assistant":
        return conv, "", "the last message must be the assistant's response"
    if not conv[-1].content.strip():
        return conv, "", "empty response"
    if len(conv) < 2:
        return conv, "", "needs at least one turn before the assistant's response"
    return conv[:-1], conv[-1].content, None


def parse_sft(rec: dict, where: Where) -> SFTExample:
    """An SFT record in any layout of `SFT_LAYOUTS`. A KTO record's `label` is kept as
    `desirable`; an optional `weight` ≥ 0 scales the example's loss."""
    key = next((k for k in ("messages", "conversations") if k in rec), None)
    if ("chosen" in rec or "responses" in rec) and key is None and "completion" not in rec and "response" not in rec:
        raise where.error(None, "this is preference data (chosen/rejected or responses/ranks), not SFT examples: "
                                "train on it with rlhf dpo or rlhf rm, or give SFT a file with "
                                f"{' or '.join(SFT_LAYOUTS[:2])}")
    if key is not None:
        conv = _conversation(rec[key], key, where)
        prompt, response, problem = _sft_conversation(conv, key)
        if problem is not None:
            raise where.error(f"{key}[{len(conv) - 1}].content" if problem == "empty response" else key, problem)
    elif "instruction" in rec:
        instruction = _text(rec, "instruction", where)
        extra = rec.get("input") or ""
        if not isinstance(extra, str):
            raise where.error("input", f"expected text, got {type(extra).__name__}")
        prompt = (Message("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction),)
        response = _text(rec, "output", where)
    elif "prompt" in rec:
        prompt = _conversation(rec["prompt"], "prompt", where)
        response = _text(rec, "response" if "response" in rec and "completion" not in rec else "completion", where)
    elif "completion" in rec or "response" in rec:
        raise where.error("prompt", f"missing (accepted SFT layouts: {'; '.join(SFT_LAYOUTS)})")
    else:
        raise no_layout(rec, where, "SFT", SFT_LAYOUTS)
    label = rec.get("label")
    if label is not None and not isinstance(label, bool):
        raise where.error("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    weight = _opt_float(rec, "weight", where, 0.0)
    return SFTExample(prompt, response, _meta(rec), weight=1.0 if weight is None else weight,
                      desirable=label is not False)


# ---------------------------------------------------------------------------- preferences

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_hh_transcript(v: Any) -> bool:
    return isinstance(v, str) and "\n\nAssistant:" in v and v.lstrip().startswith("Human:")


def _hh_turns(transcript: str, key: str, where: Where) -> Conversation:
    parts = _HH_TURN.split("\n\n" + transcript.lstrip() if not transcript.startswith("\n\n") else transcript)
    if parts[0].strip():
        raise where.error(key, "text before the first '\\n\\nHuman:' turn")
    return tuple(Message(_HH_ROLES[speaker], text.strip()) for speaker, text in zip(parts[1::2], parts[2::2]))


def _split_hh(rec: dict, where: Where) -> tuple[Conversation, str, str]:
    """Anthropic HH-RLHF: the shared transcript up to the last `\\n\\nAssistant:` is the
    (multi-turn) prompt; what follows it in each transcript is the response."""
    chosen, rejected = rec["chosen"], rec["rejected"]
    if not _is_hh_transcript(rejected):
        raise where.error("rejected", "expected a '\\n\\nHuman: … \\n\\nAssistant: …' transcript like 'chosen'")
    cut_c, cut_r = chosen.rindex("\n\nAssistant:"), rejected.rindex("\n\nAssistant:")
    if chosen[:cut_c] != rejected[:cut_r]:
        raise where.error("rejected", "chosen and rejected transcripts differ before the last '\\n\\nAssistant:' "
                                      "turn (they must share the conversation up to the final reply)")
    prompt = _hh_turns(chosen[:cut_c], "chosen", where)
    size = len("\n\nAssistant:")
    return prompt, chosen[cut_c + size:].strip(), rejected[cut_r + size:].strip()


def _split_text_prefix(chosen: str, rejected: str, where: Where) -> tuple[Conversation, str, str]:
    """TRL's standard implicit prompt: the longest shared prefix, cut at a word boundary."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not chosen[n - 1].isspace():
        n -= 1
    if not chosen[:n].strip():
        raise where.error("chosen", "without 'prompt', chosen and rejected must share the prompt: these texts "
                                    "share no leading words (add a 'prompt' field)")
    return (Message("user", chosen[:n].rstrip()),), chosen[n:], rejected[n:]


def _split_implicit_prompt(chosen: Conversation, rejected: Conversation, where: Where):
    """TRL's conversational implicit prompt: the shared leading turns are the prompt, each
    conversation's first turn after them (an assistant turn) is its response."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0 or chosen[n].role != "assistant" or rejected[n].role != "assistant":
        raise where.error("chosen", "without 'prompt', chosen and rejected must be conversations that "
                                    "share the prompt turns and end with different assistant turns")
    return chosen[:n], chosen[n].content, rejected[n].content


def _looks_like_sft(rec: dict) -> bool:
    return any(k in rec for k in ("completion", "response", "messages", "conversations", "instruction"))


def parse_preference(rec: dict, where: Where) -> PreferencePair:
    if "chosen" not in rec and "rejected" not in rec:
        if _looks_like_sft(rec):
            raise where.error(None, "this looks like SFT data (prompt + completion, messages, ...), not preference "
                                    f"pairs: DPO and reward models need {'; '.join(PREFERENCE_LAYOUTS)} (unpaired "
                                    "feedback with a true/false 'label' trains with --loss kto)")
        raise no_layout(rec, where, "preference", PREFERENCE_LAYOUTS)
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise where.error(key, "missing (a preference record needs 'chosen' and 'rejected')")
    if "prompt" in rec:
        prompt = _conversation(rec["prompt"], "prompt", where)
        chosen, rejected = _text(rec, "chosen", where), _text(rec, "rejected", where)
    else:
        if _is_hh_transcript(rec["chosen"]):
            prompt, chosen, rejected = _split_hh(rec, where)
        elif isinstance(rec["chosen"], str) and isinstance(rec["rejected"], str):
            prompt, chosen, rejected = _split_text_prefix(rec["chosen"], rec["rejected"], where)
        else:
            prompt, chosen, rejected = _split_implicit_prompt(
                _conversation(rec["chosen"], "chosen", where), _conversation(rec["rejected"], "rejected", where),
                where)
        for key, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise where.error(key, "empty text")
    label = _opt_float(rec, "label", where, 0.0, 1.0)
    both_bad = rec.get("both_bad", False)
    if not isinstance(both_bad, bool):
        raise where.error("both_bad", f"expected true or false, got {both_bad!r}")
    return PreferencePair(prompt, chosen, rejected, label=1.0 if label is None else label,
                          margin=_opt_float(rec, "margin", where), both_bad=both_bad,
                          provenance=_provenance(rec, where), meta=_meta(rec))


def parse_ranking(rec: dict, where: Where) -> Ranking:
    prompt = _conversation(rec.get("prompt"), "prompt", where) if "prompt" in rec else None
    if prompt is None:
        raise where.error("prompt", "missing")
    responses, ranks = rec.get("responses"), rec.get("ranks")
    if not isinstance(responses, list) or len(responses) < 2:
        raise where.error("responses", "expected a list of at least 2 responses")
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise where.error("ranks", f"expected {len(responses)} integer ranks, one per response")
    for i, (resp, rank) in enumerate(zip(responses, ranks)):
        if not isinstance(resp, str) or not resp.strip():
            raise where.error(f"responses[{i}]", "empty or not text")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise where.error(f"ranks[{i}]", f"expected an integer ≥ 0, got {rank!r}")
    both_bad = rec.get("both_bad", False)
    if not isinstance(both_bad, bool):  # bool("false") would be True
        raise where.error("both_bad", f"expected true or false, got {both_bad!r}")
    return Ranking(prompt, tuple(responses), tuple(ranks), both_bad=both_bad,
                   provenance=_provenance(rec, where), meta=_meta(rec))


def parse_unpaired(rec: dict, where: Where) -> UnpairedFeedback:
    prompt = _conversation(rec["prompt"], "prompt", where) if "prompt" in rec else None
    if prompt is None:
        raise where.error("prompt", "missing")
    key = "response" if "response" in rec and "completion" not in rec else "completion"
    label = rec.get("label")
    if not isinstance(label, bool):
        raise where.error("label", f"expected true (desirable) or false (undesirable), got {label!r}")
    return UnpairedFeedback(prompt, _text(rec, key, where), label, _provenance(rec, where), _meta(rec))
