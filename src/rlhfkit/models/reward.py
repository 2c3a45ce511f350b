"""Reward models: an LM backbone with a scalar head read at the last real token.

    r(x, y) = w_eᵀ h_T(x ⊕ y)        h_T: the backbone's last hidden state at the last
                                      real token of the sequence; e = 1..E heads

The model is a transformers `AutoModelForSequenceClassification` with `num_labels = E`
(one row of the `score` matrix per ensemble head), created from a causal-LM checkpoint, so
a saved reward model loads anywhere with plain
`AutoModelForSequenceClassification.from_pretrained(folder)`.

The forward pass does not use transformers' own pooling: that finds the last token by
comparing ids to `pad_token_id`, which reads the wrong position when the pad token is also
the end-of-turn token (SmolLM2) and cannot read packed rows at all. Here the backbone runs
once, the hidden state of each sequence's last real token is gathered from the attention
mask (padded rows, either side) or the segment ids (packed rows), and the head runs on
those N vectors only.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification

from rlhfkit.config import ConfigError
from rlhfkit.data.batches import LMBatch, positions_from_mask
from rlhfkit.data.packing import collate_packed
from rlhfkit.data.preference_batches import EncodedPair, collate_pairs
from rlhfkit.data.readers import looks_like_hub_id
from rlhfkit.data.schemas import Conversation
from rlhfkit.data.tokenize import encode_pair, pad_token_id
from rlhfkit.models.loading import TINY, LoraSettings, ModelNotFound, load_tokenizer, resolve_model_path
from rlhfkit.models.tiny import tiny_causal_lm

# Std of the fresh head as a multiple of 1/√H. Final hidden states are RMS-normalized
# (entries of size ~1), so this gives initial rewards of size ~0.1: the first Bradley–Terry
# losses sit near log 2 and no early step is dominated by a large random reward gap.
HEAD_INIT_SCALE = 0.1


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row: (B, T) 0/1 mask → (B,) long.

    The largest t with mask[b, t] = 1, so right padding ([1 1 1 0] → 2), left padding
    ([0 1 1 1] → 3) and no padding all work. A row without any real token is an error.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must have shape (B, T), got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()
    if not bool(real.any(-1).all()):
        raise ValueError("a row of the batch has no real token (attention_mask all 0)")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(real, positions, -1).amax(-1)


def segment_last_index(segment_ids: Tensor, num_segments: int) -> Tensor:
    """Flat index (into B·T) of the last token of each sequence of packed rows.

    segment_ids: (B, T), the sequence index in [0, num_segments) of every token, −1 on
    padding. Returns (num_segments,) long. Row [0 0 1 1 1] → [1, 4].
    """
    flat = segment_ids.reshape(-1)
    real = flat >= 0
    positions = torch.arange(flat.numel(), device=flat.device)
    last = torch.full((num_segments,), -1, dtype=torch.long, device=flat.device)
    last = last.scatter_reduce(0, flat[real], positions[real], reduce="amax")
    if bool((last < 0).any()):
        missing = (last < 0).nonzero().flatten().tolist()
        raise ValueError(f"packed batch has no tokens for sequences {missing[:5]}")
    return last


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(backbone, score head) of a sequence classifier, PEFT-wrapped or not."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = getattr(inner, "score", None)
    if backbone is None or head is None:
        raise TypeError(f"{type(inner).__name__} is not a decoder sequence classifier with a 'score' head")
    return backbone, head


class RewardModel(nn.Module):
    """`forward(batch) → rewards`: (N,) for one head, (E, N) for an ensemble of E heads.

    N is the number of sequences: B for padded rows, `batch.num_examples` for packed rows.
    Rewards are float32 whatever the compute dtype. Wrapping the transformers model in this
    module lets accelerate/DDP wrap *this* forward, so gradient-sync hooks fire (as
    `models.policy.TokenLogprobs` does for policies).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def n_heads(self) -> int:
        return int(self.model.config.num_labels)

    def forward(self, batch: LMBatch) -> Tensor:
        backbone, head = _parts(self.model)
        if batch.packed:
            if batch.segment_ids is None:
                raise ValueError("a packed batch needs segment_ids to find where each sequence ends")
            out = backbone(input_ids=batch.input_ids, attention_mask=None, position_ids=batch.position_ids,
                           use_cache=False)
            hidden = out.last_hidden_state.flatten(0, 1)                          # (B·T, H)
            last = hidden[segment_last_index(batch.segment_ids, batch.num_examples)]
        else:
            position_ids = (batch.position_ids if batch.position_ids is not None
                            else positions_from_mask(batch.attention_mask))
            out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=position_ids, use_cache=False)
            hidden = out.last_hidden_state                                        # (B, T, H)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            last = hidden[rows, last_token_index(batch.attention_mask)]
        rewards = head(last).float()                                              # (N, E)
        return rewards[:, 0] if rewards.shape[1] == 1 else rewards.T


