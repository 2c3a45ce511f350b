"""rlhfkit's SFT step against TRL's `SFTTrainer`: same model, batch, precision and optimizer,
in one process, steps interleaved; prints tokens/s of each side and the ratio.

    python bench/sft_vs_trl.py                      # 8 demo examples, bf16, 2 warmup + 8 timed steps
    python bench/sft_vs_trl.py --tasks-per-example 2  # longer examples, ≈900 tokens/step
    python bench/sft_vs_trl.py --precision fp32 --steps 8 --profile 15
    python bench/sft_vs_trl.py --trl-sides best      # only TRL's best column
    python bench/sft_vs_trl.py --mix 32,1024 --max-length 1100 --trl-sides default --trl-gradient-checkpointing off
                                                     # 8 examples of 62–1,010 tokens; TRL padded, no checkpointing

What each side runs per optimizer step
- ours (packed): exactly what `rlhf sft` runs. The pieces are the real ones: records read by
  `read_sft` from a JSONL file, tokenized by `recipes.sft.encode_examples`, the task from
  `recipes.sft.sft_task` (`TokenLogprobs` chunked log-probs + `sft_loss` normalized by the
  step's loss tokens), the `Engine` (accelerate, bf16 autocast, AdamW, clipping, metrics).
  Each step is one call of `train.loop.fit` itself, told to run the next single step, so our
  steps can be interleaved with TRL's.
- ours (padded): the same with `packing=False` (length-grouped right padding), to show how
  much of the difference packing makes.
- TRL: `SFTTrainer.train()` with TRL's defaults except what must match (precision, batch
  size, max_length, lr, AdamW betas, constant schedule, no warmup) on a `datasets.Dataset` of
  the same records in the conversational prompt/completion layout, so the same chat template
  applies. A callback times each step and runs our steps between two of TRL's.
- TRL (best): the same with TRL's fastest settings on this hardware (`TRL_BEST`): gradient
  checkpointing off and `padding_free=True` (the batch as one row of concatenated examples,
  split by position ids; on CPU transformers' SDPA attention builds the block-diagonal mask
  from them, no flash attention needed). TRL refuses padding_free with `max_length` set and
  no packing, so this side has max_length None: no example here is longer than --max-length
  (ours would skip it), so nothing is cut on either side. Its trainer runs in a worker thread
  that takes turns with the main one (`trl_side.FollowerTRL`): ours, TRL, TRL best, ours, ...

Both sides start from fresh fp32 weights of the embedded SmolLM2-135M-Instruct, use fp32
master weights with bf16 autocast (or fp32 throughout with `--precision fp32`), the same
number of torch threads, and see the same batch every step (all `--examples` examples).
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

import torch
from common import (  # bench/common.py
    StepTimes,
    agreement_line,
    load_average,
    model_flops_per_token,
)
from trl_data import (  # bench/trl_data.py
    TrainingStepRecorder,
    batch_rows,
    task_groups,
    write_jsonl,
)
from trl_side import (  # bench/trl_side.py
    Interleaver,
    OurSide,
    build_trl_sides,
    liger_note,
    optimizer_summary,
    our_settings,
    parse_bench_args,
    print_speed,
    start,
    step_loss_lines,
    trl_names,
    trl_settings,
)

from rlhfkit.data.batches import IGNORE_INDEX
from rlhfkit.data.errors import SkipReport
from rlhfkit.data.packing import collate_packed, collate_padded
from rlhfkit.data.readers import read_sft
from rlhfkit.data.tokenize import Encoded
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.loading import load_model, load_tokenizer
from rlhfkit.models.policy import TokenLogprobs
from rlhfkit.recipes.sft import SFTConfig as OurSFTConfig
from rlhfkit.recipes.sft import encode_examples, sft_task
from rlhfkit.tasks.generate import make_tasks
from rlhfkit.train.engine import Engine, inner_hf_model

OURS, OURS_PADDED, TRL = "ours (packed)", "ours (padded, default)", "TRL SFTTrainer"
TRL_BEST = {"gradient_checkpointing": False, "padding_free": True, "max_length": None}  # see the docstring


# ------------------------------------------------------------------------------ data

def bench_records(examples: int, tasks_per_example: int, mix: tuple[int, int] | None = None,
                  tokenizer=None) -> list[dict[str, str]]:
    """`examples` prompt/completion records from the demo train split.

    With tasks_per_example K > 1, K consecutive demo tasks are joined into one record (their
    prompts, then their references, separated by blank lines), for longer sequences. With
    `mix` (LO, HI), each record joins the tasks of one `trl_data.task_groups` group instead:
    lengths drawn from LO..HI tokens.
    """
    if mix is not None:
        groups, _ = task_groups(examples, mix, tokenizer)
    else:
        need = examples * tasks_per_example
        tasks = make_tasks("train", math.ceil(need / 5))[:need]
        groups = [tasks[i * tasks_per_example:(i + 1) * tasks_per_example] for i in range(examples)]
    return [{"prompt": "\n\n".join(t.prompt for t in group), "completion": "\n\n".join(t.reference for t in group)}
            for group in groups]


def as_conversational(record: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """TRL's conversational prompt/completion layout of one record."""
    return {"prompt": [{"role": "user", "content": record["prompt"]}],
            "completion": [{"role": "assistant", "content": record["completion"]}]}


