"""Preference data as model input: tokenized pairs and KTO examples, and their batches.

One definition for every recipe that trains on preferences (reward models, the DPO family):

- `encode_preference_pairs`: prompt + chosen and prompt + rejected through the chat template,
  the prompt tokenized once per pair; over-length pairs are skipped and counted, never
  truncated (a truncated response would be scored on text the annotator never judged);
- `encode_feedback`: unpaired thumbs-up/down examples for KTO, each with a *mismatched*
  sequence (its prompt, another example's completion) for KTO's reference point z0;
- `collate_pairs` / `collate_feedback`: typed batches. A `PreferenceBatch` holds the 2B
  sequences of B pairs, so chosen and rejected run in ONE forward pass: chosen sides
  0..B−1, then rejected sides B..2B−1, as packed rows or right-padded rows.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhfkit.data.batches import IGNORE_INDEX, LMBatch, to_device
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.packing import collate, collate_shared_prompts
from rlhfkit.data.schemas import PreferencePair, UnpairedFeedback, is_tie
from rlhfkit.data.tokenize import Encoded, encode_pair, encode_prompt

# ----------------------------------------------------------------------------- tokenized items


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized preference pair: both sides carry the same prompt tokens."""

    chosen: Encoded
    rejected: Encoded
    label: float          # P(chosen ≻ rejected): 1 clear, 0.5 tie, soft in between
    margin: float = 0.0   # required reward gap; 0.0 when the record gave none

    @property
    def is_tie(self) -> bool:
        return is_tie(self.label)

    @property
    def sequences(self) -> tuple[Encoded, Encoded]:
        return self.chosen, self.rejected

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


@dataclass(frozen=True)
class EncodedFeedback:
    """A tokenized KTO example, plus its mismatched sequence (this prompt, another prompt's
    completion) whose log-ratio feeds the reference point z0."""

    completion: Encoded
    mismatched: Encoded
    desirable: bool

    @property
    def sequences(self) -> tuple[Encoded, Encoded]:
        return self.completion, self.mismatched

    def __len__(self) -> int:
        return len(self.completion) + len(self.mismatched)


def encode_preference_pairs(tokenizer, pairs: Sequence[PreferencePair], max_length: int | None = None,
                            skipped: SkipReport | None = None, where: str = "", *,
                            drop_identical: bool = False) -> list[EncodedPair]:
    """Tokenize each pair, the prompt once; skip and count in `skipped` ("{where} pair {i}")
    pairs with a side longer than `max_length` tokens and, with `drop_identical`, pairs whose
    two responses are the same text (no signal: every log-ratio difference is exactly 0)."""
    out = []
    for i, pair in enumerate(pairs):
        if drop_identical and pair.chosen == pair.rejected:
            if skipped is not None:
                skipped.add("identical responses", f"{where} pair {i + 1}")
            continue
        prompt_ids = encode_prompt(tokenizer, pair.prompt)
        chosen = encode_pair(tokenizer, pair.prompt, pair.chosen, prompt_ids)
        rejected = encode_pair(tokenizer, pair.prompt, pair.rejected, prompt_ids)
        if max_length is not None and max(len(chosen), len(rejected)) > max_length:
            if skipped is not None:
                skipped.add("longer than max_length", f"{where} pair {i + 1}")
            continue
        out.append(EncodedPair(chosen, rejected, float(pair.label),
                               0.0 if pair.margin is None else float(pair.margin)))
    return out


# ----------------------------------------------------------------------------- KTO's mismatched pairs


def _splice(prompt_of: Encoded, response_of: Encoded, max_length: int) -> Encoded:
    """prompt_of's prompt followed by response_of's response, labelled like `encode_pair`;
    the response is cut so the sequence fits max_length (it only feeds a KL estimate)."""
    prompt_ids = prompt_of.input_ids[:prompt_of.prompt_len]
    response_ids = response_of.input_ids[response_of.prompt_len:]
    response_ids = response_ids[:max(2, max_length - len(prompt_ids))]
    p = len(prompt_ids)
    labels = ([IGNORE_INDEX] * (p - 1) + response_ids + [IGNORE_INDEX] if p > 0
              else response_ids[1:] + [IGNORE_INDEX])
    return Encoded(prompt_ids + response_ids, labels, p)


