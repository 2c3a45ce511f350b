"""Direct preference optimization — DPO, conservative DPO, IPO, hinge/SLiC, robust DPO,
SimPO, ORPO, KTO, APO, BCO, NCA and EXO — top to bottom.

1. read preference pairs (rankings expand to pairs, ties kept as label 0.5), or for KTO
   unpaired thumbs-up/down feedback (pairs work too: each gives one desirable and one
   undesirable example); tokenize them through the chat template (`data.preference_batches`);
   over-length pairs and pairs with identical responses are skipped and counted;
2. reference log-probs: ONE no-grad pass of the frozen reference (`models.reference`) over
   every sequence before training, in the training precision, cached in
   `run_dir/reference_logps.pt` under a hash of (reference, tokens, precision) so a resumed
   run reuses it. With LoRA the reference is the base weights with the adapter disabled (no
   second model); the reference-free losses (SimPO, ORPO) skip this step;
3. each micro-batch: the chosen and rejected responses of all its pairs in ONE forward pass
   (one packed padding-free row with each pair's prompt stored once — the default — or 2B
   padded rows; per-sequence sums of token log-probs);
4. the per-pair loss by name (`losses.preference_registry`), summed and divided by the number
   of pairs in the whole optimizer step (every micro-batch, every process); KTO's reference
   point z0 comes from mismatched (prompt, another example's completion) sequences;
5. eval: implicit-reward accuracy and margins on held-out pairs; the final model goes to
   `run_dir/final`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhfkit.config import ConfigError, check, param
from rlhfkit.data import reference_cache
from rlhfkit.data.errors import DataError, SkipReport
from rlhfkit.data.preference import pairs_to_unpaired
from rlhfkit.data.preference_batches import (
    EncodedFeedback,
    EncodedPair,
    FeedbackBatch,
    PreferenceBatch,
    collate_feedback,
    collate_pairs,
    encode_feedback,
    encode_preference_pairs,
    response_length,
)
from rlhfkit.data.readers import holds_unpaired, parse_columns, read_preferences, read_unpaired
from rlhfkit.data.reference_cache import sequence_sums
from rlhfkit.data.tokenize import pad_token_id
from rlhfkit.io import atomic_write_text
from rlhfkit.losses.preference import NLL_REDUCTIONS, kto_reference_point, preferred_nll
from rlhfkit.losses.preference_registry import (
    HYPERPARAMETERS,
    PREFERENCE_LOSSES,
    FeedbackLogps,
    PairLogps,
    PreferenceLossSpec,
    check_hyperparameters,
    get_preference_loss,
)
from rlhfkit.losses.reward import non_tie_accuracy, pairwise_metrics
from rlhfkit.models.loading import LoraSettings, load_model, load_tokenizer
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.models.reference import ReferencePolicy
from rlhfkit.train.engine import Engine, TrainConfig, set_training_attention
from rlhfkit.train.loop import SupervisedTask, fit

log = logging.getLogger(__name__)

Item = EncodedPair | EncodedFeedback
# The config field of a loss hyper-parameter named otherwise on the command line: SimPO's margin γ
# would read as PPO's discount `--gamma`.
FIELD_OF = {"gamma": "simpo_margin"}


def field_of(hyperparameter: str) -> str:
    """The DPOConfig field (and flag) that sets a loss hyper-parameter."""
    return FIELD_OF.get(hyperparameter, hyperparameter)


@dataclass(frozen=True)
class DPOConfig(TrainConfig):
    kind = "dpo"
    output_dir: str = param("runs/dpo", "run folder: checkpoints, metrics.jsonl, config.yaml, final/")
    loss: str = param("dpo", f"preference loss: {', '.join(PREFERENCE_LOSSES)}")
    beta: float | None = param(None, "β: KL strength toward the reference (SimPO: reward scale); "
                                     "None = per loss: 0.1, simpo 2.0")
    label_smoothing: float | None = param(None, "dpo: assumed label flip rate in [0, 0.5] (conservative DPO), "
                                                "exo_pair: ε in (0, 0.5]; None = 0, exo_pair 1e-3")
    flip_rate: float | None = param(None, "robust: known label flip rate in [0, 0.5); None = 0.1")
    simpo_margin: float | None = param(None, "simpo: target reward margin γ ≥ 0; None = 1.0", old_names=("gamma",))
    odds_ratio_weight: float | None = param(None, "orpo: weight λ of the odds-ratio term; None = 0.1")
    desirable_weight: float | None = param(None, "kto: weight λ_D of desirable examples; None = 1.0")
    undesirable_weight: float | None = param(None, "kto: weight λ_U of undesirable examples; None = 1.0")
    ipo_average: bool | None = param(None, "ipo: per-token mean log-probs (TRL's choice; raise β); None = sums")
    nll_reduction: str | None = param(None, "NLL of orpo and of nll_weight: sequence = mean of per-response token "
                                            "means, token = batch token mean; None = sequence", choices=NLL_REDUCTIONS)
    nll_weight: float = param(0.0, "α ≥ 0: add α × the preferred response's mean per-token NLL to a paired "
                                   "loss (RPO; TRL's rpo_alpha); 0 = off")
    train_data: str = param("", "preference pairs or rankings (kto: also unpaired feedback): "
                                ".jsonl/.parquet file, datasets folder or hub id")
    eval_data: str = param("", "held-out pairs for implicit-reward accuracy and margins (optional)")
    data_split: str = param("train", "split of train_data to read when it is a datasets folder or hub id "
                                     "(e.g. train_prefs)")
    eval_split: str = param("", "split of eval_data to read (empty = data_split)")
    data_columns: str = param("", "rename columns before parsing, field=column pairs, e.g. "
                                  "'prompt=question,chosen=good,rejected=bad' (empty = none)")
    reference: str = param("", "reference model: empty = the starting model (with LoRA its base weights, "
                               "adapter disabled), or an HF id / folder")
    packing: bool = param(True, "chosen and rejected of a micro-batch in one padding-free row, each pair's "
                                "prompt stored once (--share-prompts), micro-batches drawn at random; "
                                "--no-packing: one padded batch of 2B rows, grouped by length "
                                "(bench/RESULTS.md: packed 1.4× padded on the demo pairs)")
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
            parse_columns(self.data_columns)
        except DataError as e:
            raise ConfigError(f"'data_columns': {e.message}") from None
        try:
            spec = get_preference_loss(self.loss)
        except ValueError as e:
            raise ConfigError(f"'loss': {e}") from None
        for name in HYPERPARAMETERS:  # RPO's NLL term (nll_weight > 0) reads nll_reduction with any loss
            check(getattr(self, field_of(name)) is None or name in spec.hyperparameters
                  or (name == "nll_reduction" and self.nll_weight > 0),
                  f"'{field_of(name)}' is not used by loss '{self.loss}' (its hyper-parameters: "
                  f"{', '.join(map(field_of, spec.hyperparameters))})")
        check(not self.reference or spec.needs_reference,
              f"loss '{self.loss}' is reference-free: 'reference' is not used")
        check_hyperparameters(self.loss, self.loss_hyperparameters, field_of=field_of, error=ConfigError)
        check(self.max_eval_examples >= 1, "max_eval_examples must be ≥ 1")
        check(self.nll_weight >= 0, "nll_weight must be ≥ 0")
        check(self.nll_weight == 0 or spec.paired, f"nll_weight needs paired data; loss '{self.loss}' is unpaired")

    @property
    def loss_hyperparameters(self) -> dict[str, float]:
        """The loss's hyper-parameters by the loss function's names: the values set here, else its defaults."""
        return get_preference_loss(self.loss).with_defaults({name: getattr(self, field_of(name))
                                                             for name in HYPERPARAMETERS})


# ----------------------------------------------------------------------------- 1. data


def load_items(source: str, spec: PreferenceLossSpec, tokenizer, cfg: DPOConfig, skipped: SkipReport, *,
               limit: int | None = None, pairs_for_eval: bool = False, split: str = "train") -> list[Item]:
    """Read and tokenize `source` (its `split`, columns renamed by `cfg.data_columns`) for
    `spec`: pairs for the paired losses (ties dropped and counted when `cfg.ties` is "drop"
    and this is training data); KTO examples for KTO (from unpaired records, or from pairs
    split in two, ties skipped). With `pairs_for_eval`, a KTO eval file of pairs stays pairs
    (for pairwise accuracy)."""
    columns = cfg.data_columns
    unpaired = holds_unpaired(source, split, columns=columns)
    if spec.paired and unpaired:
        raise DataError(f"loss '{spec.name}' trains on preference pairs (prompt, chosen, rejected), but this "
                        "file holds unpaired feedback (prompt, completion, label): use --loss kto", path=source)
    if spec.paired or (pairs_for_eval and not unpaired):
        pairs = read_preferences(source, split, columns=columns)[:limit]
        if cfg.ties == "drop" and not pairs_for_eval:
            for _ in range(sum(p.is_tie for p in pairs)):
                skipped.add("tie (ties=drop)", source)
            pairs = [p for p in pairs if not p.is_tie]
        return encode_preference_pairs(tokenizer, pairs, cfg.max_length, skipped, source, drop_identical=True)
    if unpaired:
        feedback = read_unpaired(source, split, columns=columns)[:limit]
    else:
        feedback, ties = pairs_to_unpaired(read_preferences(source, split, columns=columns)[:limit])
        for _ in range(ties):
            skipped.add("tie (neither response desirable)", source)
    return encode_feedback(tokenizer, feedback, cfg.max_length, skipped, source, cfg.seed)


def _warn_kto_balance(items: Sequence[EncodedFeedback], hyperparameters: dict[str, float]) -> None:
    n_desirable = sum(f.desirable for f in items)
    n_undesirable = len(items) - n_desirable
    if n_desirable == 0 or n_undesirable == 0:
        log.warning("KTO data holds only %s examples", "undesirable" if n_desirable == 0 else "desirable")
        return
    weight_d, weight_u = hyperparameters["desirable_weight"], hyperparameters["undesirable_weight"]
    ratio = (weight_d * n_desirable) / (weight_u * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        suggested = weight_u * n_undesirable / n_desirable
        log.warning("KTO: λ_D·n_D / (λ_U·n_U) = %.2f (%d desirable, %d undesirable); the KTO paper recommends "
                    "1 to 4/3, e.g. --desirable-weight %.3g", ratio, n_desirable, n_undesirable, suggested)


# ----------------------------------------------------------------------------- 2. reference


def build_reference(cfg: DPOConfig, model: nn.Module, device) -> ReferencePolicy:
    """The frozen reference, loading a second model only when needed.

    - `reference` names another model: that model, frozen.
    - LoRA: the policy's own base weights with the adapter disabled — no second model.
    - full fine-tuning, precomputed: the policy itself, scored before its first update (and
      before a resumed run loads its checkpoint), which is exactly the starting model.
    - full fine-tuning, scored live every step: a frozen copy of the starting model.
    """
    other = bool(cfg.reference) and cfg.reference != cfg.model
    name = cfg.reference if other else cfg.model
    identity = reference_cache.model_identity(name, seed=cfg.seed)
    if not other and (cfg.lora_r > 0 or cfg.precompute_reference):
        return ReferencePolicy(model, share_weights=True, identity=identity, chunk_size=cfg.logprob_chunk)
    frozen = load_model(name, seed=cfg.seed).to(device)
    frozen.requires_grad_(False)
    set_training_attention(frozen, cfg, device)  # the policy's kernel, so step 0 gives policy = reference
    return ReferencePolicy(frozen, share_weights=True, identity=identity, chunk_size=cfg.logprob_chunk)


def precompute_reference(engine: Engine, reference: ReferencePolicy, splits: dict[str, Sequence[Item]], *,
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


def pair_logps(policy_chosen: Tensor, policy_rejected: Tensor, ref: Tensor | None, chosen_lengths: Tensor,
               rejected_lengths: Tensor, label: Tensor) -> PairLogps:
    """The inputs of a paired loss. All (B,); ref: (B, 2) reference sums [chosen, rejected] or None."""
    return PairLogps(policy_chosen, policy_rejected, chosen_lengths, rejected_lengths, label,
                     ref_chosen=None if ref is None else ref[:, 0], ref_rejected=None if ref is None else ref[:, 1])


def kto_step_loss(spec: PreferenceLossSpec, hyperparameters: dict[str, float], policy: Tensor,
                  policy_mismatched: Tensor, ref: Tensor, desirable: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO on one micro-batch. policy, policy_mismatched, desirable: (B,); ref: (B, 2).

    z0 = max(0, mean_i(π(y_j|x_i) − ref(y_j|x_i))) over the micro-batch's mismatched
    sequences (detached): the KTO paper's per-batch estimate of KL(π ‖ ref).
    """
    z0 = kto_reference_point(policy_mismatched.detach(), ref[:, 1])
    return spec.compute(FeedbackLogps(policy, ref[:, 0], desirable, z0), hyperparameters)