# ------------------------------------------------------------------------------ our side

def build_ours(encoded: list[Encoded], tokenizer, *, packing: bool, args, data_path: Path,
               run_dir: Path) -> OurSide:
    """Our SFT side; its steps' metrics carry loss = NLL per loss token."""
    cfg = OurSFTConfig(packing=packing, **our_settings(args, batch_size=len(encoded), data_path=data_path,
                                                       run_dir=run_dir))
    engine = Engine(cfg, run_dir, total_steps=args.total_steps, description="sft")
    engine.setup(TokenLogprobs(load_model(args.model), cfg.logprob_chunk), tokenizer)
    return OurSide(engine, sft_task(tokenizer, encoded, [], packing=packing), cfg)


def forward_loss(side: OurSide, encoded: list[Encoded], tokenizer, *, precision: str,
                 attention: str | None = None) -> float:
    """Mean NLL of the batch's completion tokens with the side's current (fresh) weights, forward only.

    precision "fp32": the inner transformers model (not the accelerate-prepared module, whose
    forward autocasts) with autocast off; "run": under the engine's autocast, as a training
    step computes it. `attention`: run with that attention kernel (e.g. TRL's "sdpa") instead
    of the one training uses, restored afterwards.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = collate_padded(encoded, pad).to(side.engine.device)
    inner = inner_hf_model(side.engine.unwrapped())
    module = TokenLogprobs(inner, side.cfg.logprob_chunk)
    trained_with = inner.config._attn_implementation
    if attention:
        inner.set_attn_implementation(attention)
    try:
        cast = side.engine.autocast() if precision == "run" else torch.autocast(side.engine.device.type,
                                                                                 enabled=False)
        with torch.no_grad(), cast:
            loss, _ = sft_loss(module(batch), batch.loss_mask)
    finally:
        inner.set_attn_implementation(trained_with)
    return float(loss)


# ------------------------------------------------------------------------------ TRL side

def build_trl(records: list[dict[str, str]], tokenizer, *, args, run_dir: Path, callback, best: bool = False):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    settings = trl_settings(args, batch_size=len(records), run_dir=run_dir, best=best)
    trl_args = SFTConfig(completion_only_loss=True, packing=False, **{**settings, **(TRL_BEST if best else {})})
    dataset = Dataset.from_list([as_conversational(r) for r in records])
    return SFTTrainer(model=load_model(args.model), args=trl_args, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[callback])


def check_same_tokens(trainer, encoded: list[Encoded]) -> list[str]:
    """Compare TRL's prepared examples with ours token by token; returns the differences.

    Ours: labels[t] = ids[t+1] on response tokens (already shifted). TRL: labels[t] = ids[t]
    on completion tokens, shifted inside the model. So TRL's labels[1:] must equal ours[:-1].
    """
    problems = []
    rows = trainer.train_dataset
    if len(rows) != len(encoded):
        return [f"TRL kept {len(rows)} examples, we kept {len(encoded)}"]
    for i, (row, ours) in enumerate(zip(rows, encoded, strict=True)):
        if list(row["input_ids"]) != ours.input_ids:
            problems.append(f"example {i}: input ids differ (TRL {len(row['input_ids'])} tokens, "
                            f"ours {len(ours.input_ids)})")
            continue
        theirs_shifted = list(row["labels"][1:]) + [IGNORE_INDEX]
        if theirs_shifted != ours.labels:
            diff = [t for t, (a, b) in enumerate(zip(theirs_shifted, ours.labels, strict=True)) if a != b]
            problems.append(f"example {i}: loss masks differ at positions {diff}")
    return problems


# ------------------------------------------------------------------------------ main

def parse_args(argv=None):
    def own(p):
        p.add_argument("--examples", type=int, default=8, help="examples per step (the batch size of both sides)")
        p.add_argument("--tasks-per-example", type=int, default=1,
                       help="demo tasks joined into one example (2 gives ≈900 tokens/step with 8 examples)")

    return parse_bench_args(__doc__, argv, lr=5e-5, own=own, positive=("examples", "tasks_per_example"))


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = start(args, "rlhfkit SFT step vs TRL SFTTrainer")
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as folder:
        run(args, threads, Path(folder))
    return 0


def run(args, threads: int, tmp: Path) -> None:
    """Build both sides in `tmp` (data file, run folders), train them interleaved, print the report."""
    tokenizer = load_tokenizer(args.model)
    records = bench_records(args.examples, args.tasks_per_example, args.mix, tokenizer)
    data_path = write_jsonl(records, tmp / "train.jsonl")
    skipped = SkipReport()
    encoded = encode_examples(tokenizer, read_sft(str(data_path)), args.max_length, skipped, str(data_path))
    if skipped.total:
        raise SystemExit(f"examples skipped: {skipped.summary()}; raise --max-length")

    ours = {OURS: build_ours(encoded, tokenizer, packing=True, args=args, data_path=data_path,
                              run_dir=tmp / "ours"),
            OURS_PADDED: build_ours(encoded, tokenizer, packing=False, args=args,
                                     data_path=data_path, run_dir=tmp / "ours_padded")}
    device = ours[OURS].engine.device

    real_tokens = sum(len(e) for e in encoded)
    loss_tokens = sum(sum(t != IGNORE_INDEX for t in e.labels) for e in encoded)
    names = trl_names(TRL, args)
    times = {name: StepTimes(name, real_tokens, args.warmup) for name in (*names.values(), OURS, OURS_PADDED)}
    inter = Interleaver(ours, times, trl_name=next(iter(names.values())), device=device,
                        profile_step=args.warmup + args.steps if args.profile else None, profile_rows=args.profile)
    trainers = build_trl_sides(inter, names, lambda best, callback: build_trl(
        records, tokenizer, args=args, run_dir=tmp / f"trl{'_best' * best}", callback=callback, best=best))
    trainer = next(iter(trainers.values()))
    token_problems = [f"{n}: {p}" for n, t in trainers.items() for p in check_same_tokens(t, encoded)]
    recorders = {name: TrainingStepRecorder(t) for name, t in trainers.items()}
    recorder = recorders[inter.trl_name]

    lengths = sorted(len(e) for e in encoded)
    shape = (f"mixed lengths (--mix {args.mix[0]},{args.mix[1]}): {lengths} tokens" if args.mix else
             f"{args.tasks_per_example} demo task(s)")
    print(f"batch         {len(encoded)} examples × {shape}; "
          f"{real_tokens} real tokens, {loss_tokens} loss (completion) tokens; precision {args.precision}; "
          f"lr {args.lr}; threads {threads}")
    for name, t in trainers.items():
        print(f"TRL settings  {name}: optim {t.args.optim.value}, gradient_checkpointing "
              f"{t.args.gradient_checkpointing}, padding_free {t.padding_free}, max_length {t.args.max_length}"
              + (f"; {liger_note()}" if name.endswith("(best)") else ""))
    print(f"ours          {optimizer_summary(ours[OURS].engine)}, no gradient checkpointing, "
          f"logprob_chunk {ours[OURS].cfg.logprob_chunk}")
    reference_loss = forward_loss(ours[OURS_PADDED], encoded, tokenizer, precision="fp32")
    trl_kernel_loss = forward_loss(ours[OURS_PADDED], encoded, tokenizer, precision="run", attention="sdpa")
    kernel = inner_hf_model(ours[OURS_PADDED].engine.unwrapped()).config._attn_implementation
    print("load average  before the steps: " + load_average())

    inter.train(trainer)

    # ---- same tokens and the same loss at step 0
    batch = recorder.first_batch or {}
    trl_real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else \
        (batch["input_ids"].numel() if batch else -1)
    trl_shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else ()
    trl_loss_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) if "labels" in batch else -1
    same_rows = (batch_rows(batch) if batch else []) == sorted(tuple(e.input_ids) for e in encoded)
    packed_shape = " × ".join(map(str, collate_packed(encoded).input_ids.shape))
    print("\n## Same tokens")
    print(f"ours          {real_tokens} real tokens, {loss_tokens} loss tokens "
          f"(packed: {packed_shape}; padded: {len(encoded)} × {max(len(e) for e in encoded)})")
    print(f"TRL           {trl_real} real tokens, {trl_loss_tokens} loss tokens, batch {trl_shape[0]} × "
          f"{trl_shape[1]} = {trl_shape[0] * trl_shape[1]} positions, num_items_in_batch {recorder.first_num_items}")
    print(f"identical     rows of input ids: {'yes' if same_rows else 'NO'}; loss masks: "
          f"{'yes' if not token_problems else 'NO: ' + '; '.join(token_problems)}")

    print("\n## Step-0 loss (fresh weights, same batch; mean NLL per completion token)")
    print(step_loss_lines(inter, recorders, 0, width=22))
    print(f"{'fp32 reference':15} {reference_loss:.6f}   (same fresh weights and batch, fp32 forward, no autocast: "
          "the scale of bf16 rounding noise in the lines above)")
    trl_loss = recorder.losses[0] if recorder.losses else float("nan")
    print(agreement_line("ours, TRL's kernel", trl_kernel_loss, trl_loss, width=15) +
          f"   (ours padded, forward only, {args.precision}, attention 'sdpa' as TRL's model uses instead of "
          f"ours '{kernel}': the same computation up to the attention kernel)")
    padded_metrics = inter.metrics.get(OURS_PADDED) or []
    for name, value in (("ours (padded)", padded_metrics[0]["loss"] if padded_metrics else None), ("TRL", trl_loss)):
        if value is not None:
            print(f"{name + ' vs fp32':15} |Δ| = {abs(value - reference_loss):.2e}")

    flops = model_flops_per_token(sum(p.numel() for p in ours[OURS].engine.unwrapped().parameters()))
    print_speed(times, inter, ours=OURS_PADDED, others=[OURS], flops=flops, device=device, warmup=args.warmup)

if __name__ == "__main__":
    sys.exit(main())
