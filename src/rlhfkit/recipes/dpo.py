"""Direct preference optimization — DPO, conservative DPO, IPO, hinge/SLiC, robust DPO,
SimPO, ORPO and KTO — top to bottom.

1. read preference pairs (rankings expand to pairs, ties kept as label 0.5), or for KTO
   unpaired thumbs-up/down feedback (pairs work too: each gives one desirable and one
   undesirable example); tokenize prompt+chosen and prompt+rejected through the chat
   template; over-length pairs and pairs with identical responses are skipped and counted;
2. reference log-probs: ONE no-grad pass of the reference over every sequence before
   training, in the training precision, cached in `run_dir/reference_logps.pt` under a hash
   of (reference, tokens, precision) so a resumed run reuses it. With LoRA the reference is
   the base weights with the adapter disabled (no second model); the reference-free losses
   (SimPO, ORPO) skip this step;
3. each micro-batch: the chosen and rejected responses of all its pairs in ONE forward pass
   (one packed padding-free row; per-sequence sums of token log-probs by segment id);
4. the loss by name from `losses.preference.PREFERENCE_LOSSES`, normalized by the number of
   pairs in the whole optimizer step (every micro-batch, every process);
5. KTO: the reference point z0 from mismatched (prompt, another example's completion)
   sequences, see `mismatched_partners` and `kto_step_loss`;
6. eval: implicit-reward accuracy and margins on held-out pairs; the final model goes to
   `run_dir/final`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhfkit.config import ConfigError, check, param
from rlhfkit.data import reference_cache
from rlhfkit.data.batches import IGNORE_INDEX, LMBatch
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.packing import collate_packed, collate_padded
from rlhfkit.data.preference import pairs_to_unpaired
from rlhfkit.data.readers import iter_records, read_preferences, read_unpaired
from rlhfkit.data.schemas import PreferencePair, UnpairedFeedback
from rlhfkit.data.tokenize import Encoded, encode_pair, encode_prompt
from rlhfkit.losses.preference import (
    PREFERENCE_LOSSES,
    PreferenceLossSpec,
    get_preference_loss,
    kto_reference_point,
    preferred_nll,
)
from rlhfkit.losses.reward import pairwise_metrics
from rlhfkit.models.loading import LoraSettings, load_model, load_tokenizer
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.io import atomic_write_text
from rlhfkit.train.engine import Engine, TrainConfig, set_training_attention
from rlhfkit.train.loop import SupervisedTask, fit

log = logging.getLogger(__name__)

# The default of every loss hyper-parameter, per loss. β = 0.1 is the DPO paper's usual
# value (for IPO it asks for a log-ratio gap of 1/(2β) = 5 nats, for hinge a separation of
# 1/β = 10); SimPO scores mean per-token log-probs, which are ~20× smaller than sums, so it
# needs a larger β (2.0) and a margin γ with γ/β = 0.5, the SimPO paper's recommendations;
# ORPO's λ = 0.1 and KTO's unit class weights are their papers' defaults; robust DPO's
# flip rate 0.1 is a modest noise assumption (0 would be plain DPO).
LOSS_DEFAULTS: dict[str, dict[str, float]] = {
    "dpo": {"beta": 0.1, "label_smoothing": 0.0},
    "ipo": {"beta": 0.1},
    "hinge": {"beta": 0.1},
    "robust": {"beta": 0.1, "flip_rate": 0.1},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "orpo": {"odds_ratio_weight": 0.1},
    "kto": {"beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
}
LOSS_HYPERPARAMETERS = ("beta", "label_smoothing", "flip_rate", "gamma", "odds_ratio_weight",
                        "desirable_weight", "undesirable_weight")


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    kind = "dpo"
    loss: str = param("dpo", f"preference loss: {', '.join(PREFERENCE_LOSSES)}")
    beta: float | None = param(None, "β: KL strength toward the reference (SimPO: reward scale); "
                                     "None = per loss: 0.1, simpo 2.0")
    label_smoothing: float | None = param(None, "dpo: assumed label flip rate in [0, 0.5] (conservative DPO); "
                                                "None = 0")
    flip_rate: float | None = param(None, "robust: known label flip rate in [0, 0.5); None = 0.1")
    gamma: float | None = param(None, "simpo: target reward margin γ ≥ 0; None = 1.0")
    odds_ratio_weight: float | None = param(None, "orpo: weight λ of the odds-ratio term; None = 0.1")
    desirable_weight: float | None = param(None, "kto: weight λ_D of desirable examples; None = 1.0")
    undesirable_weight: float | None = param(None, "kto: weight λ_U of undesirable examples; None = 1.0")
    nll_weight: float = param(0.0, "α ≥ 0: add α × the preferred response's mean per-token NLL to a paired "
                                   "loss (RPO; TRL's rpo_alpha); 0 = off")
    train_data: str = param("", "preference pairs or rankings (kto: also unpaired feedback): "
                                ".jsonl/.parquet file, datasets folder or hub id")
    eval_data: str = param("", "held-out pairs for implicit-reward accuracy and margins (optional)")
    reference: str = param("", "reference model: empty = the starting model (with LoRA its base weights, "
                               "adapter disabled), or an HF id / folder")
    packing: bool = param(False, "chosen and rejected of a micro-batch in one padding-free row "
                                 "(off: one padded batch of 2B rows, faster with CPU/SDPA attention)")
    precompute_reference: bool = param(True, "score the reference once before training and cache it "
                                             "(off: a no-grad reference forward every micro-batch)")
    ties: str = param("keep", "tied training pairs (label 0.5): keep them (the loss pulls their implicit "
                              "rewards together) or drop them (counted in the skip report)", choices=("keep", "drop"))
    max_eval_examples: int = param(256, "at most this many eval records")
    lr: float = param(5e-6, "peak learning rate (AdamW)")

    def validate(self) -> None:
        super().validate()
        check(bool(self.train_data), "train_data is required (a .jsonl/.parquet file, folder or hub id)")
        try:
            spec = get_preference_loss(self.loss)
        except ValueError as e:
            raise ConfigError(f"'loss': {e}") from None
        for name in LOSS_HYPERPARAMETERS:
            check(getattr(self, name) is None or name in spec.hyperparameters,
                  f"'{name}' is not used by loss '{self.loss}' (its hyper-parameters: "
                  f"{', '.join(spec.hyperparameters)})")
        check(not self.reference or spec.needs_reference,
              f"loss '{self.loss}' is reference-free: 'reference' is not used")
        hp = self.loss_hyperparameters
        for name in ("beta", "odds_ratio_weight", "desirable_weight", "undesirable_weight"):
            check(name not in hp or hp[name] > 0, f"{name} must be > 0")
        check(0 <= hp.get("label_smoothing", 0) <= 0.5, "label_smoothing must be in [0, 0.5]")
        check(0 <= hp.get("flip_rate", 0) < 0.5, "flip_rate must be in [0, 0.5)")
        check(hp.get("gamma", 0) >= 0, "gamma must be ≥ 0")
        check(self.max_eval_examples >= 1, "max_eval_examples must be ≥ 1")
        check(self.nll_weight >= 0, "nll_weight must be ≥ 0")
        check(self.nll_weight == 0 or spec.paired, f"nll_weight needs paired data; loss '{self.loss}' is unpaired")

    @property
    def loss_hyperparameters(self) -> dict[str, float]:
        """Keyword arguments of the loss function: the values set here, else LOSS_DEFAULTS."""
        defaults = LOSS_DEFAULTS[self.loss]
        return {name: defaults[name] if getattr(self, name) is None else getattr(self, name)
                for name in PREFERENCE_LOSSES[self.loss].hyperparameters}


# ----------------------------------------------------------------------------- 1. data


@dataclass(frozen=True)
class EncodedPair:
    """A tokenized preference pair; label = P(chosen ≻ rejected) (1 clear, 0.5 tie)."""

    chosen: Encoded
    rejected: Encoded
    label: float

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


Item = EncodedPair | EncodedFeedback


def encode_preferences(tokenizer, pairs: Sequence[PreferencePair], max_length: int, skipped: SkipReport,
                       where: str) -> list[EncodedPair]:
    """Tokenize each pair (the prompt once); skip and count pairs with a sequence longer than
    max_length, and pairs whose two responses are the same text (no signal: h ≡ 0)."""
    out = []
    for i, pair in enumerate(pairs):
        if pair.chosen == pair.rejected:
            skipped.add("identical responses", f"{where} pair {i + 1}")
            continue
        prompt_ids = encode_prompt(tokenizer, pair.prompt)
        chosen = encode_pair(tokenizer, pair.prompt, pair.chosen, prompt_ids)
        rejected = encode_pair(tokenizer, pair.prompt, pair.rejected, prompt_ids)
        if max(len(chosen), len(rejected)) > max_length:
            skipped.add("longer than max_length", f"{where} pair {i + 1}")
            continue
        out.append(EncodedPair(chosen, rejected, pair.label))
    return out


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


def _holds_unpaired(source: str) -> bool:
    """True when the first record is unpaired feedback (one completion + label, no chosen)."""
    for record, _ in iter_records(source, errors=[]):
        return ("chosen" not in record and "responses" not in record
                and ("completion" in record or "response" in record))
    return False


def load_items(source: str, spec: PreferenceLossSpec, tokenizer, cfg: DPOConfig, skipped: SkipReport, *,
               limit: int | None = None, pairs_for_eval: bool = False) -> list[Item]:
    """Read and tokenize `source` for `spec`: pairs for the paired losses (ties dropped and
    counted when `cfg.ties` is "drop" and this is training data); KTO examples for
    KTO (from unpaired records, or from pairs split in two, ties skipped). With
    `pairs_for_eval`, a KTO eval file of pairs stays pairs (for pairwise accuracy)."""
    unpaired = _holds_unpaired(source)
    if spec.paired and unpaired:
        raise DataError(f"loss '{spec.name}' trains on preference pairs (prompt, chosen, rejected), but this "
                        "file holds unpaired feedback (prompt, completion, label): use --loss kto", path=source)
    if spec.paired or (pairs_for_eval and not unpaired):
        pairs = read_preferences(source)[:limit]
        if cfg.ties == "drop" and not pairs_for_eval:
            for _ in range(sum(p.is_tie for p in pairs)):
                skipped.add("tie (ties=drop)", source)
            pairs = [p for p in pairs if not p.is_tie]
        return encode_preferences(tokenizer, pairs, cfg.max_length, skipped, source)
    if unpaired:
        feedback = read_unpaired(source)[:limit]
    else:
        feedback, ties = pairs_to_unpaired(read_preferences(source)[:limit])
        for _ in range(ties):
            skipped.add("tie (neither response desirable)", source)
    return encode_feedback(tokenizer, feedback, cfg.max_length, skipped, source, cfg.seed)


# ----------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class PreferenceBatch:
    """B pairs as 2B sequences in one forward: chosen 0..B−1, then rejected B..2B−1.

    sequences: one packed row (1, ΣT) with segment ids, or (2B, T) right-padded.
    response_lengths: (2B,) response tokens per sequence. label: (B,) P(chosen ≻ rejected).
    ref_logps: (B, 2) cached reference sums [chosen, rejected]; None = score them live.
    """

    sequences: LMBatch
    response_lengths: Tensor
    label: Tensor
    ref_logps: Tensor | None

    @property
    def num_pairs(self) -> int:
        return int(self.label.shape[0])

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(self.sequences.to(device), self.response_lengths.to(device), self.label.to(device),
                               None if self.ref_logps is None else self.ref_logps.to(device))


@dataclass(frozen=True)
class FeedbackBatch:
    """B KTO examples: completions (graded) and mismatched sequences (no grad, for z0).

    completions, mismatched: B sequences each, packed or padded. desirable: (B,) bool.
    ref_logps: (B, 2) cached reference sums [completion, mismatched]; None = score live.
    """

    completions: LMBatch
    mismatched: LMBatch
    desirable: Tensor
    ref_logps: Tensor | None

    @property
    def num_examples(self) -> int:
        return int(self.desirable.shape[0])

    def to(self, device) -> FeedbackBatch:
        return FeedbackBatch(self.completions.to(device), self.mismatched.to(device), self.desirable.to(device),
                             None if self.ref_logps is None else self.ref_logps.to(device))


def _collate(sequences: list[Encoded], pad_id: int, packing: bool) -> LMBatch:
    return collate_packed(sequences, pad_id) if packing else collate_padded(sequences, pad_id)


def sequence_sums(policy: nn.Module, batch: LMBatch, count: int) -> Tensor:
    """(count,) summed response log-probs of the batch's sequences: one backbone call."""
    token_logps = policy(batch)
    return reference_cache.sum_by_sequence(token_logps, batch, count)


