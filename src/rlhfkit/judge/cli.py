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
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()

JUDGE_HELP = ("the judge: 'embedded', 'local:PATH' (a model folder or HF id), or an OpenAI-compatible "
              "base URL such as http://localhost:8000/v1 (with --judge-model)")
CACHE_HELP = "judge cache file (SQLite); 'none' turns caching off (default: ~/.cache/rlhfkit/judge_cache.sqlite)"

judge_app = typer.Typer(no_args_is_help=True, rich_markup_mode="rich",
                        help="AI feedback: an LLM judge labels pairs (RLAIF), is checked against human "
                             "labels, and revises answers against written principles (Constitutional AI).")


# ----------------------------------------------------------------------------- the --judge flag

def load_local_model(path: str, precision: str = "auto"):
    """(tokenizer, model) of 'embedded', 'tiny', a folder or an HF id, on the GPU when there is
    one, in `train.engine.inference_dtype(precision)` (bf16 where the hardware has it); a path
    that is none of these is a `ModelNotFound`, not a traceback."""
    from rlhfkit.models.loading import ModelNotFound, load_model, load_tokenizer
    from rlhfkit.train.engine import inference_device, inference_dtype

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"cannot load model '{path}': not 'embedded', a model folder or a Hugging Face id "
                            f"({str(e).splitlines()[0]})") from None
    model = load_model(path, dtype=inference_dtype(precision))
    return tokenizer, model.to(inference_device()).eval()


def backend_from_spec(spec: str, *, judge_model: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                      max_new_tokens: int = 256, batch_size: int = 8, max_concurrency: int = 4,
                      max_requests_per_s: float | None = None, timeout_s: float = 60.0):
    """A judge backend from a `--judge` value.

    'embedded' / 'tiny' / 'local:PATH' → `LocalModelBackend` (greedy, on the GPU when there
    is one); 'http(s)://…' → `OpenAICompatibleBackend` with model `judge_model` and the API key
    from `$api_key_env` (none needed for a local server).
    """
    from rlhfkit.config import ConfigError
    from rlhfkit.judge.backends import LocalModelBackend, OpenAICompatibleBackend

    spec = spec.strip()
    if spec.startswith(("http://", "https://")):
        if not judge_model:
            raise ConfigError(f"--judge {spec} is an HTTP endpoint: name the model it serves with "
                              "--judge-model (e.g. --judge-model gpt-4o-mini)")
        return OpenAICompatibleBackend(spec, judge_model, api_key_env=api_key_env or None,
                                       timeout_s=timeout_s, max_concurrency=max_concurrency,
                                       max_requests_per_s=max_requests_per_s, max_tokens=max_new_tokens)
    if spec in ("embedded", "tiny") or spec.startswith("local:"):
        path = spec.removeprefix("local:")
        if not path:
            raise ConfigError("--judge local: needs a model folder or id, e.g. local:runs/sft/final")
        tokenizer, model = load_local_model(path)
        return LocalModelBackend(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 name=f"local:{path}")
    raise ConfigError(f"unknown --judge {spec!r}: use 'embedded', 'local:PATH' or an http(s):// URL")


def open_cache(cache: str | None):
    """The judge cache named by `--cache` (None → the user-wide default, 'none' → no cache)."""
    from rlhfkit.judge.cache import JudgeCache
    from rlhfkit.models.loading import cache_root

    if cache is not None and cache.lower() == "none":
        return None
    return JudgeCache(Path(cache) if cache else cache_root() / "judge_cache.sqlite")


def _friendly(fn):
    """The CLI's one-line errors (exit 2) for bad data, config or model, and for a judge that
    failed after its retries."""
    from rlhfkit.cli import _friendly as friendly
    from rlhfkit.judge.backends import JudgeError

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JudgeError as e:
            Console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}")
            raise typer.Exit(2) from None

    wrapped.__name__ = fn.__name__
    return friendly(wrapped)


