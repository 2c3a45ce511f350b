"""Sampled tokens/s of the in-process engine against a vLLM server, at the GRPO bench's shape.

    python bench/generation_server.py                  # 8 prompts × 4, ≤ 64 new tokens, T = 1, bf16; 2 + 8 calls each
    python bench/generation_server.py --reps 1 --warmup 0 --max-new-tokens 8   # smoke test

- "in-process": what an online run samples with by default — `PolicySampler` (a bf16 copy of
  the policy, transformers' `model.generate` with KV cache, one batch of all rows, each prompt
  prefilled once for its samples, inverse-CDF draws).
- "vLLM server": `VLLMSampler.generate`, what `--generation-server` sends to vLLM — one request
  per prompt (token ids, `n` samples, seed, log-probs of the sampled tokens), all in flight at
  once — against vLLM's CPU build (`.venv-vllm`, `bash scripts/setup.sh test`) started here on
  the same model in bf16, its weights handed over once by the sampler's own hand-off first.

Protocol (bench/common.py): the same prompts and sampling settings, seed r for call r on both
sides; calls alternate (in-process, server, in-process, ...) so a neighbour's load hits both
alike; `--warmup` calls of each dropped; medians and fastest calls reported. Tokens counted
are sampled response tokens up to and including the end-of-turn token. The two sides draw
with their own generators, so they sample different responses: compare tokens/s, and the
tokens per call say whether the lengths were alike. The server is a separate process: while
one side runs the other idles (the vLLM engine waits on its queue).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from common import format_machine, load_average, machine_info, stopwatch  # bench/common.py

from rlhfkit.data.schemas import as_conversation
from rlhfkit.models.loading import load_model, load_tokenizer, resolve_model_path
from rlhfkit.rollout.generate import PolicySampler, SamplingConfig
from rlhfkit.rollout.prompts import DEMO_FAMILIES
from rlhfkit.rollout.remote import connect
from rlhfkit.tasks.generate import make_tasks

ROOT = Path(__file__).resolve().parents[1]


def start_server(python: Path, model: str, port: int, log_file: Path, *, kv_gib: int,
                 eager: bool) -> subprocess.Popen:
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "1024", "--seed", "0"]
    if eager:
        cmd.append("--enforce-eager")
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            sys.exit(f"the vLLM server exited at start: {log_file.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                print(f"vLLM server up in {time.monotonic() - start:.0f} s", flush=True)
                return proc
        except httpx.TransportError:
            time.sleep(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kv-gib", type=int, default=2, help="vLLM's CPU key/value cache (VLLM_CPU_KVCACHE_SPACE)")
    ap.add_argument("--compile", action="store_true", help="let vLLM compile its model (default: --enforce-eager)")
    ap.add_argument("--vllm-python", default=os.environ.get("RLHFKIT_VLLM_PYTHON") or ROOT / ".venv-vllm/bin/python")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(format_machine(machine_info()), flush=True)
    tok = load_tokenizer(args.model)
    model = load_model(args.model).eval()
    tasks = make_tasks("train", -(-args.prompts // len(DEMO_FAMILIES)), seed=0, families=DEMO_FAMILIES)
    prompts = [as_conversation(t.prompt) for t in tasks[:args.prompts]]
    local = PolicySampler(model, torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        proc = start_server(Path(args.vllm_python), resolve_model_path(args.model), port,
                            Path(tmp) / "server.log", kv_gib=args.kv_gib, eager=not args.compile)
        try:
            server = connect(model, tok, f"http://127.0.0.1:{port}", Path(tmp) / "weights")
            with stopwatch() as t:
                server.hand_off()
            print(f"hand-off (save, reload, probe): {t[0]:.2f} s, probe gap {server.handoff_gap:.3f} nats/token",
                  flush=True)
            local.sync()
            sides = {"in-process": local, "vLLM server": server}
            tokens: dict[str, list[int]] = {k: [] for k in sides}
            wall: dict[str, list[float]] = {k: [] for k in sides}
            for rep in range(args.warmup + args.reps):
                cfg = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     n=args.group, batch_size=args.prompts * args.group, seed=rep)
                for name, sampler in sides.items():
                    with stopwatch() as t:
                        gens = sampler.generate(tok, prompts, cfg)
                    tokens[name].append(sum(len(g.response_ids) for g in gens))
                    wall[name].append(t[0])
                print(f"  call {rep}{' (warmup)' if rep < args.warmup else ''}: " + ", ".join(
                    f"{k} {tokens[k][-1]} tok {wall[k][-1]:.2f} s" for k in sides) + f"  (load {load_average()})",
                    flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    print(f"\n## {args.prompts} prompts × {args.group} samples, ≤ {args.max_new_tokens} new tokens, "
          f"T = {args.temperature}, bf16; vLLM {'compiled' if args.compile else 'eager'}; "
          f"{args.reps} calls each after {args.warmup} warmup")
    rates = {}
    for name in tokens:
        w, n = wall[name][args.warmup:], tokens[name][args.warmup:]
        rates[name] = [a / b for a, b in zip(n, w)]
        print(f"{name:12} {statistics.median(n):6.0f} tokens/call  {statistics.median(w):6.2f} s/call "
              f"[{min(w):.2f} – {max(w):.2f}]  {statistics.median(rates[name]):7.1f} tokens/s (median)  "
              f"{max(rates[name]):7.1f} (fastest)")
    print(f"ratio        vLLM server / in-process tokens/s: "
          f"{statistics.median(rates['vLLM server']) / statistics.median(rates['in-process']):.2f}× (medians), "
          f"{max(rates['vLLM server']) / max(rates['in-process']):.2f}× (fastest calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
