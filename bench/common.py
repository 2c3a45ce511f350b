"""Timing helpers shared by the `bench/` scripts (rlhfkit vs TRL, side by side in one process).

Every benchmark here follows the same protocol, so their numbers compare:

1. both sides get the same model (fresh weights each), the same batch, the same precision
   and optimizer settings, and the same number of torch threads;
2. steps are *interleaved* (ours, theirs, ours, theirs, ...), so a neighbour's load on a
   shared machine hits both sides alike;
3. the first `warmup` steps of each side are dropped (allocator, kernel selection, lazy
   init), and the *median* of the timed steps is reported, with min and max beside it;
4. throughput counts real (non-pad) tokens only: padding a side chooses to compute is its
   cost, not extra work done.

Timings are wall-clock seconds of a full optimizer step (forward + backward + optimizer).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata

import torch

# Peak dense bf16 tensor throughput, FLOP/s, for the accelerators model FLOPs utilization is
# quoted against (BENCHMARKS.md uses the H100/H200 SXM figure for both).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


# ------------------------------------------------------------------------------ measuring

def synchronize(device: torch.device | str) -> None:
    """Wait for queued accelerator work, so a wall-clock reading covers it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def stopwatch(device: torch.device | str = "cpu") -> Iterator[list[float]]:
    """`with stopwatch(dev) as t: ...` leaves the elapsed seconds in t[0]."""
    out: list[float] = []
    synchronize(device)
    start = time.perf_counter()
    try:
        yield out
    finally:
        synchronize(device)
        out.append(time.perf_counter() - start)


@dataclass
class StepTimes:
    """Wall-clock seconds of one side's optimizer steps, warmup steps included (and skipped)."""

    name: str
    tokens_per_step: int  # real (non-pad) tokens in one step's batch
    warmup: int
    seconds: list[float] = field(default_factory=list)

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    @property
    def timed(self) -> list[float]:
        return self.seconds[self.warmup:]

    @property
    def median_s(self) -> float:
        if not self.timed:
            raise ValueError(f"{self.name}: no timed steps after {self.warmup} warmup steps")
        return statistics.median(self.timed)

    @property
    def min_s(self) -> float:
        return min(self.timed)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.median_s

    @property
    def spread(self) -> float:
        """Median / fastest timed step: near 1 on a quiet machine, whatever a single outlier does."""
        return self.median_s / self.min_s


def run_interleaved(steps: dict[str, Callable[[], None]], times: dict[str, StepTimes],
                    rounds: int, device: torch.device | str = "cpu") -> None:
    """Call each step function once per round, in turn, timing each into `times[name]`."""
    for _ in range(rounds):
        for name, step in steps.items():
            with stopwatch(device) as t:
                step()
            times[name].add(t[0])


def model_flops_per_token(num_params: int, *, reference_pass: bool = False) -> float:
    """6N per trained token (forward 2N + backward 4N); +2N when a frozen reference runs too."""
    return (8 if reference_pass else 6) * num_params


def peak_flops(device: torch.device | str) -> float | None:
    """Dense bf16 peak of the current GPU, when it is one we list; None on CPU or unknown cards."""
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ------------------------------------------------------------------------------ reporting

def format_table(rows: list[StepTimes], *, baseline: str, flops_per_token: float | None = None,
                 peak: float | None = None) -> str:
    """One line per side: tokens/step, median s/step [min–max], tokens/s, ratio to `baseline`.

    With `flops_per_token` and `peak`, an MFU column (model FLOPs utilization) is added.
    """
    base = next(r for r in rows if r.name == baseline)
    width = max(len(r.name) for r in rows)
    head = (f"{'':{width}}  tokens/step  s/step (median)  [min – max]      tokens/s   vs {baseline}")
    if flops_per_token and peak:
        head += "    MFU"
    lines = [head]
    for r in rows:
        line = (f"{r.name:{width}}  {r.tokens_per_step:11d}  {r.median_s:15.3f}  "
                f"[{min(r.timed):.3f} – {max(r.timed):.3f}]  {r.tokens_per_s:9.1f}   "
                f"{r.tokens_per_s / base.tokens_per_s:5.2f}×")
        if flops_per_token and peak:
            line += f"  {r.tokens_per_s * flops_per_token / peak:6.1%}"
        lines.append(line)
    lines.append(f"(medians of {len(base.timed)} timed steps after {base.warmup} warmup steps, "
                 "steps interleaved between the sides)")
    return "\n".join(lines)


def ratio_lines(ours: StepTimes, theirs: StepTimes, *, target: float | None = None,
                noisy_spread: float = 1.1) -> str:
    """The speed-up of `ours` over `theirs` from medians and from the fastest steps.

    On a shared machine a neighbour can slow any step several-fold (time stolen by the host
    shows up in no load average); the fastest steps are then the better estimate of the
    uncontended speed, and a warning says the medians are suspect.
    """
    by_median = ours.tokens_per_s / theirs.tokens_per_s
    by_min = theirs.min_s / ours.min_s
    line = f"ratio         {ours.name} / {theirs.name} tokens/s: {by_median:.2f}× (medians)"
    if target is not None:
        line += f", target ≥ {target:g}×"
    line += f"; {by_min:.2f}× (fastest steps)"
    noisy = [r.name for r in (ours, theirs) if r.spread > noisy_spread]
    if noisy:
        line += (f"\nWARNING       median step > {noisy_spread} × fastest step for {', '.join(noisy)}: the "
                 "machine was contended during the run; rerun when it is quiet")
    return line


def agreement_line(name: str, ours: float, theirs: float, *, width: int = 15, tol: float = 1e-3) -> str:
    """'name  0.693147   |ours − TRL| = 1.2e-05  within 1e-3' (or 'DIFFERS by more than 1e-3')."""
    diff = abs(ours - theirs)
    tol_text = f"{tol:.0e}".replace("e-0", "e-")  # 1e-3, not 0.001
    verdict = f"within {tol_text}" if diff <= tol else f"DIFFERS by more than {tol_text}"
    return f"{name:{width}} {ours:.6f}   |ours − TRL| = {diff:.2e}  {verdict}"


def agreement_lines(ours: dict[str, float], trl_name: str, trl_value: float, *, width: int | None = None,
                    tol: float = 1e-3) -> str:
    """An `agreement_line` per side of ours against TRL's value, then TRL's own line."""
    width = width or max(len(name) for name in (*ours, trl_name))
    lines = [agreement_line(name, value, trl_value, width=width, tol=tol) for name, value in ours.items()]
    return "\n".join([*lines, f"{trl_name:{width}} {trl_value:.6f}"])


def load_average() -> str:
    """The 1/5/15-minute load averages, or 'n/a' where the OS has none."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, str]:
    """What a reader needs to judge the numbers: CPU, cores, bf16 support, GPU, versions."""
    from rlhfkit.models.device import cpu_supports_bf16

    flags = _cpu_flags()
    native = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    info = {
        "cpu": _cpu_model(),
        "cores": f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} usable, "
                 f"torch threads {torch.get_num_threads()}",
        "cpu bf16": f"{'yes' if cpu_supports_bf16() else 'no'} ({', '.join(native) or 'no native bf16 flags'})",
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
    }
    for package in ("torch", "transformers", "accelerate", "trl"):
        info[package] = _version(package)
    info["load average"] = load_average()
    return info


def format_machine(info: dict[str, str]) -> str:
    width = max(len(k) for k in info)
    return "\n".join(f"{k:{width}}  {v}" for k, v in info.items())