# KTO's class means and z0 describe a whole micro-batch, not one example: weighted by the
# micro-batch size, the step logs their size-weighted mean (exact with one micro-batch per step).
KTO_BATCH_STATISTICS = ("rewards/desirable", "rewards/undesirable", "kto/kl_reference", "logps/desirable",
                        "logps/undesirable")


def preference_task(spec: PreferenceLossSpec, hyperparameters: dict[str, float], train: Sequence[Item],
                    eval_set: Sequence[Item], *, pad_id: int, packing: bool, share_prompts: bool = False,
                    ref_train: Tensor | None = None, ref_eval: Tensor | None = None,
                    live_reference: ReferencePolicy | None = None, eval_batch_size: int = 8,
                    nll_weight: float = 0.0, nll_reduction: str = "sequence") -> SupervisedTask:
    """The DPO-family task for `fit`: one unit = one pair (KTO: one example).

    `hyperparameters` missing a name take its default. `nll_weight` α adds α × `preferred_nll`
    (RPO, by `nll_reduction`) to each pair's loss. Reference sums come from `ref_train`/`ref_eval`
    ((N, 2), precomputed) or, when those are None, from `live_reference` each micro-batch.
    share_prompts: packed pairs store their prompt once (`collate_pairs`; KTO's examples have
    no partner to share with).
    """
    if spec.needs_reference and ref_train is None and live_reference is None:
        raise ValueError(f"loss '{spec.name}' needs reference log-probs: pass ref_train or live_reference")
    hyperparameters = spec.with_defaults(hyperparameters)

    def make_batch(idx):
        items = [train[i] for i in idx]
        ref = ref_train[torch.tensor(idx)] if ref_train is not None else None
        if spec.paired:
            return collate_pairs(items, pad_id, packed=packing, ref_logps=ref, share_prompts=share_prompts)
        return collate_feedback(items, pad_id, packed=packing, ref_logps=ref)

    def pair_step(module, batch: PreferenceBatch, normalizer):
        b = batch.num_pairs
        sums = sequence_sums(module, batch.sequences, 2 * b)  # chosen and rejected: one forward
        ref = batch.ref_logps
        if ref is None and spec.needs_reference:
            live = live_reference.sequence_sums(batch.sequences, 2 * b)
            ref = torch.stack([live[:b], live[b:]], dim=1)
        lengths = batch.response_lengths
        losses, metrics = spec.compute(pair_logps(sums[:b], sums[b:], ref, lengths[:b], lengths[b:], batch.label),
                                       hyperparameters)
        if nll_weight:
            nll = preferred_nll(sums[:b], sums[b:], lengths[:b], lengths[b:], batch.label, reduction=nll_reduction)
            metrics = {**metrics, "nll/preferred": nll.detach()}
            losses = losses + nll_weight * nll
        # Σ over the micro-batch / the step's pair count: the step's gradient is the mean over all its pairs.
        return losses.sum() / normalizer, {"loss": losses.detach().sum(),
                                           **{name: value.sum() for name, value in metrics.items()}}

    def kto_step(module, batch: FeedbackBatch, normalizer):
        b = batch.num_examples
        policy = sequence_sums(module, batch.completions, b)
        with torch.no_grad():  # z0 is detached: no activations kept for the mismatched pass
            policy_mismatched = sequence_sums(module, batch.mismatched, b)
        ref = batch.ref_logps
        if ref is None:
            ref = torch.stack([live_reference.sequence_sums(batch.completions, b),
                               live_reference.sequence_sums(batch.mismatched, b)], dim=1)
        losses, metrics = kto_step_loss(spec, hyperparameters, policy, policy_mismatched, ref, batch.desirable)
        return losses.sum() / normalizer, {"loss": losses.detach().sum(),
                                           "rewards/accuracy": metrics["rewards/accuracy"].sum(),
                                           "kto/desirable_fraction": batch.desirable.sum().float(),
                                           **{name: metrics[name] * b for name in KTO_BATCH_STATISTICS}}

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


