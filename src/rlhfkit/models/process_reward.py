"""Process reward models: a reward model's backbone and scalar head read at the end of every step.

    z_k = wᵀ h_{e_k}(x ⊕ s_1 ⊕ "\\n" ⊕ s_2 ⊕ … ⊕ s_K)      p_k = σ(z_k)

h_t is the backbone's last hidden state at position t and e_k the position of the last token
of step s_k (steps are lines; the separator is `STEP_SEPARATOR`). p_k estimates that the
solution is right up to and including step k. The model is the reward model of
`models.reward` (`AutoModelForSequenceClassification`, one head) with its head read at K
positions instead of one, so a saved PRM loads anywhere as a sequence classifier; its
config.json carries `process_reward: true`, which `prm:PATH` rewards check.

Each step is tokenized on its own and the pieces are concatenated (`encode_steps`), so a
step's last token is known exactly and training and scoring read the same positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import AutoConfig

from rlhfkit.data.batches import pad_right, positions_from_mask, to_device
from rlhfkit.data.schemas import Conversation
from rlhfkit.data.tokenize import encode_prompt, pad_token_id
from rlhfkit.models.loading import TINY, LoraSettings
from rlhfkit.models.reward import RewardModel, _parts, load_checked_reward_model, load_reward_model, tiny_reward_model

STEP_SEPARATOR = "\n"
PRM_CONFIG_KEY = "process_reward"  # true in a saved PRM's config.json


@dataclass(frozen=True)
class EncodedSteps:
    """One tokenized solution: ids (prompt then steps), the position of each step's last token,
    and the step labels (empty when scoring)."""

    input_ids: list[int]
    step_ends: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class StepBatch:
    """Right-padded solutions. input_ids, attention_mask: (B, T); step_index: (B, S) the
    position of each step's last token (0 on padding); step_mask: (B, S) 1 on real steps;
    labels: (B, S) float 0/1 (0 on padding)."""

    input_ids: Tensor
    attention_mask: Tensor
    step_index: Tensor
    step_mask: Tensor
    labels: Tensor

    @property
    def num_steps(self) -> int:
        return int(self.step_mask.sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> StepBatch:
        return to_device(self, device)


def encode_steps(tokenizer, prompt: Conversation, steps: Sequence[str], labels: Sequence[int] = (),
                 prompt_ids: list[int] | None = None) -> EncodedSteps:
    """Prompt (through the chat template, ending where the reply begins) + the steps joined by
    `STEP_SEPARATOR`, each piece tokenized on its own; `step_ends[k]` indexes step k's last token."""
    ids = list(encode_prompt(tokenizer, prompt) if prompt_ids is None else prompt_ids)
    separator = tokenizer(STEP_SEPARATOR, add_special_tokens=False)["input_ids"]
    ends = []
    for k, step in enumerate(steps):
        piece = tokenizer(step, add_special_tokens=False)["input_ids"]
        if not piece:
            raise ValueError(f"step {k} has no tokens: {step!r}")
        ids += (separator if k else []) + piece
        ends.append(len(ids) - 1)
    return EncodedSteps(ids, ends, list(labels))


def collate_steps(examples: Sequence[EncodedSteps], pad_id: int) -> StepBatch:
    """Right-padded `StepBatch` of encoded solutions."""
    ids = pad_right([e.input_ids for e in examples], pad_id)
    mask = pad_right([[1] * len(e) for e in examples], 0)
    index = pad_right([e.step_ends for e in examples], 0)
    step_mask = pad_right([[1] * len(e.step_ends) for e in examples], 0)
    labels = pad_right([e.labels or [0] * len(e.step_ends) for e in examples], 0).float()
    return StepBatch(ids, mask, index, step_mask, labels)


class ProcessRewardModel(nn.Module):
    """`forward(batch) → logits (B, S)`, one per step slot (0 on padded slots), float32."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: StepBatch) -> Tensor:
        backbone, head = _parts(self.model)
        position_ids = positions_from_mask(batch.attention_mask)
        out = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=position_ids,
                       use_cache=False)
        hidden = out.last_hidden_state                                             # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
        at_steps = hidden[rows, batch.step_index]                                  # (B, S, H)
        logits = head(at_steps).float()[..., 0]                                    # (B, S)
        return logits * batch.step_mask


def _mark(model: nn.Module) -> None:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    setattr(inner.config, PRM_CONFIG_KEY, True)
    inner.config.id2label = {0: "step_correct"}
    inner.config.label2id = {"step_correct": 0}


def load_process_reward_model(name_or_path: str, *, dtype: torch.dtype = torch.float32,
                              lora: LoraSettings | None = None, seed: int = 0,
                              pad_token_id: int | None = None) -> ProcessRewardModel:
    """A PRM to train: a saved PRM as it is, anything else ('embedded', 'tiny', a causal LM or a
    trained reward model) with its backbone and one fresh (or the reward model's) head."""
    if name_or_path == TINY:
        reward = tiny_reward_model(seed)
    else:
        reward = load_reward_model(name_or_path, dtype=dtype, lora=lora, seed=seed, pad_token_id=pad_token_id)
    _mark(reward.model)
    return ProcessRewardModel(reward.model)


def is_process_reward_checkpoint(path: str) -> bool:
    return bool(getattr(AutoConfig.from_pretrained(path), PRM_CONFIG_KEY, False))


def load_trained_process_reward_model(name_or_path: str) -> tuple[ProcessRewardModel, object]:
    """(ProcessRewardModel, tokenizer) of a saved PRM folder, in eval mode."""
    model, tokenizer = load_checked_reward_model(
        name_or_path, what="process reward model", marked=is_process_reward_checkpoint,
        not_marked=f"process reward model (its config.json has no '{PRM_CONFIG_KEY}: true'); "
                   "train one with `rlhf prm train`")
    return ProcessRewardModel(model.model).eval(), tokenizer


def as_process_reward_model(model: nn.Module) -> ProcessRewardModel:
    if isinstance(model, ProcessRewardModel):
        return model
    return ProcessRewardModel(model.model if isinstance(model, RewardModel) else model)


@torch.no_grad()
def score_steps(model: nn.Module, tokenizer, prompts: Sequence[Conversation], steps: Sequence[Sequence[str]], *,
                batch_size: int = 16) -> list[list[float]]:
    """p_k = σ(z_k) of every step of every solution; a solution without steps gets []."""
    if len(prompts) != len(steps):
        raise ValueError(f"{len(prompts)} prompts but {len(steps)} step lists")
    model = as_process_reward_model(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in steps]
    rows = [i for i, s in enumerate(steps) if s]
    encoded = {i: encode_steps(tokenizer, prompts[i], steps[i]) for i in rows}
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate_steps([encoded[i] for i in chunk], pad_token_id(tokenizer)).to(device)
        probs = torch.sigmoid(model(batch)).cpu()
        for j, i in enumerate(chunk):
            out[i] = probs[j, :len(steps[i])].tolist()
    model.train(was_training)
    return out