def collate_pairs(items: Sequence[EncodedPair], pad_id: int, packing: bool,
                  ref_logps: Tensor | None = None) -> PreferenceBatch:
    seqs = [p.chosen for p in items] + [p.rejected for p in items]
    lengths = torch.tensor([sum(lab != IGNORE_INDEX for lab in s.labels) for s in seqs], dtype=torch.float32)
    return PreferenceBatch(_collate(seqs, pad_id, packing), lengths,
                           torch.tensor([p.label for p in items], dtype=torch.float32), ref_logps)


def collate_feedback(items: Sequence[EncodedFeedback], pad_id: int, packing: bool,
                     ref_logps: Tensor | None = None) -> FeedbackBatch:
    return FeedbackBatch(_collate([f.completion for f in items], pad_id, packing),
                         _collate([f.mismatched for f in items], pad_id, packing),
                         torch.tensor([f.desirable for f in items], dtype=torch.bool), ref_logps)


# ----------------------------------------------------------------------------- 2. reference


@dataclass(frozen=True)
class Reference:
    """The frozen reference as a scorer: `scorer` is a TokenLogprobs; with `adapter_model`
    (a PEFT model) the scorer is the policy itself and scores with its adapter disabled."""

    scorer: nn.Module
    adapter_model: nn.Module | None
    identity: str

    @contextlib.contextmanager
    def active(self):
        """Scoring mode: eval, no grad, and the LoRA adapter (if any) switched off."""
        was_training = self.scorer.training
        self.scorer.eval()
        adapter_off = self.adapter_model.disable_adapter() if self.adapter_model is not None \
            else contextlib.nullcontext()
        try:
            with torch.no_grad(), adapter_off:
                yield self.scorer
        finally:
            self.scorer.train(was_training)

    def __call__(self, batch: LMBatch, count: int) -> Tensor:
        with self.active() as scorer:
            return sequence_sums(scorer, batch, count)


