"""rlhfkit's reward-model step against TRL's `RewardTrainer`: same backbone and head weights,
pairs, precision and optimizer, in one process, steps interleaved; prints tokens/s of each
side and the ratio.

    python bench/rm_vs_trl.py                           # 8 demo pairs, bf16, 2 warmup + 8 timed steps
    python bench/rm_vs_trl.py --precision fp32 --steps 8 --profile 15
    python bench/rm_vs_trl.py --trl-sides default        # ours against TRL's defaults only
    python bench/rm_vs_trl.py --mix 32,1024 --max-length 1100 --pairs 4 --trl-sides best   # mixed lengths
    OMP_NUM_THREADS=1 python bench/rm_vs_trl.py --steps 1 --warmup 0 --threads 1   # a quick smoke test

What each side runs per optimizer step
- ours (padded): exactly what `rlhf rm train` runs, with its defaults (packing off, one
  head, no margin, no label noise, no reward centering) except test_fraction 0 (every pair
  trains; no eval). The pieces are the real ones: pairs read by `recipes.reward.read_splits`
  from a JSONL file and tokenized by `data.preference_batches.encode_preference_pairs`; the model from
  `load_reward_model` (the backbone with a fresh `score` head); the task from
  `recipes.reward.reward_task` (chosen and rejected of all pairs in one forward of 2B
  right-padded rows, the head applied to each sequence's last real token only,
  Bradley–Terry loss −log σ(r_c − r_r) averaged over the step's pairs); the `Engine`
  (accelerate, bf16 autocast, AdamW, clipping, metrics). Each step is one call of
  `train.loop.fit` itself, told to run the next single step, so our steps can be
  interleaved with TRL's.
- ours (packed): the same with `packing=True` (the 2B sequences in one padding-free row, each
  pair's prompt stored once: `share_prompts`, on by default with rlhfkit's attention).
- TRL: `RewardTrainer.train()` with TRL's defaults except what must match (precision, batch
  size, max_length, lr, AdamW betas, weight decay 0, constant schedule, no warmup) on a
  `datasets.Dataset` of the same records in the conversational prompt/chosen/rejected
  layout, so the same chat template applies. Per step: one forward of the 2B right-padded
  rows through `AutoModelForSequenceClassification` (the head on every position, pooled at
  the last token that is not the pad token), loss −log σ(r_c − r_r) averaged over pairs
  (`center_rewards_coefficient` None, TRL's default), backward with gradient checkpointing
  (TRL's default), its reward metrics. A callback times each TRL step and runs our steps in
  between.
- TRL (best): the same with TRL's fastest settings on this hardware: gradient checkpointing
  off. Nothing else applies: TRL 1.16's RewardConfig has no `padding_free`, and
  `use_liger_kernel` is not used (see the settings line). Its trainer runs in a worker
  thread that takes turns with the main one (`trl_side.FollowerTRL`): ours, TRL, TRL best, ...

Both sides start from fresh fp32 weights of the embedded SmolLM2-135M-Instruct with the SAME
reward head (TRL's `score` weight is copied from our freshly initialized one), use fp32
master weights with bf16 autocast (or fp32 throughout with `--precision fp32`), the same
number of torch threads, and see the same batch every step (all `--pairs` pairs). The report
compares the step-0 loss, every sequence's step-0 reward, and the step-1 loss.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from common import StepTimes, load_average, model_flops_per_token  # bench/common.py
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

from rlhfkit.data.errors import SkipReport
from rlhfkit.data.preference_batches import EncodedPair, collate_pairs, encode_preference_pairs
from rlhfkit.models.loading import load_tokenizer, resolve_model_path
from rlhfkit.models.reward import load_reward_model
from rlhfkit.recipes.reward import RewardConfig as OurRewardConfig
from rlhfkit.recipes.reward import read_splits, reward_task
from rlhfkit.train.engine import Engine, inner_hf_model

OURS, OURS_PACKED, TRL = PADDED, PACKED, "TRL RewardTrainer"  # ours: what `rlhf rm train` runs (padded)


# ------------------------------------------------------------------------------ our side

def our_config(args, *, packing: bool, data_path: Path, run_dir: Path) -> OurRewardConfig:
    return OurRewardConfig(packing=packing, test_fraction=0.0,
                           **our_settings(args, batch_size=args.pairs, data_path=data_path, run_dir=run_dir))


def read_ours(cfg: OurRewardConfig, tokenizer) -> list[EncodedPair]:
    """The training pairs as `run_reward` reads and tokenizes them."""
    train_pairs, _, _ = read_splits(cfg)
    skipped = SkipReport()
    train = encode_preference_pairs(tokenizer, train_pairs, max_length=cfg.max_length, skipped=skipped,
                                    where=cfg.train_data)
    if skipped.total:
        raise SystemExit(f"pairs skipped: {skipped.summary()}; raise --max-length")
    return train


def build_ours(cfg: OurRewardConfig, train: list[EncodedPair], tokenizer) -> OurSide:
    model = load_reward_model(cfg.model, n_heads=cfg.n_heads, seed=cfg.seed, pad_token_id=tokenizer.pad_token_id)
    engine = Engine(cfg, cfg.output_dir, total_steps=cfg.max_steps, description="rm")
    engine.setup(model, tokenizer)
    return OurSide(engine, reward_task(cfg, tokenizer, train, [], {}), cfg)


def fresh_rewards(side: OurSide, train: list[EncodedPair], pad_id: int) -> dict[tuple[int, ...], float]:
    """{token ids: reward} of every sequence at the side's current (fresh) weights, no grad,
    in the training precision: the rewards its first step's loss is built from."""
    batch = collate_pairs(train, pad_id, packed=side.cfg.packing).to(side.engine.device)
    module = side.engine.module
    module.eval()
    with torch.no_grad(), side.engine.autocast():
        rewards = module(batch.sequences).float().cpu()
    module.train()
    sequences = [p.chosen for p in train] + [p.rejected for p in train]
    return {tuple(s.input_ids): float(r) for s, r in zip(sequences, rewards, strict=True)}