def mismatched_partners(prompt_keys: Sequence[tuple[int, ...]], seed: int) -> list[int]:
    """partner[i]: the example whose completion is paired with example i's prompt.

    The KTO paper shifts completions by one inside a batch, (x_i, y_{i+1}). Here the shift is
    taken once over a seeded shuffle of the whole dataset, moving on past neighbours with
    the same prompt (pairs turned into KTO examples sit next to each other): each example
    gets a fixed partner, so the reference log-probs of the mismatched sequences are
    computed once and cached like everything else.
    """
    n = len(prompt_keys)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    partner = [0] * n
    for pos, i in enumerate(order):
        for step in range(1, n):
            j = order[(pos + step) % n]
            if prompt_keys[j] != prompt_keys[i]:
                partner[i] = j
                break
        else:
            raise DataError("KTO needs examples with at least two different prompts "
                            "(its KL reference point pairs each prompt with another prompt's completion)")
    return partner


def encode_feedback(tokenizer, feedback: Sequence[UnpairedFeedback], max_length: int, skipped: SkipReport,
                    where: str, seed: int) -> list[EncodedFeedback]:
    """Tokenize KTO examples (over-length ones skipped and counted) and attach to each its
    mismatched sequence (see `mismatched_partners`)."""
    encoded: list[tuple[Encoded, bool]] = []
    for i, fb in enumerate(feedback):
        enc = encode_pair(tokenizer, fb.prompt, fb.response)
        if len(enc) > max_length:
            skipped.add("longer than max_length", f"{where} record {i + 1}")
            continue
        encoded.append((enc, fb.desirable))
    if not encoded:
        return []
    partners = mismatched_partners([tuple(e.input_ids[:e.prompt_len]) for e, _ in encoded], seed)
    return [EncodedFeedback(enc, _splice(enc, encoded[j][0], max_length), desirable)
            for (enc, desirable), j in zip(encoded, partners)]


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class PreferenceBatch:
    """B pairs as 2B sequences in one forward: chosen 0..B−1, then rejected B..2B−1.

    sequences: an LMBatch of the 2B sequences, packed rows with segment ids or (2B, T)
    right-padded. response_lengths: (2B,) response tokens per sequence. label: (B,)
    P(chosen ≻ rejected). margin: (B,) required reward gaps (0 where none).
    ref_logps: (B, 2) cached reference sums [chosen, rejected]; None = none or scored live.
    """

    sequences: LMBatch
    response_lengths: Tensor
    label: Tensor
    margin: Tensor
    ref_logps: Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.label.shape[0])

    def to(self, device) -> PreferenceBatch:
        return to_device(self, device)


@dataclass(frozen=True)
class FeedbackBatch:
    """B KTO examples: completions (graded) and mismatched sequences (no grad, for z0).

    completions, mismatched: B sequences each, packed or padded. desirable: (B,) bool.
    ref_logps: (B, 2) cached reference sums [completion, mismatched]; None = score live.
    """

    completions: LMBatch
    mismatched: LMBatch
    desirable: Tensor
    ref_logps: Tensor | None = None

    @property
    def num_examples(self) -> int:
        return int(self.desirable.shape[0])

    def to(self, device) -> FeedbackBatch:
        return to_device(self, device)


def response_length(sequence: Encoded) -> int:
    """The number of tokens that count (the response and its end-of-turn marker)."""
    return sum(label != IGNORE_INDEX for label in sequence.labels)


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, *, packed: bool,
                  ref_logps: Tensor | None = None, share_prompts: bool = False) -> PreferenceBatch:
    """The pairs as one `PreferenceBatch`. share_prompts (packed only): each pair's prompt is
    stored once, its rejected side a branch after the chosen one
    (`data.packing.collate_shared_prompts`; the attention must be rlhfkit's); segment ids keep
    numbering chosen sides 0..B−1 and rejected sides B..2B−1."""
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if packed and share_prompts:
        b = len(pairs)
        interleaved = [side for p in pairs for side in (p.chosen, p.rejected)]
        sequences = collate_shared_prompts([(s.input_ids, s.labels) for s in interleaved],
                                           [s.prompt_len for s in interleaved])
        side_index = torch.tensor([j // 2 + (b if j % 2 else 0) for j in range(2 * b)], dtype=torch.long)
        sequences = dataclasses.replace(sequences, segment_ids=side_index[sequences.segment_ids])
    else:
        sequences = collate(sides, pad_id, packed=packed)
    return PreferenceBatch(sequences,
                           torch.tensor([response_length(s) for s in sides], dtype=torch.float32),
                           torch.tensor([p.label for p in pairs], dtype=torch.float32),
                           torch.tensor([p.margin for p in pairs], dtype=torch.float32), ref_logps)


def collate_feedback(items: Sequence[EncodedFeedback], pad_id: int, *, packed: bool,
                     ref_logps: Tensor | None = None) -> FeedbackBatch:
    return FeedbackBatch(collate([f.completion for f in items], pad_id, packed=packed),
                         collate([f.mismatched for f in items], pad_id, packed=packed),
                         torch.tensor([f.desirable for f in items], dtype=torch.bool), ref_logps)