# ----------------------------------------------------------------------------- 5. eval


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
            lengths = torch.tensor([[response_length(s) for s in p.sequences] for p in items], dtype=torch.float32)
            losses, per_pair = spec.compute(pair_logps(policy[:, 0], policy[:, 1], ref, lengths[:, 0], lengths[:, 1],
                                                       label), hyperparameters)
            per_pair = {"loss": losses, **per_pair}
        else:
            beta = hyperparameters["beta"]
            per_pair = pairwise_metrics(beta * (policy[:, 0] - ref[:, 0]), beta * (policy[:, 1] - ref[:, 1]), label)
        metrics = {name: value.mean() for name, value in per_pair.items()}
        metrics["rewards/accuracy"] = non_tie_accuracy(per_pair)
        keep = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")
    else:
        desirable = torch.tensor([f.desirable for f in items], dtype=torch.bool)
        losses, metrics = kto_step_loss(spec, hyperparameters, policy[:, 0], policy[:, 1], ref, desirable)
        metrics = {**metrics, "loss": losses.mean(),
                   "rewards/margin": metrics["rewards/desirable"] - metrics["rewards/undesirable"]}
        keep = ("loss", "rewards/desirable", "rewards/undesirable", "rewards/margin", "kto/kl_reference")
    return {f"eval/{name}": float(metrics[name]) for name in keep if name in metrics}