def build_reference(cfg: DPOConfig, model: nn.Module, policy: TokenLogprobs, device) -> Reference:
    """Where the reference log-probs come from, loading a second model only when needed.

    - `reference` names another model: that model, frozen.
    - LoRA: the policy's own base weights with the adapter disabled — no second model.
    - full fine-tuning, precomputed: the policy itself, scored before its first update (and
      before a resumed run loads its checkpoint), which is exactly the starting model.
    - full fine-tuning, scored live every step: a frozen copy of the starting model.
    """
    other = bool(cfg.reference) and cfg.reference != cfg.model
    name = cfg.reference if other else cfg.model
    identity = reference_cache.model_identity(name, seed=cfg.seed)
    if not other and cfg.lora_r > 0:
        return Reference(policy, model, identity)
    if not other and cfg.precompute_reference:
        return Reference(policy, None, identity)
    frozen = load_model(name, seed=cfg.seed).to(device)
    frozen.requires_grad_(False)
    set_training_attention(frozen, cfg, device)  # the policy's kernel, so step 0 gives policy = reference
    return Reference(TokenLogprobs(frozen, cfg.logprob_chunk).eval(), None, identity)


def precompute_reference(engine: Engine, reference: Reference, splits: dict[str, Sequence[Item]], *,
                         batch_size: int, pad_id: int, packing: bool) -> tuple[dict[str, Tensor], bool]:
    """({split: (N, 2) reference sums}, reused): from `run_dir/reference_logps.pt` when its key
    matches, else one no-grad pass in the training precision, then saved."""
    path = engine.run_dir / reference_cache.CACHE_FILE
    flat = {name: [s for item in items for s in item.sequences] for name, items in splits.items()}
    key = reference_cache.reference_key(reference.identity, flat, engine.precision)
    cached = reference_cache.load_cached(path, key)
    # Every process has read the file before anyone may write it, so all take the same branch
    # (the computing branch all-gathers across processes).
    engine.accelerator.wait_for_everyone()
    if cached is not None and set(cached) == set(splits):
        log.info("reference log-probs: reusing %s", path)
        return cached, True
    log.info("reference log-probs: one pass over %d sequences", sum(len(v) for v in flat.values()))
    with engine.autocast(), reference.active() as scorer:
        scores = reference_cache.compute_reference_logps(
            scorer, {name: [item.sequences for item in items] for name, items in splits.items()},
            batch_size=batch_size, pad_id=pad_id, packing=packing, device=engine.device,
            rank=engine.rank, world_size=engine.world_size, gather=engine.accelerator.gather)
    if engine.is_main:
        reference_cache.save_cache(path, key, scores, {"reference": reference.identity,
                                                       "precision": engine.precision})
    engine.accelerator.wait_for_everyone()
    return scores, False