def _close(backend) -> None:
    if hasattr(backend, "close"):
        backend.close()


# ----------------------------------------------------------------------------- inputs

_PAIR_FIELDS = ("prompt", "response_a", "response_b")


def read_judge_items(path: str | Path) -> list[dict[str, Any]]:
    """Records with `prompt` (text or messages), `response_a` and `response_b` (text); other
    fields are kept and copied to the output. Errors name file, line and field."""
    from rlhfkit.data.errors import DataError
    from rlhfkit.data.readers import _conversation, _text, iter_records

    items = []
    for rec, where in iter_records(path):
        if "prompt" not in rec:
            raise where.error("prompt", "missing (a judge record needs prompt, response_a, response_b)")
        _conversation(rec["prompt"], "prompt", where)
        for key in ("response_a", "response_b"):
            _text(rec, key, where, allow_empty=True)
        items.append(rec)
    if not items:
        raise DataError("no records", path=str(path))
    return items


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    from rlhfkit.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def _judge_summary_line(summary: dict[str, Any], calls: int) -> str:
    return (f"{summary['n']} pairs: a {summary['a_wins']} / b {summary['b_wins']} / tie {summary['ties']}; "
            f"orders disagreed on {summary['inconsistent']}, {summary['invalid_outputs']} unparseable outputs, "
            f"first-position bias {summary['position_bias']:.2f}; {calls} judge calls (the rest from the cache)")


# ----------------------------------------------------------------------------- rlhf judge pairs

@judge_app.command("pairs", short_help="Label (prompt, response_a, response_b) pairs with the judge → preference JSONL.")
def judge_pairs(
    data: Path = typer.Option(..., help="JSONL with prompt, response_a, response_b per line"),
    out: Path = typer.Option(..., help="write preference pairs (prompt, chosen, rejected, label, provenance) here"),
    judge: str = typer.Option("embedded", help=JUDGE_HELP),
    judge_model: Optional[str] = typer.Option(None, help="model name sent to an HTTP judge"),
    template: str = typer.Option("pairwise", help="judge prompt: a built-in name or a .txt file with "
                                                  "{prompt}, {response_a}, {response_b}"),
    cache: Optional[str] = typer.Option(None, help=CACHE_HELP),
    both_orders: bool = typer.Option(True, "--both-orders/--one-order", help="ask in both orders (disagreement = tie)"),
    mode: str = typer.Option("auto", help="verdict (parse 'Verdict: X'), logprob (read log P(A) − log P(B), position "
                                          "offset removed; local judges) or auto (logprob for a local judge)"),
    round: Optional[int] = typer.Option(None, "--round", help="labeling round written into the provenance"),
    model_version: Optional[str] = typer.Option(None, help="policy version written into the provenance"),
    max_new_tokens: int = typer.Option(256, help="longest judge answer in tokens"),
    concurrency: int = typer.Option(4, help="HTTP requests in flight at once"),
    rate_limit: Optional[float] = typer.Option(None, help="at most this many HTTP requests per second"),
):
    """RLAIF: the judge picks the better response of each pair; the winner becomes `chosen`
    (label 1.0), a tie keeps the order with label 0.5. Source "ai", annotator = the judge.

    [bold]Examples[/]

      rlhf judge pairs --data pairs.jsonl --out ai_prefs.jsonl

      rlhf judge pairs --data pairs.jsonl --out ai_prefs.jsonl --judge http://localhost:8000/v1 --judge-model qwen2.5-7b

      OPENAI_API_KEY=... rlhf judge pairs --data pairs.jsonl --out ai_prefs.jsonl --judge https://api.openai.com/v1 --judge-model gpt-4o-mini --rate-limit 5
    """
    _friendly(_judge_pairs)(data, out, judge, judge_model, template, cache, both_orders, mode, round, model_version,
                            max_new_tokens, concurrency, rate_limit)


