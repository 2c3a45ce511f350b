"""`rlhf judge`: AI feedback from the command line.

  rlhf judge pairs           label (prompt, response_a, response_b) records → preference JSONL (RLAIF)
  rlhf judge agreement       the judge against human labels exported by the labeling app
  rlhf judge constitutional  critique → revise into an SFT dataset, and AI preference pairs

`--judge` picks the backend (`backend_from_spec`): the embedded model, a local model folder,
or any OpenAI-compatible endpoint. Judge completions are cached on disk (`--cache`), so a
rerun of the same command asks the judge nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rlhfkit.cli.errors import friendly
from rlhfkit.cli.flags import old_flags
from rlhfkit.cli.help_format import App
from rlhfkit.data.readers import read_preferences
from rlhfkit.io import atomic_write_text
from rlhfkit.judge.agreement import judge_vs_human
from rlhfkit.judge.cache import open_cache
from rlhfkit.judge.constitutional import (
    check_templates,
    load_principles,
    policy_samples,
    write_constitutional_data,
)
from rlhfkit.judge.loading import backend_from_spec
from rlhfkit.judge.pairwise import PairwiseJudge, label_pairs_with_judge, resolve_judge_mode
from rlhfkit.judge.records import PAIR_FIELDS, labeled_records, read_constitutional_items, read_judge_items, write_jsonl

console = Console()

JUDGE_HELP = ("the judge: 'embedded', 'local:PATH' (a model folder or HF id), or an OpenAI-compatible "
              "base URL such as http://localhost:8000/v1 (with --judge-model)")
CACHE_HELP = "judge cache file (SQLite); 'none' turns caching off (default: ~/.cache/rlhfkit/judge_cache.sqlite)"

judge_app = App(no_args_is_help=True, rich_markup_mode="rich",
                        help="AI feedback: an LLM judge labels pairs (RLAIF), is checked against human "
                             "labels, and revises answers against written principles (Constitutional AI).")


def _close(backend) -> None:
    if hasattr(backend, "close"):
        backend.close()


def _judge_summary_line(summary: dict[str, Any], calls: int) -> str:
    return (f"{summary['n']} pairs: a {summary['a_wins']} / b {summary['b_wins']} / tie {summary['ties']}; "
            f"orders disagreed on {summary['inconsistent']}, {summary['invalid_outputs']} unparseable outputs, "
            f"first-position bias {summary['position_bias']:.2f}; {calls} judge calls (the rest from the cache)")


# ----------------------------------------------------------------------------- rlhf judge pairs

@judge_app.command("pairs",
                   short_help="Label (prompt, response_a, response_b) pairs with the judge → preference JSONL.")
@old_flags(judge_template="--template")
def judge_pairs(
    data: Path = typer.Option(..., help="JSONL with prompt, response_a, response_b per line"),
    out: Path = typer.Option(..., help="write preference pairs (prompt, chosen, rejected, label, provenance) here"),
    judge: str = typer.Option("embedded", help=JUDGE_HELP),
    judge_model: str | None = typer.Option(None, help="model name sent to an HTTP judge"),
    judge_template: str = typer.Option("pairwise", help="judge prompt: a built-in name or a .txt file with "
                                                        "{prompt}, {response_a}, {response_b}"),
    cache: str | None = typer.Option(None, help=CACHE_HELP),
    both_orders: bool = typer.Option(True, "--both-orders/--one-order", help="ask in both orders (disagreement = tie)"),
    mode: str = typer.Option("auto", help="verdict (parse 'Verdict: X'), logprob (read log P(A) − log P(B), position "
                                          "offset removed; local judges) or auto (logprob for a local judge)"),
    round: int | None = typer.Option(None, "--round", help="labeling round written into the provenance"),
    model_version: str | None = typer.Option(None, help="policy version written into the provenance"),
    max_new_tokens: int = typer.Option(256, help="longest judge answer in tokens"),
    concurrency: int = typer.Option(4, help="HTTP requests in flight at once"),
    rate_limit: float | None = typer.Option(None, help="at most this many HTTP requests per second"),
):
    """RLAIF: the judge picks the better response of each pair; the winner becomes `chosen`
    (label 1.0), a tie keeps the order with label 0.5. Source "ai", annotator = the judge.

    [bold]Examples[/]

      rlhf judge pairs --data pairs.jsonl --out ai_prefs.jsonl

      rlhf judge pairs --data pairs.jsonl --out ai_prefs.jsonl --judge http://localhost:8000/v1 --judge-model qwen2.5-7b

      OPENAI_API_KEY=... rlhf judge pairs --data pairs.jsonl --out ai_prefs.jsonl --judge https://api.openai.com/v1 --judge-model gpt-4o-mini --rate-limit 5
    """  # noqa: E501 — the examples are shown as written, one command a line
    friendly(_judge_pairs)(data, out, judge, judge_model, judge_template, cache, both_orders, mode, round,
                            model_version, max_new_tokens, concurrency, rate_limit)


def _judge_pairs(data, out, judge, judge_model, judge_template, cache, both_orders, mode, round, model_version,
                 max_new_tokens, concurrency, rate_limit):
    records = read_judge_items(data)
    backend = backend_from_spec(judge, judge_model=judge_model, max_new_tokens=max_new_tokens,
                                max_concurrency=concurrency, max_requests_per_s=rate_limit)
    try:
        pj = PairwiseJudge(backend, judge_template, both_orders=both_orders, cache=open_cache(cache),
                           mode=resolve_judge_mode(mode, backend))
        pairs, batch = label_pairs_with_judge(pj, [{k: r[k] for k in PAIR_FIELDS} for r in records],
                                              round=round, model_version=model_version)
    finally:
        _close(backend)
    rows = labeled_records(records, pairs)
    write_jsonl(out, rows)
    console.print(escape(_judge_summary_line(batch.summary(), batch.n_backend_calls)))
    console.print(f"[green]wrote {len(rows)} AI preference pairs[/] → {escape(str(out))}")


# ----------------------------------------------------------------------------- rlhf judge agreement

@judge_app.command("agreement", short_help="Agreement of the judge with human labels (labeling-app export).")
@old_flags(data="--human", judge_template="--template")
def judge_agreement_command(
    data: Path = typer.Option(..., help="human preference pairs, e.g. `rlhf label export --format pairs` output"),
    judge: str = typer.Option("embedded", help=JUDGE_HELP),
    judge_model: str | None = typer.Option(None, help="model name sent to an HTTP judge"),
    judge_template: str = typer.Option("pairwise", help="judge prompt: a built-in name or a .txt file"),
    cache: str | None = typer.Option(None, help=CACHE_HELP),
    out: Path | None = typer.Option(None, help="also write the numbers and confusion table as JSON"),
    max_new_tokens: int = typer.Option(256, help="longest judge answer in tokens"),
    concurrency: int = typer.Option(4, help="HTTP requests in flight at once"),
    rate_limit: float | None = typer.Option(None, help="at most this many HTTP requests per second"),
):
    """Judge every exported human pair (chosen as A, rejected as B, both orders) and compare:
    agreement, agreement on pairs neither called a tie, Cohen's κ, the confusion table.

    [bold]Examples[/]

      rlhf judge agreement --data export.jsonl

      rlhf judge agreement --data export.jsonl --judge http://localhost:8000/v1 --judge-model llama-3-8b --out agreement.json
    """  # noqa: E501 — the examples are shown as written, one command a line
    friendly(_judge_agreement)(data, judge, judge_model, judge_template, cache, out, max_new_tokens, concurrency,
                                rate_limit)


def _judge_agreement(data, judge, judge_model, judge_template, cache, out, max_new_tokens, concurrency, rate_limit):
    pairs = read_preferences(data)
    backend = backend_from_spec(judge, judge_model=judge_model, max_new_tokens=max_new_tokens,
                                max_concurrency=concurrency, max_requests_per_s=rate_limit)
    try:
        report, batch = judge_vs_human(PairwiseJudge(backend, judge_template, cache=open_cache(cache)), pairs)
    finally:
        _close(backend)
    report = {**report, "judge": backend.name, "judge_summary": batch.summary()}
    console.print(f"judge {escape(backend.name)} vs human labels on {report['n']} pairs: "
                  f"agreement [bold]{report['agreement']:.1%}[/] (on decided pairs "
                  f"{report['agreement_decided']:.1%}), Cohen's κ {report['cohen_kappa']:.3f}")
    table = Table(title="rows: judge · columns: human")
    table.add_column("")
    for h in ("a", "b", "tie"):
        table.add_column(f"human {h}", justify="right")
    for j in ("a", "b", "tie"):
        table.add_row(f"judge {j}", *(str(report["confusion"][j][h]) for h in ("a", "b", "tie")))
    console.print(table)
    if out:
        atomic_write_text(out, json.dumps(report, indent=2))
        console.print(f"wrote {escape(str(out))}")


# ----------------------------------------------------------------------------- rlhf judge constitutional

@judge_app.command("constitutional",
                   short_help="Critique → revise against principles: an SFT dataset and AI preference pairs.")
@old_flags(output_dir="--out")
def judge_constitutional(
    prompts: Path = typer.Option(..., help="JSONL with 'prompt' per line; optional 'response' (the answer to "
                                           "revise) and 'response_a'/'response_b' (a pair to label)"),
    output_dir: Path = typer.Option(..., help="folder for sft.jsonl, preferences.jsonl and summary.json"),
    principles: Path | None = typer.Option(None, help="Markdown list of principles (default: the built-in one)"),
    rounds: int = typer.Option(1, help="critique → revise rounds per answer, each with a freshly drawn principle"),
    judge: str = typer.Option("embedded", help=JUDGE_HELP),
    judge_model: str | None = typer.Option(None, help="model name sent to an HTTP judge"),
    policy: str | None = typer.Option(None, help="sample the answers (and two per prompt for the pairs) from "
                                                    "this model instead of asking the judge"),
    temperature: float = typer.Option(1.0, help="sampling temperature of --policy"),
    critique_template: str = typer.Option("critique", help="built-in name or .txt with {prompt}, {response}, "
                                                           "{principle}"),
    revision_template: str = typer.Option("revision", help="built-in name or .txt with {prompt}, {response}, "
                                                           "{principle}, {critique}"),
    preference_template: str = typer.Option("constitutional_pairwise", help="built-in name or .txt with "
                                            "{principle}, {prompt}, {response_a}, {response_b}"),
    cache: str | None = typer.Option(None, help=CACHE_HELP),
    seed: int = typer.Option(0, help="seed of the principle draws and the policy's samples"),
    max_new_tokens: int = typer.Option(256, help="longest judge (and policy) answer in tokens"),
    concurrency: int = typer.Option(4, help="HTTP requests in flight at once"),
    rate_limit: float | None = typer.Option(None, help="at most this many HTTP requests per second"),
):
    """Constitutional AI, both stages. The answer to each prompt (its 'response', else a sample
    of --policy, else the judge model's own answer) is critiqued and revised against sampled
    principles → sft.jsonl (completion = revision). Then a pair per prompt ('response_a'/
    'response_b', else two --policy samples, else original vs revision) is labeled by which
    answer better follows a sampled principle → preferences.jsonl (source "ai").

    [bold]Examples[/]

      rlhf judge constitutional --prompts prompts.jsonl --output-dir runs/cai

      rlhf judge constitutional --prompts prompts.jsonl --output-dir runs/cai --principles my_principles.md --rounds 2 --policy runs/sft/final

      rlhf judge constitutional --prompts prompts.jsonl --output-dir runs/cai --judge http://localhost:8000/v1 --judge-model qwen2.5-7b
    """  # noqa: E501 — the examples are shown as written, one command a line
    friendly(_judge_constitutional)(prompts, output_dir, principles, rounds, judge, judge_model, policy, temperature,
                                     critique_template, revision_template, preference_template, cache, seed,
                                     max_new_tokens, concurrency, rate_limit)


def _judge_constitutional(prompts, output_dir, principles, rounds, judge, judge_model, policy, temperature,
                          critique_template, revision_template, preference_template, cache, seed,
                          max_new_tokens, concurrency, rate_limit):
    constitution = load_principles(principles)
    check_templates(critique_template, revision_template, preference_template)
    records, convs = read_constitutional_items(prompts)
    samples = (policy_samples(policy, convs, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
               if policy else None)
    backend = backend_from_spec(judge, judge_model=judge_model, max_new_tokens=max_new_tokens,
                                max_concurrency=concurrency, max_requests_per_s=rate_limit)
    try:
        summary = write_constitutional_data(
            backend, records, convs, constitution, output_dir, samples=samples, rounds=rounds, seed=seed,
            cache=open_cache(cache), critique_template=critique_template, revision_template=revision_template,
            preference_template=preference_template)
    finally:
        _close(backend)
    out = Path(output_dir)
    preferences = summary["preferences"]
    console.print(f"[green]constitutional SFT data[/]: {summary['sft_examples']} revisions ({summary['changed']} "
                  f"differ from the original) → {escape(str(out / 'sft.jsonl'))}")
    console.print(f"[green]AI preference pairs[/]: {preferences['n']} ({preferences['ties']} ties, "
                  f"{preferences['inconsistent']} order disagreements) → {escape(str(out / 'preferences.jsonl'))}")


def register(app: typer.Typer) -> None:
    app.add_typer(judge_app, name="judge",
                  help="AI feedback: LLM judge (RLAIF), agreement with humans, Constitutional AI.")