# ----------------------------------------------------------------------------- 3–4. loss


def pair_loss(spec: PreferenceLossSpec, hyperparameters: dict[str, float], policy_chosen: Tensor,
              policy_rejected: Tensor, ref: Tensor | None, chosen_lengths: Tensor, rejected_lengths: Tensor,
              label: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Call a paired registry loss with the inputs it declares. All tensors (B,); ref (B, 2).

    ORPO's chosen_nll is per pair, −π_c/|y_c| (mean NLL of each chosen response), so it is a
    per-pair quantity like the rest and normalizes by pairs.
    """
    available = {"policy_chosen_logps": policy_chosen, "policy_rejected_logps": policy_rejected,
                 "chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths,
                 "chosen_nll": -policy_chosen / chosen_lengths, "label": label}
    if ref is not None:
        available.update(ref_chosen_logps=ref[:, 0], ref_rejected_logps=ref[:, 1])
    inputs = {name: available[name] for name in spec.inputs + spec.optional_inputs}
    return spec.loss_fn(**inputs, **hyperparameters)


def pair_metric_sums(loss: Tensor, metrics: dict[str, Tensor], num_pairs: int) -> dict[str, Tensor]:
    """Per-batch means → sums over pairs, which `fit` divides by the step's pair count.

    rewards/accuracy becomes the count of correctly ordered non-tie pairs, so the logged
    value is exact over the step (a tie counts as not correct); rewards/num_non_tie is a count.
    """
    sums = {"loss": loss.detach() * num_pairs}
    for name, value in metrics.items():
        if name == "rewards/num_non_tie":
            sums[name] = value
        elif name == "rewards/accuracy":
            sums[name] = value * metrics["rewards/num_non_tie"]
        else:
            sums[name] = value * num_pairs
    return sums


def kto_step_loss(spec: PreferenceLossSpec, hyperparameters: dict[str, float], policy: Tensor,
                  policy_mismatched: Tensor, ref: Tensor, desirable: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO on one micro-batch. policy, policy_mismatched, desirable: (B,); ref: (B, 2).

    z0 = max(0, mean_i(π(y_j|x_i) − ref(y_j|x_i))) over the micro-batch's mismatched
    sequences (detached): the KTO paper's per-batch estimate of KL(π ‖ ref).
    """
    z0 = kto_reference_point(policy_mismatched.detach(), ref[:, 1])
    available = {"policy_logps": policy, "ref_logps": ref[:, 0], "desirable": desirable, "kl_reference": z0}
    return spec.loss_fn(**{name: available[name] for name in spec.inputs}, **hyperparameters)


def kto_metric_sums(loss: Tensor, metrics: dict[str, Tensor], policy: Tensor, ref: Tensor, desirable: Tensor,
                    beta: float) -> dict[str, Tensor]:
    """KTO metrics as sums over examples (`fit` divides by the step's example count).

    rewards/accuracy counts examples on the right side of the reference point (β(r − z0) > 0
    for desirable ones, < 0 for undesirable ones), exact over the step. rewards/desirable and
    rewards/undesirable are class means scaled by the micro-batch size, so the logged value
    is their size-weighted mean over micro-batches (exact with one micro-batch per step).
    """
    n = desirable.shape[0]
    shifted = (policy.detach().float() - ref[:, 0].float()) - metrics["kto/kl_reference"]
    right_side = torch.where(desirable, shifted > 0, shifted < 0)
    return {"loss": loss.detach() * n,
            "rewards/accuracy": right_side.sum().float(),
            "rewards/desirable": metrics["rewards/desirable"] * n,
            "rewards/undesirable": metrics["rewards/undesirable"] * n,
            "kto/desirable_fraction": desirable.sum().float(),
            "kto/kl_reference": metrics["kto/kl_reference"] * n,
            "logps/desirable": metrics["logps/desirable"] * n,
            "logps/undesirable": metrics["logps/undesirable"] * n}


# ----------------------------------------------------------------------------- 6. eval


def _eval_scores(module: nn.Module, items: Sequence[Item], pad_id: int, packing: bool, batch_size: int) -> Tensor:
    device = next(module.parameters()).device
    flat = [s for item in items for s in item.sequences]
    return reference_cache.score_sequences(module, flat, batch_size=batch_size, pad_id=pad_id,
                                           packing=packing, device=device).view(len(items), 2)


def evaluate_items(module: nn.Module, items: Sequence[Item], *, spec: PreferenceLossSpec,
                   hyperparameters: dict[str, float], ref: Tensor | None, pad_id: int, packing: bool,
                   batch_size: int) -> dict[str, float]:
    """Loss, implicit rewards, margin and pairwise accuracy over the whole eval set at once.

    Pairs under KTO are scored with DPO's implicit reward β(π − ref). Unpaired KTO eval
    reports the class means and the margin between them.
    """
    policy = _eval_scores(module, items, pad_id, packing, batch_size)
    if isinstance(items[0], EncodedPair):
        label = torch.tensor([p.label for p in items], dtype=torch.float32)
        if spec.paired:
            lengths = torch.tensor([[sum(lab != IGNORE_INDEX for lab in s.labels) for s in p.sequences]
                                    for p in items], dtype=torch.float32)
            value, metrics = pair_loss(spec, hyperparameters, policy[:, 0], policy[:, 1], ref,
                                       lengths[:, 0], lengths[:, 1], label)
            metrics = {"loss": value, **metrics}
        else:
            beta = hyperparameters["beta"]
            metrics = pairwise_metrics(beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1]), label)
        keep = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
    else:
        desirable = torch.tensor([f.desirable for f in items], dtype=torch.bool)
        value, metrics = kto_step_loss(spec, hyperparameters, policy[:, 0], policy[:, 1], ref, desirable)
        metrics = {"loss": value, **metrics,
                   "rewards/margin": metrics["rewards/desirable"] - metrics["rewards/undesirable"]}
        keep = ("loss", "rewards/desirable", "rewards/undesirable", "rewards/margin", "kto/kl_reference")
    return {f"eval/{name}": float(metrics[name]) for name in keep if name in metrics}


