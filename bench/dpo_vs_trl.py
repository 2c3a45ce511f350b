"""rlhfkit's DPO step against TRL's `DPOTrainer`: same model, pairs, precision and optimizer,
in one process, steps interleaved; prints tokens/s of each side and the ratio.

    python bench/dpo_vs_trl.py                          # 8 demo pairs, bf16, 2 warmup + 8 timed steps
    python bench/dpo_vs_trl.py --trl-sides default      # ours against TRL's defaults only
    python bench/dpo_vs_trl.py --trl-precompute-ref     # TRL's default column scores its reference up front too
    python bench/dpo_vs_trl.py --precision fp32 --steps 8 --profile 15
    python bench/dpo_vs_trl.py --mix 32,1024 --max-length 1100 --pairs 4 --trl-sides best   # mixed lengths
    OMP_NUM_THREADS=1 python bench/dpo_vs_trl.py --steps 1 --warmup 0 --threads 1   # a quick smoke test

What each side runs per optimizer step
- ours (padded): exactly what `rlhf dpo` runs, with its defaults (loss "dpo", β 0.1,
  packing off, reference precomputed). The pieces are the real ones: pairs read and
  tokenized by `recipes.dpo.load_items` (`encode_preference_pairs`) from a JSONL file; the
  reference from `build_reference` (the starting policy itself) scored ONCE before training
  by `precompute_reference` (timed separately, not part of any step); the task from
  `preference_task` (chosen and rejected of all pairs in one forward of 2B right-padded rows,
  `TokenLogprobs` chunked log-probs summed per sequence, the registry's sigmoid DPO loss,
  normalized by the step's pairs); the `Engine` (accelerate, bf16 autocast, AdamW,
  clipping, metrics). Each step is one call of `train.loop.fit` itself, told to run the
  next single step, so our steps can be interleaved with TRL's.
- ours (packed): the same with `packing=True` (the 2B sequences in one padding-free row, each
  pair's prompt stored once: `share_prompts`, on by default with rlhfkit's attention).
- TRL: `DPOTrainer.train()` with TRL's defaults except what must match (β 0.1, loss
  "sigmoid", precision, batch size, max_length, lr, AdamW betas, weight decay 0, constant
  schedule, no warmup) on a `datasets.Dataset` of the same records in the conversational
  prompt/chosen/rejected layout, so the same chat template applies. By default
  (`precompute_ref_log_probs=False`) TRL runs a no-grad forward of a frozen reference copy of
  the model every step, besides the policy forward (fused chunked LM head that also computes
  entropy, mean logits and top-1 accuracy for its logs) and backward (with gradient
  checkpointing, TRL's default). `--trl-precompute-ref` makes this column score the reference
  once up front, as ours does. A callback times each TRL step and runs our steps in between.
- TRL (best): the same with TRL's fastest settings on this hardware (`TRL_BEST`):
  `precompute_ref_log_probs=True` (the reference scored once before training, outside every
  step, as ours) and gradient checkpointing off. Not set: `padding_free`, which TRL 1.16's
  DPOTrainer turns back off with a warning ("temporarily unavailable after a refactor"), and
  `use_liger_kernel` (see the settings line). Its trainer runs in a worker thread that takes
  turns with the main one (`trl_side.FollowerTRL`): ours, TRL, TRL best, ours, ...

Both sides start from fresh fp32 weights of the embedded SmolLM2-135M-Instruct, use fp32
master weights with bf16 autocast (or fp32 throughout with `--precision fp32`), the same
number of torch threads, and see the same batch every step (all `--pairs` pairs). With
policy = reference at step 0, the DPO loss is exactly ln 2 on both sides; the mean policy
log-probs of step 0 and the loss of step 1 (after one update) are compared too.
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
from common import (  # bench/common.py
    StepTimes,
    load_average,
    model_flops_per_token,
    stopwatch,
)
from trl_data import (  # bench/trl_data.py
    PACKED,
    PADDED,
    TrainingStepRecorder,
    batch_rows,
    pairs_note,
    preference_setup,
)
from trl_side import (  # bench/trl_side.py
    Interleaver,
    OurSide,
    build_trl_sides,
    liger_note,
    optimizer_summary,
    our_settings,
    pairs_argument,
    parse_bench_args,
    print_speed,
    start,
    step_loss_lines,
    trl_names,
    trl_settings,
)

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import SkipReport
from rlhfkit.data.preference_batches import EncodedPair, collate_pairs
from rlhfkit.data.tokenize import Encoded
from rlhfkit.losses.preference_registry import get_preference_loss
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.recipes.dpo import DPOConfig as OurDPOConfig
from rlhfkit.recipes.dpo import build_reference, load_items, precompute_reference, preference_task
from rlhfkit.train.engine import Engine, set_training_attention

OURS, OURS_PACKED, TRL = PADDED, PACKED, "TRL DPOTrainer"  # ours: what `rlhf dpo` runs (padded)
BETA = 0.1
TRL_BEST = {"precompute_ref_log_probs": True}  # + gradient checkpointing off (trl_settings); see the docstring


# ------------------------------------------------------------------------------ our side

def our_config(args, *, packing: bool, data_path: Path, run_dir: Path) -> OurDPOConfig:
    return OurDPOConfig(loss="dpo", beta=BETA, packing=packing, precompute_reference=True,
                        **our_settings(args, batch_size=args.pairs, data_path=data_path, run_dir=run_dir))


def build_ours(cfg: OurDPOConfig, train: list[EncodedPair], tokenizer) -> tuple[OurSide, float, torch.Tensor]:
    """Our DPO side as `run_dpo` builds it: (side, seconds of the reference pass, (N, 2) reference sums)."""
    spec = get_preference_loss(cfg.loss)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = load_model(cfg.model, seed=cfg.seed)
    engine = Engine(cfg, cfg.output_dir, total_steps=cfg.max_steps, description="dpo")
    model.to(engine.device)
    set_training_attention(model, cfg, engine.device)
    policy = TokenLogprobs(model, cfg.logprob_chunk)
    reference = build_reference(cfg, model, engine.device)
    with stopwatch(engine.device) as t:
        scores, _ = precompute_reference(engine, reference, {"train": train}, batch_size=2 * cfg.batch_size,
                                         pad_id=pad_id, packing=cfg.packing)
    engine.setup(policy, tokenizer)
    task = preference_task(spec, cfg.loss_hyperparameters, train, [], pad_id=pad_id, packing=cfg.packing,
                           share_prompts=cfg.shares_prompts, ref_train=scores["train"], eval_batch_size=cfg.batch_size)
    return OurSide(engine, task, cfg), t[0], scores["train"]


# ------------------------------------------------------------------------------ TRL side

def build_trl(records: list[dict], tokenizer, *, args, run_dir: Path, callback, best: bool = False):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    settings = {"precompute_ref_log_probs": args.trl_precompute_ref,
                **trl_settings(args, batch_size=len(records), run_dir=run_dir, best=best), **(TRL_BEST if best else {})}
    trl_args = DPOConfig(beta=BETA, loss_type=["sigmoid"], **settings)
    return DPOTrainer(model=load_model(args.model), args=trl_args, train_dataset=Dataset.from_list(records),
                      processing_class=tokenizer, callbacks=[callback])


def _shifted_labels(ids: list[int], completion_mask: list[int]) -> list[int]:
    """TRL's labels (ids on completion tokens), shifted to our convention: labels[t] = ids[t+1]."""
    return [ids[t + 1] if completion_mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


def check_same_pairs(rows, pairs: list[EncodedPair]) -> list[str]:
    """Compare TRL's prepared pairs (prompt_ids + chosen_ids / rejected_ids, completion mask)
    with ours (input ids, shifted labels) token by token; returns the differences."""
    if len(rows) != len(pairs):
        return [f"TRL kept {len(rows)} pairs, we kept {len(pairs)}"]
    problems = []
    for i, (row, pair) in enumerate(zip(rows, pairs, strict=True)):
        for side, ours in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            prompt, completion = list(row["prompt_ids"]), list(row[f"{side}_ids"])
            ids = prompt + completion
            if ids != ours.input_ids:
                problems.append(f"pair {i} {side}: input ids differ (TRL {len(ids)} tokens, ours {len(ours)})")
            elif _shifted_labels(ids, [0] * len(prompt) + [1] * len(completion)) != ours.labels:
                problems.append(f"pair {i} {side}: completion masks differ (TRL's completion starts at "
                                f"{len(prompt)}, ours at {ours.prompt_len})")
    return problems


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    def own(p):
        pairs_argument(p)
        p.add_argument("--trl-precompute-ref", action="store_true",
                       help="precompute_ref_log_probs=True in TRL's default column too (TRL's default False runs a "
                            "reference forward every step; the 'best' column always precomputes)")

    return parse_bench_args(__doc__, argv, lr=5e-6, own=own, positive=("pairs",))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = start(args, "rlhfkit DPO step vs TRL DPOTrainer")
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as folder:
        run(args, threads, Path(folder))
    return 0


def _sequences(pairs: list[EncodedPair]) -> list[Encoded]:
    return [p.chosen for p in pairs] + [p.rejected for p in pairs]


def run(args, threads: int, tmp: Path) -> None:
    """Build both sides in `tmp` (data file, run folders), train them interleaved, print the report."""
    tokenizer = load_tokenizer(args.model)
    records, configs = preference_setup(args, tmp, our_config, tokenizer)
    skipped = SkipReport()
    train = load_items(configs[OURS].train_data, get_preference_loss("dpo"), tokenizer, configs[OURS], skipped)
    if skipped.total:
        raise SystemExit(f"pairs skipped: {skipped.summary()}; raise --max-length")

    ours, precompute_s, ref_sums = {}, {}, {}
    for name, cfg in configs.items():
        ours[name], precompute_s[name], ref_sums[name] = build_ours(cfg, train, tokenizer)
    device = ours[OURS].engine.device

    sequences = _sequences(train)
    real_tokens = sum(len(s) for s in sequences)
    loss_tokens = sum(sum(t != IGNORE_INDEX for t in s.labels) for s in sequences)
    names = trl_names(TRL, args)
    times = {name: StepTimes(name, real_tokens, args.warmup) for name in (*names.values(), OURS, OURS_PACKED)}
    inter = Interleaver(ours, times, trl_name=next(iter(names.values())), device=device,
                        profile_step=args.warmup + args.steps if args.profile else None, profile_rows=args.profile)
    build_s = {}

    def build(best, callback):
        with stopwatch(device) as t:
            trainer = build_trl(records, tokenizer, args=args, run_dir=tmp / f"trl{'_best' * best}",
                                callback=callback, best=best)
        build_s[names["best" if best else "default"]] = t[0]
        return trainer

    trainers = build_trl_sides(inter, names, build)
    trainer = trainers[inter.trl_name]
    token_problems = [f"{n}: {p}" for n, t in trainers.items() for p in check_same_pairs(t.train_dataset, train)]
    recorders = {name: TrainingStepRecorder(t) for name, t in trainers.items()}
    recorder = recorders[inter.trl_name]

    print(f"batch         {len(train)} pairs = {len(sequences)} sequences ({pairs_note(args.mix, sequences)}); "
          f"{real_tokens} real tokens, {loss_tokens} completion tokens; "
          f"precision {args.precision}; lr {args.lr}; β {BETA}; threads {threads}")
    for name, tr in trainers.items():
        t = tr.args
        print(f"TRL settings  {name}: loss_type {t.loss_type}, precompute_ref_log_probs {t.precompute_ref_log_probs} "
              f"(reference model {'none' if tr.ref_model is None else 'a frozen copy, run every step'}), "
              f"optim {t.optim.value}, gradient_checkpointing {t.gradient_checkpointing}, padding_free "
              f"{tr.padding_free}, max_length {t.max_length}; trainer built in {build_s[name]:.1f} s"
              + (f"; padding_free not requested (TRL {_trl_version()} DPOTrainer turns it off: 'temporarily "
                 f"unavailable after a refactor'); {liger_note()}" if name.endswith("(best)") else ""))
    print(f"ours          loss dpo, reference precomputed once before training "
          f"({', '.join(f'{n}: {s:.2f} s' for n, s in precompute_s.items())}), "
          f"{optimizer_summary(ours[OURS].engine)}, no gradient checkpointing, "
          f"logprob_chunk {ours[OURS].cfg.logprob_chunk}")
    print("load average  before the steps: " + load_average())

    inter.train(trainer)

    # ---- same tokens
    batch = recorder.first_batch or {}
    trl_shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else (0, 0)
    trl_real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else -1
    trl_loss_tokens = int(batch["completion_mask"][:, 1:].sum()) if "completion_mask" in batch else -1
    same_rows = (batch_rows(batch) if batch else []) == sorted(tuple(s.input_ids) for s in sequences)
    shared = collate_pairs(train, 0, packed=True, share_prompts=configs[PACKED].shares_prompts).sequences
    packed_shape = (" × ".join(map(str, shared.input_ids.shape)) + f" = {shared.num_tokens} tokens, prompts "
                    + ("shared" if configs[PACKED].shares_prompts else "not shared"))
    print("\n## Same tokens")
    print(f"ours          {real_tokens} real tokens, {loss_tokens} completion tokens (padded: {len(sequences)} × "
          f"{max(len(s) for s in sequences)}; packed: {packed_shape})")
    print(f"TRL           {trl_real} real tokens, {trl_loss_tokens} completion tokens, batch {trl_shape[0]} × "
          f"{trl_shape[1]} = {trl_shape[0] * trl_shape[1]} positions")
    print(f"identical     rows of input ids: {'yes' if same_rows else 'NO'}; completion masks: "
          f"{'yes' if not token_problems else 'NO: ' + '; '.join(token_problems)}")

    # ---- same loss
    print(f"\n## Step-0 loss (fresh weights, policy = reference, same batch: ln 2 = {math.log(2):.6f} on both sides)")
    print(step_loss_lines(inter, recorders, 0))
    first = {**inter.first_losses, **{n: r.first_loss for n, r in recorders.items()}}
    print("ln 2 − loss    " + ", ".join(f"{n} {math.log(2) - v:+.1e}" for n, v in first.items()))
    off = [n for n, v in first.items() if abs(v - math.log(2)) > 1e-4]
    if off:
        print(f"WARNING       {', '.join(off)}: not ln 2, so the reference log-probs and the policy's first "
              "training forward differ for the same weights (different kernels or batching between the two passes)")
    print("\nMean summed policy log-prob per response at step 0 (the same forward both sides' losses use)")
    trl_logged = recorder.logged[0] if recorder.logged else {}
    for key in ("logps/chosen", "logps/rejected"):
        theirs = trl_logged.get(key, float("nan"))
        line = "  ".join(f"{n} {inter.metrics[n][0][key]:.4f}" for n in (OURS, OURS_PACKED))
        worst = max(abs(inter.metrics[n][0][key] - theirs) / abs(theirs) for n in (OURS, OURS_PACKED))
        print(f"{key:15} {line}  TRL {theirs:.4f}   max relative |ours − TRL| {worst:.1e}")
    if (step1 := step_loss_lines(inter, recorders, 1)) is not None:
        print("\nStep-1 loss (after one identical AdamW update)\n" + step1)
    for trl_name, tr in trainers.items():
        if "ref_chosen_logps" not in tr.train_dataset.column_names:
            continue
        rows = tr.train_dataset
        trl_ref = torch.tensor([list(rows["ref_chosen_logps"]), list(rows["ref_rejected_logps"])]).float().T
        for name, sums in ref_sums.items():
            worst = float((sums.float() - trl_ref).abs().max())
            print(f"precomputed reference sums, {name} vs {trl_name}: max |Δ| {worst:.3f} nats "
                  f"(of |sum| ≤ {float(trl_ref.abs().max()):.1f})")

    print("\n## What differs per step (beyond the settings made equal)")
    for name, tr in trainers.items():
        t = tr.args
        trl_reference = ("too (precompute_ref_log_probs)" if t.precompute_ref_log_probs
                         else "runs a no-grad reference forward every step")
        print(f"- {name}: reference: ours scored it once before training; TRL {trl_reference}; gradient "
              f"checkpointing {t.gradient_checkpointing} (ours off)")
    print("- TRL's fused LM head also computes entropy, mean logits and top-1 accuracy of every position for its logs")

    flops = model_flops_per_token(sum(p.numel() for p in ours[OURS].engine.unwrapped().parameters()))
    print_speed(times, inter, ours=OURS, others=[OURS_PACKED], flops=flops, device=device, warmup=args.warmup)


def _trl_version() -> str:
    from importlib import metadata

    return metadata.version("trl")


if __name__ == "__main__":
    sys.exit(main())