def _judge_pairs(data, out, judge, judge_model, template, cache, both_orders, mode, round, model_version,
                 max_new_tokens, concurrency, rate_limit):
    from rlhfkit.judge.constitutional import preference_record
    from rlhfkit.judge.pairwise import PairwiseJudge, label_pairs_with_judge, resolve_judge_mode

    records = read_judge_items(data)
    backend = backend_from_spec(judge, judge_model=judge_model, max_new_tokens=max_new_tokens,
                                max_concurrency=concurrency, max_requests_per_s=rate_limit)
    try:
        pj = PairwiseJudge(backend, template, both_orders=both_orders, cache=open_cache(cache),
                           mode=resolve_judge_mode(mode, backend))
        pairs, batch = label_pairs_with_judge(pj, [{k: r[k] for k in _PAIR_FIELDS} for r in records],
                                              round=round, model_version=model_version)
    finally:
        _close(backend)
    rows = []
    for rec, pair in zip(records, pairs):
        row = preference_record(pair)
        row["prompt"] = rec["prompt"]  # as the user wrote it
        rows.append({**{k: v for k, v in rec.items() if k not in _PAIR_FIELDS}, **row})
    _write_jsonl(out, rows)
    console.print(escape(_judge_summary_line(batch.summary(), batch.n_backend_calls)))
    console.print(f"[green]wrote {len(rows)} AI preference pairs[/] → {escape(str(out))}")


# ----------------------------------------------------------------------------- rlhf judge agreement

@judge_app.command("agreement", short_help="Agreement of the judge with human labels (labeling-app export).")
def judge_agreement_command(
    human: Path = typer.Option(..., help="human preference pairs, e.g. `rlhf label export --format pairs` output"),
    judge: str = typer.Option("embedded", help=JUDGE_HELP),
    judge_model: Optional[str] = typer.Option(None, help="model name sent to an HTTP judge"),
    template: str = typer.Option("pairwise", help="judge prompt: a built-in name or a .txt file"),
    cache: Optional[str] = typer.Option(None, help=CACHE_HELP),
    out: Optional[Path] = typer.Option(None, help="also write the numbers and confusion table as JSON"),
    max_new_tokens: int = typer.Option(256, help="longest judge answer in tokens"),
    concurrency: int = typer.Option(4, help="HTTP requests in flight at once"),
    rate_limit: Optional[float] = typer.Option(None, help="at most this many HTTP requests per second"),
):
    """Judge every exported human pair (chosen as A, rejected as B, both orders) and compare:
    agreement, agreement on pairs neither called a tie, Cohen's κ, the confusion table.

    [bold]Examples[/]

      rlhf judge agreement --human export.jsonl

      rlhf judge agreement --human export.jsonl --judge http://localhost:8000/v1 --judge-model llama-3-8b --out agreement.json
    """
    _friendly(_judge_agreement)(human, judge, judge_model, template, cache, out, max_new_tokens, concurrency,
                                rate_limit)


def judge_vs_human(judge, pairs) -> tuple[dict[str, Any], Any]:
    """(judge_agreement report, JudgeBatch) of `judge` on human `PreferencePair`s: A = chosen,
    so the human label P(chosen ≻ rejected) is directly P(A wins)."""
    from rlhfkit.judge.pairwise import judge_agreement

    batch = judge.judge_many([(p.prompt, p.chosen, p.rejected) for p in pairs])
    return judge_agreement(batch.verdicts, [p.label for p in pairs]), batch


def _judge_agreement(human, judge, judge_model, template, cache, out, max_new_tokens, concurrency, rate_limit):
    from rlhfkit.data.readers import read_preferences
    from rlhfkit.judge.pairwise import PairwiseJudge
    from rlhfkit.io import atomic_write_text

    pairs = read_preferences(human)
    backend = backend_from_spec(judge, judge_model=judge_model, max_new_tokens=max_new_tokens,
                                max_concurrency=concurrency, max_requests_per_s=rate_limit)
    try:
        report, batch = judge_vs_human(PairwiseJudge(backend, template, cache=open_cache(cache)), pairs)
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