# ----------------------------------------------------------------------------- pairs in one forward

def split_pair_rewards(rewards: Tensor, num_pairs: int) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards of a `PreferenceBatch`'s sequences: (..., 2B) → two (..., B)."""
    if rewards.shape[-1] != 2 * num_pairs:
        raise ValueError(f"expected rewards for {2 * num_pairs} sequences, got {tuple(rewards.shape)}")
    return rewards[..., :num_pairs], rewards[..., num_pairs:]


def as_ensemble(rewards: Tensor) -> Tensor:
    """Rewards as (E, N): a single head's (N,) becomes (1, N)."""
    return rewards.unsqueeze(0) if rewards.dim() == 1 else rewards


# ----------------------------------------------------------------------------- building

def _label_config(config, n_heads: int, pad_token_id: int | None) -> None:
    """Head count, names and pooling settings that travel in config.json."""
    config.num_labels = n_heads
    names = ["reward"] if n_heads == 1 else [f"reward_{e}" for e in range(n_heads)]
    config.id2label = dict(enumerate(names))
    config.label2id = {n: e for e, n in enumerate(names)}
    # Raw scores, not class probabilities: pipelines then apply no softmax.
    config.problem_type = "regression"
    if pad_token_id is not None:
        config.pad_token_id = pad_token_id


def init_reward_head(model: nn.Module, seed: int = 0) -> None:
    """Re-draw the score head: N(0, (HEAD_INIT_SCALE/√H)²), deterministic for `seed`."""
    _, head = _parts(model)
    weight = head.weight
    generator = torch.Generator().manual_seed(seed)
    std = HEAD_INIT_SCALE / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()


def reward_model_from_causal_lm(causal_lm: nn.Module, *, n_heads: int = 1, seed: int = 0,
                                pad_token_id: int | None = None) -> nn.Module:
    """A sequence classifier sharing an in-memory causal LM's backbone weights, fresh head."""
    config = copy.deepcopy(causal_lm.config)
    _label_config(config, n_heads, pad_token_id)
    model = AutoModelForSequenceClassification.from_config(config, dtype=causal_lm.dtype)
    backbone, _ = _parts(model)
    backbone.load_state_dict(getattr(causal_lm, causal_lm.base_model_prefix).state_dict())
    init_reward_head(model, seed)
    return model


def is_reward_checkpoint(path: str) -> bool:
    """True when `path` holds a saved sequence classifier (a trained reward model)."""
    archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