# ------------------------------------------------------------------------------ TRL side

def build_trl(records: list[dict], tokenizer, head: torch.Tensor, *, args, run_dir: Path, callback,
              best: bool = False):
    """TRL's trainer on the backbone loaded as TRL loads it from a path (num_labels=1, fp32),
    with `head` copied into its randomly initialized `score` layer."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(args.model), num_labels=1,
                                                               dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(head)
    trl_args = RewardConfig(**trl_settings(args, batch_size=len(records), run_dir=run_dir, best=best))
    return RewardTrainer(model=model, args=trl_args, train_dataset=Dataset.from_list(records),
                         processing_class=tokenizer, callbacks=[callback])


class RewardCapture:
    """Wraps `trainer.compute_loss` (TRL's own code runs inside) to keep the rewards of the
    first batch and the dtype of the loss it returns."""

    def __init__(self, trainer):
        self.inner = trainer.compute_loss
        self.first_rewards: torch.Tensor | None = None
        self.loss_dtype: torch.dtype | None = None
        trainer.compute_loss = self

    def __call__(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = self.inner(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.first_rewards is None:
            self.first_rewards = outputs.logits.detach().float().reshape(-1).cpu()
            self.loss_dtype = loss.dtype
        return (loss, outputs) if return_outputs else loss


def check_same_pairs(rows, pairs: list[EncodedPair], pad_id: int) -> tuple[list[str], int]:
    """Compare TRL's prepared pairs (chosen_ids / rejected_ids) with ours token by token.

    Returns (differences, sequences where TRL's pooling misses the last token): TRL's
    sequence classifier reads the reward at the last token that is not the pad token, ours
    at the last real token; they agree when no sequence ends with the pad token.
    """
    if len(rows) != len(pairs):
        return [f"TRL kept {len(rows)} pairs, we kept {len(pairs)}"], 0
    problems, missed = [], 0
    for i, (row, pair) in enumerate(zip(rows, pairs, strict=True)):
        for side, ours in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            ids = list(row[f"{side}_ids"])
            if ids != ours.input_ids:
                problems.append(f"pair {i} {side}: input ids differ (TRL {len(ids)} tokens, ours {len(ours)})")
            missed += ids[-1] == pad_id
    return problems, missed


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    return parse_bench_args(__doc__, argv, lr=2e-5, own=pairs_argument, positive=("pairs",))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = start(args, "rlhfkit reward-model step vs TRL RewardTrainer")
    with tempfile.TemporaryDirectory(prefix="bench_rm_") as folder:
        run(args, threads, Path(folder))
    return 0


def run(args, threads: int, tmp: Path) -> None:
    """Build both sides in `tmp` (data file, run folders), train them interleaved, print the report."""
    tokenizer = load_tokenizer(args.model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    records, configs = preference_setup(args, tmp, our_config, tokenizer)
    train = read_ours(configs[OURS], tokenizer)
    ours = {name: build_ours(cfg, train, tokenizer) for name, cfg in configs.items()}
    device = ours[OURS].engine.device
    head = inner_hf_model(ours[OURS].engine.unwrapped()).score.weight.detach().clone()
    ours_rewards = fresh_rewards(ours[OURS], train, pad_id)

    sequences = [p.chosen for p in train] + [p.rejected for p in train]
    real_tokens = sum(len(s) for s in sequences)
    names = trl_names(TRL, args)
    times = {name: StepTimes(name, real_tokens, args.warmup) for name in (*names.values(), OURS, OURS_PACKED)}
    inter = Interleaver(ours, times, trl_name=next(iter(names.values())), device=device,
                        profile_step=args.warmup + args.steps if args.profile else None, profile_rows=args.profile)
    trainers = build_trl_sides(inter, names, lambda best, callback: build_trl(
        records, tokenizer, head, args=args, run_dir=tmp / f"trl{'_best' * best}", callback=callback, best=best))
    trainer = trainers[inter.trl_name]
    token_problems, missed = check_same_pairs(trainer.train_dataset, train, pad_id)
    recorders = {name: TrainingStepRecorder(t) for name, t in trainers.items()}
    recorder = recorders[inter.trl_name]
    capture = RewardCapture(trainer)

    print(f"batch         {len(train)} pairs = {len(sequences)} sequences ({pairs_note(args.mix, sequences)}); "
          f"{real_tokens} real tokens; precision {args.precision}; lr {args.lr}; "
          f"threads {threads}")
    for name, tr in trainers.items():
        t = tr.args
        print(f"TRL settings  {name}: center_rewards_coefficient {t.center_rewards_coefficient}, optim "
              f"{t.optim.value}, gradient_checkpointing {t.gradient_checkpointing}, max_length {t.max_length}, pad "
              f"token {tokenizer.pad_token!r} (id {pad_id}); score head copied from ours"
              + (f"; padding_free: RewardConfig has none; {liger_note()}" if name.endswith("(best)") else ""))
    print(f"ours          Bradley–Terry, center_coef {ours[OURS].cfg.center_coef}, "
          f"{optimizer_summary(ours[OURS].engine)}, no gradient checkpointing")
    print("load average  before the steps: " + load_average())

    inter.train(trainer)

    # ---- same tokens
    batch = recorder.first_batch or {}
    trl_shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else (0, 0)
    trl_real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else -1
    trl_rows = batch_rows(batch) if batch else []
    same_rows = trl_rows == sorted(tuple(s.input_ids) for s in sequences)
    shared = collate_pairs(train, 0, packed=True, share_prompts=configs[PACKED].shares_prompts).sequences
    packed_shape = (" × ".join(map(str, shared.input_ids.shape)) + f" = {shared.num_tokens} tokens, prompts "
                    + ("shared" if configs[PACKED].shares_prompts else "not shared"))
    print("\n## Same tokens")
    print(f"ours          {real_tokens} real tokens (padded: {len(sequences)} × {max(len(s) for s in sequences)}; "
          f"packed: {packed_shape})")
    print(f"TRL           {trl_real} real tokens, batch {trl_shape[0]} × {trl_shape[1]} = "
          f"{trl_shape[0] * trl_shape[1]} positions")
    print(f"identical     rows of input ids: {'yes' if same_rows else 'NO'}; per pair: "
          f"{'yes' if not token_problems else 'NO: ' + '; '.join(token_problems)}")
    print(f"reward read   at the last token of every sequence on both sides: "
          f"{'yes' if not missed else f'NO: {missed} sequences end with the pad token, TRL reads an earlier one'}")

    # ---- same rewards and loss
    print("\n## Step-0 rewards and loss (fresh weights, same head, same batch)")
    if capture.first_rewards is not None and batch:
        theirs = {}
        for ids, mask, r in zip(batch["input_ids"], batch["attention_mask"], capture.first_rewards, strict=True):
            theirs[tuple(ids[mask.bool()].tolist())] = float(r)
        matched = [k for k in ours_rewards if k in theirs]
        diffs = [abs(ours_rewards[k] - theirs[k]) for k in matched]
        scale = max(abs(v) for v in theirs.values())
        print(f"rewards       {len(matched)} of {len(sequences)} sequences matched by token ids; max |r_ours − r_TRL| "
              f"{max(diffs):.2e} (rewards up to |r| = {scale:.3f}; {OURS}, no-grad forward before step 0)")
        n = len(capture.first_rewards) // 2
        chosen, rejected = capture.first_rewards[:n], capture.first_rewards[n:]
        trl_fp32_loss = float(-torch.nn.functional.logsigmoid(chosen - rejected).mean())
    else:
        trl_fp32_loss = float("nan")
    print(step_loss_lines(inter, recorders, 0))
    print(f"{'':{len(inter.trl_name)}} ({inter.trl_name}'s loss tensor is {capture.loss_dtype}; from its rewards "
          f"in fp32: {trl_fp32_loss:.6f})")
    trl_logged = recorder.logged[0] if recorder.logged else {}
    margins = "  ".join(f"{n} {inter.metrics[n][0]['rewards/margin']:+.5f}" for n in (OURS, OURS_PACKED))
    print(f"mean margin   r_c − r_r at step 0: {margins}  TRL {trl_logged.get('margin', float('nan')):+.5f}")
    if (step1 := step_loss_lines(inter, recorders, 1)) is not None:
        print("\nStep-1 loss (after one identical AdamW update)\n" + step1)

    print("\n## What differs per step (beyond the settings made equal)")
    checkpointing = ", ".join(f"{n} {tr.args.gradient_checkpointing}" for n, tr in trainers.items())
    print(f"- TRL gradient checkpointing: {checkpointing} (ours off); TRL applies the head to every "
          "position and pools after, ours gathers the last tokens' hidden states first")

    flops = model_flops_per_token(sum(p.numel() for p in ours[OURS].engine.unwrapped().parameters()))
    print_speed(times, inter, ours=OURS, others=[OURS_PACKED], flops=flops, device=device, warmup=args.warmup)


if __name__ == "__main__":
    sys.exit(main())