@judge_app.command("constitutional", short_help="Critique → revise against principles: an SFT dataset and AI preference pairs.")
def judge_constitutional(
    prompts: Path = typer.Option(..., help="JSONL with 'prompt' per line; optional 'response' (the answer to "
                                           "revise) and 'response_a'/'response_b' (a pair to label)"),
    out: Path = typer.Option(..., help="folder for sft.jsonl, preferences.jsonl and summary.json"),
    principles: Optional[Path] = typer.Option(None, help="Markdown list of principles (default: the built-in one)"),
    rounds: int = typer.Option(1, help="critique → revise rounds per answer, each with a freshly drawn principle"),
    judge: str = typer.Option("embedded", help=JUDGE_HELP),
    judge_model: Optional[str] = typer.Option(None, help="model name sent to an HTTP judge"),
    policy: Optional[str] = typer.Option(None, help="sample the answers (and two per prompt for the pairs) from "
                                                    "this model instead of asking the judge"),
    temperature: float = typer.Option(1.0, help="sampling temperature of --policy"),
    critique_template: str = typer.Option("critique", help="built-in name or .txt with {prompt}, {response}, {principle}"),
    revision_template: str = typer.Option("revision", help="built-in name or .txt with {prompt}, {response}, "
                                                           "{principle}, {critique}"),
    preference_template: str = typer.Option("constitutional_pairwise", help="built-in name or .txt with "
                                            "{principle}, {prompt}, {response_a}, {response_b}"),
    cache: Optional[str] = typer.Option(None, help=CACHE_HELP),
    seed: int = typer.Option(0, help="seed of the principle draws and the policy's samples"),
    max_new_tokens: int = typer.Option(256, help="longest judge (and policy) answer in tokens"),
    concurrency: int = typer.Option(4, help="HTTP requests in flight at once"),
    rate_limit: Optional[float] = typer.Option(None, help="at most this many HTTP requests per second"),
):
    """Constitutional AI, both stages. The answer to each prompt (its 'response', else a sample
    of --policy, else the judge model's own answer) is critiqued and revised against sampled
    principles → sft.jsonl (completion = revision). Then a pair per prompt ('response_a'/
    'response_b', else two --policy samples, else original vs revision) is labeled by which
    answer better follows a sampled principle → preferences.jsonl (source "ai").

    [bold]Examples[/]

      rlhf judge constitutional --prompts prompts.jsonl --out runs/cai

      rlhf judge constitutional --prompts prompts.jsonl --out runs/cai --principles my_principles.md --rounds 2 --policy runs/sft/final

      rlhf judge constitutional --prompts prompts.jsonl --out runs/cai --judge http://localhost:8000/v1 --judge-model qwen2.5-7b
    """
    _friendly(_judge_constitutional)(prompts, out, principles, rounds, judge, judge_model, policy, temperature,
                                     critique_template, revision_template, preference_template, cache, seed,
                                     max_new_tokens, concurrency, rate_limit)


def _policy_samples(policy: str, prompts, *, temperature: float, max_new_tokens: int, seed: int) -> list[list[str]]:
    """Two samples per prompt from `policy`."""
    from rlhfkit.rollout.generate import SamplingConfig, generate

    tokenizer, model = load_local_model(policy)
    gens = generate(model, tokenizer, list(prompts), SamplingConfig(
        max_new_tokens=max_new_tokens, temperature=temperature, n=2, seed=seed), progress=True)
    return [[gens[2 * i].text, gens[2 * i + 1].text] for i in range(len(prompts))]