# ----------------------------------------------------------------------------- the task


def preference_task(spec: PreferenceLossSpec, hyperparameters: dict[str, float], train: Sequence[Item],
                    eval_set: Sequence[Item], *, pad_id: int, packing: bool,
                    ref_train: Tensor | None = None, ref_eval: Tensor | None = None,
                    live_reference: Reference | None = None, eval_batch_size: int = 8,
                    nll_weight: float = 0.0) -> SupervisedTask:
    """The DPO-family task for `fit`: one unit = one pair (KTO: one example).

    `nll_weight` α adds α × `preferred_nll` (RPO) to a paired loss.

    Reference sums come from `ref_train`/`ref_eval` ((N, 2), precomputed) or, when those are
    None, from `live_reference` each micro-batch; reference-free losses need neither.
    """
    if spec.needs_reference and ref_train is None and live_reference is None:
        raise ValueError(f"loss '{spec.name}' needs reference log-probs: pass ref_train or live_reference")

    def make_batch(idx):
        items = [train[i] for i in idx]
        ref = ref_train[torch.tensor(idx)] if ref_train is not None else None
        return (collate_pairs(items, pad_id, packing, ref) if spec.paired
                else collate_feedback(items, pad_id, packing, ref))

    def live_pair_reference(batch: PreferenceBatch) -> Tensor:
        sums = live_reference(batch.sequences, 2 * batch.num_pairs)
        return torch.stack([sums[:batch.num_pairs], sums[batch.num_pairs:]], dim=1)

    def pair_step(module, batch: PreferenceBatch, normalizer):
        b = batch.num_pairs
        sums = sequence_sums(module, batch.sequences, 2 * b)  # chosen and rejected: one forward
        ref = batch.ref_logps
        if ref is None and spec.needs_reference:
            ref = live_pair_reference(batch)
        value, metrics = pair_loss(spec, hyperparameters, sums[:b], sums[b:], ref,
                                   batch.response_lengths[:b], batch.response_lengths[b:], batch.label)
        if nll_weight:
            nll = preferred_nll(sums[:b], sums[b:], batch.response_lengths[:b], batch.response_lengths[b:],
                                batch.label)
            metrics = {**metrics, "nll/preferred": nll.detach()}
            value = value + nll_weight * nll
        # The registry returns a mean over the micro-batch; × b / normalizer makes the step's
        # gradient the mean over every pair of the step.
        return value * b / normalizer, pair_metric_sums(value, metrics, b)

    def kto_step(module, batch: FeedbackBatch, normalizer):
        b = batch.num_examples
        policy = sequence_sums(module, batch.completions, b)
        with torch.no_grad():  # z0 is detached: no activations kept for the mismatched pass
            policy_mismatched = sequence_sums(module, batch.mismatched, b)
        ref = batch.ref_logps
        if ref is None:
            ref = torch.stack([live_reference(batch.completions, b), live_reference(batch.mismatched, b)], dim=1)
        value, metrics = kto_step_loss(spec, hyperparameters, policy, policy_mismatched, ref, batch.desirable)
        sums = kto_metric_sums(value, metrics, policy, ref, batch.desirable, hyperparameters["beta"])
        return value * b / normalizer, sums

    def evaluate(module):
        ref = ref_eval
        if ref is None and spec.needs_reference:
            with live_reference.active() as scorer:
                ref = _eval_scores(scorer, eval_set, pad_id, packing, 2 * eval_batch_size)
        return evaluate_items(module, eval_set, spec=spec, hyperparameters=hyperparameters, ref=ref,
                              pad_id=pad_id, packing=packing, batch_size=2 * eval_batch_size)

    def units(batch):
        return batch.num_pairs if spec.paired else batch.num_examples

    def tokens(batch):
        if spec.paired:
            return batch.sequences.num_tokens
        return batch.completions.num_tokens + batch.mismatched.num_tokens

    return SupervisedTask(lengths=[len(item) for item in train], make_batch=make_batch, units=units,
                          tokens=tokens, loss=pair_step if spec.paired else kto_step,
                          evaluate=evaluate if eval_set else None, group_by_length=not packing)