def load_reward_model(name_or_path: str, *, n_heads: int = 1, dtype: torch.dtype = torch.float32,
                      lora: LoraSettings | None = None, seed: int = 0,
                      pad_token_id: int | None = None) -> RewardModel:
    """A reward model to train or score with.

    A saved reward model (a `*ForSequenceClassification` folder) loads as it is, heads
    included (`n_heads` must then match or be 1). Anything else — 'embedded', 'tiny', a
    causal-LM id or folder — becomes a backbone with `n_heads` freshly initialized heads.
    With `lora`, the backbone is frozen under a LoRA adapter and the head trains fully.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    if name_or_path == TINY:
        model = tiny_reward_model(seed, n_heads=n_heads).model
    else:
        path = resolve_model_path(name_or_path)
        try:
            trained = is_reward_checkpoint(path)
            if trained:
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
                if n_heads not in (1, model.config.num_labels):
                    raise ConfigError(f"{name_or_path} has {model.config.num_labels} reward heads, "
                                     f"not {n_heads}")
            else:
                model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=n_heads)
                _label_config(model.config, n_heads, None)
                init_reward_head(model, seed)
        except OSError as e:
            raise ModelNotFound(f"cannot load reward model '{name_or_path}': {e}") from None
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if lora is not None:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 — peft is heavy to import; only LoRA runs need it

        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                         target_modules=list(lora.target_modules), task_type="SEQ_CLS",
                         modules_to_save=["score"])
        model = get_peft_model(model, cfg)
    return RewardModel(model)


def tiny_reward_model(seed: int = 0, *, n_heads: int = 1) -> RewardModel:
    """The tiny random causal LM of `models.tiny` (same seed, same backbone) with reward heads."""
    causal = tiny_causal_lm(seed=seed)
    return RewardModel(reward_model_from_causal_lm(causal, n_heads=n_heads, seed=seed,
                                                   pad_token_id=causal.config.pad_token_id))


# ----------------------------------------------------------------------------- inference

def as_reward_model(model: nn.Module) -> RewardModel:
    """A `RewardModel` as it is; a plain HF sequence classifier wrapped in one."""
    return model if isinstance(model, RewardModel) else RewardModel(model)


def load_checked_reward_model(name_or_path: str, *, what: str, marked: Callable[[str], bool],
                              not_marked: str) -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) of a saved folder whose config passes `marked` (a reward model,
    a process reward model); one-line `ModelNotFound` naming `what` otherwise."""
    if not Path(name_or_path).exists() and not looks_like_hub_id(name_or_path):
        raise ModelNotFound(f"no such {what} folder: {name_or_path}")
    try:
        ok = marked(resolve_model_path(name_or_path))
    except OSError as e:
        raise ModelNotFound(f"cannot load {what} '{name_or_path}': {e}") from None
    if not ok:
        raise ModelNotFound(f"'{name_or_path}' is not a {not_marked}")
    tokenizer = load_tokenizer(name_or_path)
    return load_reward_model(name_or_path, pad_token_id=tokenizer.pad_token_id), tokenizer


def load_trained_reward_model(name_or_path: str) -> tuple[RewardModel, object]:
    """(RewardModel, tokenizer) of a saved reward model folder, in eval mode."""
    if name_or_path == TINY:
        raise ModelNotFound("'tiny' is an untrained random model; pass a trained reward model folder")
    model, tokenizer = load_checked_reward_model(
        name_or_path, what="reward model", marked=is_reward_checkpoint,
        not_marked="trained reward model (its config.json names no *ForSequenceClassification architecture); "
                   "train one with `rlhf rm train`")
    return model.eval(), tokenizer


def load_sequence_classifier(name_or_path: str) -> tuple[nn.Module, object]:
    """(model, tokenizer) of any saved Hugging Face sequence classifier (a toxicity model, a
    trained reward model), in eval mode; the tokenizer gets a pad token (its eos) if it has none."""
    if not Path(name_or_path).exists() and not looks_like_hub_id(name_or_path):
        raise ModelNotFound(f"no such folder: {name_or_path}")
    path = resolve_model_path(name_or_path)
    try:
        if not is_reward_checkpoint(path):
            raise ModelNotFound(f"'{name_or_path}' is not a sequence classifier (its config.json names no "
                                "*ForSequenceClassification architecture)")
        tokenizer = load_tokenizer(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except OSError as e:
        raise ModelNotFound(f"cannot load classifier '{name_or_path}': {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


@torch.no_grad()
def pair_rewards(model: nn.Module, pairs: Sequence[EncodedPair], pad_id: int, *, batch_size: int = 16,
                 packed: bool = True) -> tuple[Tensor, Tensor]:
    """Rewards of every pair's two sides: (chosen, rejected), each (E, N) float32 on CPU."""
    model = as_reward_model(model)
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start:start + batch_size], pad_id, packed=packed).to(device)
        r_c, r_r = split_pair_rewards(as_ensemble(model(batch.sequences)), batch.num_pairs)
        chosen.append(r_c.float().cpu())
        rejected.append(r_r.float().cpu())
    if not chosen:
        return torch.zeros(model.n_heads, 0), torch.zeros(model.n_heads, 0)
    return torch.cat(chosen, dim=1), torch.cat(rejected, dim=1)


@torch.no_grad()
def score_responses(model: nn.Module, tokenizer, prompts: Sequence[Conversation], responses: Sequence[str], *,
                    batch_size: int = 16) -> Tensor:
    """Rewards of (prompt, response) pairs through the chat template: (E, N) float32 on CPU."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    model = as_reward_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
    out = [torch.zeros(model.n_heads, 0)]
    for start in range(0, len(encoded), batch_size):
        batch = collate_packed(encoded[start:start + batch_size], pad_token_id(tokenizer)).to(device)
        out.append(as_ensemble(model(batch)).float().cpu())
    if was_training:
        model.train()
    return torch.cat(out, dim=1)