# ----------------------------------------------------------------------------- the recipe


def run_dpo(cfg: DPOConfig) -> dict:
    """Train; returns {"final": path, "metrics": last metrics (with eval/...), "skipped": counts,
    "reference": {"path", "reused"} or None when reference-free or scored live}."""
    run_dir = Path(cfg.output_dir)
    spec = get_preference_loss(cfg.loss)
    hyperparameters = cfg.loss_hyperparameters
    tokenizer = load_tokenizer(cfg.model)
    pad_id = pad_token_id(tokenizer)

    # 1. data
    skipped = SkipReport()
    train = load_items(cfg.train_data, spec, tokenizer, cfg, skipped, split=cfg.data_split)
    eval_set: list[Item] = []
    if cfg.eval_data:
        eval_set = load_items(cfg.eval_data, spec, tokenizer, cfg, skipped, limit=cfg.max_eval_examples,
                              pairs_for_eval=True, split=cfg.eval_split or cfg.data_split)
    if skipped.total:
        log.warning("%s", skipped.describe())
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
        reference = build_reference(cfg, model, engine.device)
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
                           share_prompts=cfg.shares_prompts, ref_train=ref_train, ref_eval=ref_eval,
                           live_reference=live_reference,
                           eval_batch_size=cfg.batch_size, nll_weight=cfg.nll_weight,
                           nll_reduction=cfg.nll_reduction or "sequence")
    metrics = fit(engine, task)
    final = engine.finish()
    return {"final": str(final), "metrics": metrics, "skipped": skipped.counts, "reference": reference_info}