def _warn_kto_balance(items: Sequence[EncodedFeedback], hyperparameters: dict[str, float]) -> None:
    n_desirable = sum(f.desirable for f in items)
    n_undesirable = len(items) - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        log.warning("KTO data holds only %s examples", "undesirable" if n_desirable == 0 else "desirable")
        return
    ratio = (hyperparameters["desirable_weight"] * n_desirable) / (hyperparameters["undesirable_weight"] * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        suggested = hyperparameters["undesirable_weight"] * n_undesirable / n_desirable
        log.warning("KTO: λ_D·n_D / (λ_U·n_U) = %.2f (%d desirable, %d undesirable); the KTO paper recommends "
                    "1 to 4/3, e.g. --desirable-weight %.3g", ratio, n_desirable, n_undesirable, suggested)


# ----------------------------------------------------------------------------- the recipe


def run_dpo(cfg: DPOConfig) -> dict:
    """Train; returns {"final": path, "metrics": last metrics (with eval/...), "skipped": counts,
    "reference": {"path", "reused"} or None when reference-free or scored live}."""
    run_dir = Path(cfg.output_dir)
    spec = get_preference_loss(cfg.loss)
    hyperparameters = cfg.loss_hyperparameters
    tokenizer = load_tokenizer(cfg.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # 1. data
    skipped = SkipReport()
    train = load_items(cfg.train_data, spec, tokenizer, cfg, skipped)
    eval_set: list[Item] = []
    if cfg.eval_data:
        eval_set = load_items(cfg.eval_data, spec, tokenizer, cfg, skipped, limit=cfg.max_eval_examples,
                              pairs_for_eval=True)
    if skipped.total:
        log.warning("%s (%s)", skipped.summary(), "; ".join(w for ws in skipped.examples.values() for w in ws))
    if not train:
        raise DataError(f"every training record was skipped: {skipped.summary()}", path=cfg.train_data)
    if not spec.paired:
        _warn_kto_balance(train, hyperparameters)

    # 2. models and the reference (before engine.setup, which may load a resumed checkpoint)
    model = load_model(cfg.model, lora=LoraSettings(r=cfg.lora_r, alpha=cfg.lora_alpha) if cfg.lora_r else None,
                       seed=cfg.seed)
    engine = Engine(cfg, run_dir, description="dpo")
    model.to(engine.device)
    # The reference pass below runs before engine.setup: give it the kernel training will use.
    set_training_attention(model, cfg, engine.device)
    policy = TokenLogprobs(model, cfg.logprob_chunk)
    ref_train = ref_eval = None
    live_reference = None
    reference_info = None
    if spec.needs_reference:
        reference = build_reference(cfg, model, policy, engine.device)
        if cfg.precompute_reference:
            splits = {"train": train, **({"eval": eval_set} if eval_set else {})}
            scores, reused = precompute_reference(engine, reference, splits, batch_size=2 * cfg.batch_size,
                                                  pad_id=pad_id, packing=cfg.packing)
            ref_train, ref_eval = scores["train"], scores.get("eval")
            reference_info = {"path": str(run_dir / reference_cache.CACHE_FILE), "reused": reused}
            del reference  # a separately loaded reference model is not needed any more
        else:
            live_reference = reference

    # 3–5. train
    engine.setup(policy, tokenizer)
    if engine.is_main:
        atomic_write_text(run_dir / "data_report.json", json.dumps(
            {"loss": cfg.loss, "train_items": len(train), "eval_items": len(eval_set),
             "skipped": skipped.counts, "skipped_examples": skipped.examples}, indent=2))
    task = preference_task(spec, hyperparameters, train, eval_set, pad_id=pad_id, packing=cfg.packing,
                           ref_train=ref_train, ref_eval=ref_eval, live_reference=live_reference,
                           eval_batch_size=cfg.batch_size, nll_weight=cfg.nll_weight)
    metrics = fit(engine, task)
    final = engine.finish()
    return {"final": str(final), "metrics": metrics, "skipped": skipped.counts, "reference": reference_info}