def _judge_constitutional(prompts, out, principles, rounds, judge, judge_model, policy, temperature,
                          critique_template, revision_template, preference_template, cache, seed,
                          max_new_tokens, concurrency, rate_limit):
    from rlhfkit.data.readers import _conversation, _text, iter_records
    from rlhfkit.judge.constitutional import (
        CRITIQUE_PLACEHOLDERS,
        PREFERENCE_PLACEHOLDERS,
        REVISION_PLACEHOLDERS,
        constitutional_preferences,
        constitutional_sft_dataset,
        initial_responses,
        load_named_template,
        load_principles,
        preference_record,
    )
    from rlhfkit.io import atomic_write_text

    constitution = load_principles(principles)
    # Fail on a bad template before any model is loaded or any call is made.
    load_named_template(critique_template, CRITIQUE_PLACEHOLDERS)
    load_named_template(revision_template, REVISION_PLACEHOLDERS)
    load_named_template(preference_template, PREFERENCE_PLACEHOLDERS)
    records, convs = [], []
    for rec, where in iter_records(prompts):
        if "prompt" not in rec:
            raise where.error("prompt", "missing")
        convs.append(_conversation(rec["prompt"], "prompt", where))
        for key in ("response", "response_a", "response_b"):
            if key in rec:
                _text(rec, key, where, allow_empty=True)
        if ("response_a" in rec) != ("response_b" in rec):
            raise where.error("response_b" if "response_a" in rec else "response_a",
                              "give both response_a and response_b, or neither")
        records.append(rec)
    if not records:
        from rlhfkit.data.errors import DataError

        raise DataError("no records", path=str(prompts))

    samples = (_policy_samples(policy, convs, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
               if policy else None)
    backend = backend_from_spec(judge, judge_model=judge_model, max_new_tokens=max_new_tokens,
                                max_concurrency=concurrency, max_requests_per_s=rate_limit)
    judge_cache = open_cache(cache)
    try:
        answers: list[str | None] = [r.get("response") if "response" in r else
                                     (samples[i][0] if samples else None) for i, r in enumerate(records)]
        missing = [i for i, a in enumerate(answers) if a is None]
        if missing:
            own = initial_responses(backend, [convs[i] for i in missing], cache=judge_cache)
            for i, text in zip(missing, own):
                answers[i] = text
        out = Path(out)
        results = constitutional_sft_dataset(
            backend, list(zip(convs, answers)), constitution, out / "sft.jsonl", rounds=rounds, seed=seed,
            cache=judge_cache, critique_template=critique_template, revision_template=revision_template)
        items, origin = [], []
        for i, rec in enumerate(records):
            if "response_a" in rec:
                items.append((convs[i], rec["response_a"], rec["response_b"]))
                origin.append("record")
            elif samples:
                items.append((convs[i], samples[i][0], samples[i][1]))
                origin.append("policy")
            elif results[i].revision != results[i].original:
                items.append((convs[i], results[i].original, results[i].revision))
                origin.append("original_vs_revision")
        pairs, pref_summary = constitutional_preferences(backend, items, constitution, seed=seed,
                                                         template=preference_template, cache=judge_cache)
    finally:
        _close(backend)
    _write_jsonl(out / "preferences.jsonl",
                 [{**preference_record(p), "pair_origin": o} for p, o in zip(pairs, origin)])
    summary = {"judge": backend.name, "principles": list(constitution), "rounds": rounds,
               "sft_examples": len(results),
               "changed": sum(r.revision != r.original for r in results),
               "preferences": {k: v for k, v in pref_summary.items()}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    console.print(f"[green]constitutional SFT data[/]: {len(results)} revisions ({summary['changed']} differ "
                  f"from the original) → {escape(str(out / 'sft.jsonl'))}")
    console.print(f"[green]AI preference pairs[/]: {len(pairs)} ({pref_summary['ties']} ties, "
                  f"{pref_summary['inconsistent']} order disagreements) → {escape(str(out / 'preferences.jsonl'))}")
