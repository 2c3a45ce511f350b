"""Timing helpers shared by the `bench/` scripts (rlhfkit vs TRL, side by side in one process).

Every benchmark here follows the same protocol, so their numbers compare:

1. both sides get the same model (fresh weights each), the same batch, the same precision
   and optimizer settings, and the same number of torch threads;
2. steps are *interleaved* (ours, theirs, ours, theirs, ...), so a neighbour's load on a
   shared machine hits both sides alike;
3. the first `warmup` steps of each side are dropped (allocator, kernel selection, lazy
   init), and the *median* of the timed steps is reported, with min and max beside it;
4. throughput counts real (non-pad) tokens only: padding a side chooses to compute is its
   cost, not extra work done;
5. beside the time, each step's peak memory is measured (`PeakMemory`: what the step adds to
   what the process held when it began) and the table shows each side's largest timed one.

Timings are wall-clock seconds of a full optimizer step (forward + backward + optimizer).
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import threading
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


class PeakMemory:
    """The memory one step adds, at its peak, to what the process held when the step began.

    One meter per process, used by every side in turn (`start()` before a step, `stop()` after it):

    - GPU: `torch.cuda.max_memory_allocated()` (peak stats reset at `start`) minus
      `memory_allocated()` at `start`: the step's activations, gradients and temporaries; the
      weights and optimizer state kept between steps are not counted.
    - CPU: a background thread samples, every `interval` seconds while a step runs,
      (a) the bytes glibc's allocator has handed out and not taken back (`mallinfo2()`:
      `uordblks + hblkhd`, all arenas; torch's CPU tensors come from it) and (b) the process
      RSS (`/proc/self/statm`, or psutil where there is no /proc). `stop()` returns
      (max (a) − (a) at `start`, max RSS − RSS at `start`); for the RSS peak the kernel's own
      high-water mark (VmHWM, reset at `start` through /proc/self/clear_refs) counts too.
      (a) is the figure the tables show: RSS undercounts a step that reuses memory the
      allocator kept from an earlier step, of its own side or another's, so with interleaved
      sides it depends on the order they run in; (a) does not. Both miss a peak that lasts
      less than `interval`. Without glibc (another allocator or OS) only (b) is available.

    The sampler keeps its own cost under 1 % of the step: `mallinfo2` walks every arena's free
    lists under the arena locks, ≈ 30 µs on a fresh process but 2.4–5 ms on the multi-GB,
    fragmented heap of a GRPO run, so after each call the thread sleeps `interval` or 100× that
    call's duration, whichever is longer. (Sampling every 5 ms regardless, as sessions 12–13
    did, held the allocator's locks half the time and slowed the measured GRPO steps from 19.5
    to 30.1 s, growing through a run: bench/RESULTS.md, session 14.) A peak shorter than the
    sleep can be missed by (a); the RSS high-water mark (b) misses none.
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.005):
        self.cuda = torch.device(device).type == "cuda"
        self.interval = interval
        self._libc = _glibc() if not self.cuda else None
        self._active, self._idle = threading.Event(), threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._start = self._peak = (0, 0)

    def _heap(self) -> int:
        if self._libc is None:
            return 0
        info = self._libc.mallinfo2()
        return info.uordblks + info.hblkhd

    def _sample(self) -> None:
        heap, rss = self._heap(), _rss_bytes()
        self._peak = (max(self._peak[0], heap), max(self._peak[1], rss))

    def _loop(self) -> None:
        while True:
            self._active.wait()
            while self._active.is_set():
                began = time.perf_counter()
                self._sample()
                time.sleep(max(self.interval, 100 * (time.perf_counter() - began)))
            self._idle.set()

    def start(self) -> None:
        if self.cuda:
            synchronize("cuda")
            torch.cuda.reset_peak_memory_stats()
            self._start = (torch.cuda.memory_allocated(), 0)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)
            self._thread.start()
        _reset_rss_high_water()
        self._start = self._peak = (self._heap(), _rss_bytes())
        self._idle.clear()
        self._active.set()

    def stop(self) -> tuple[float, float | None]:
        """(peak increase in MiB: heap on CPU, allocated on GPU; RSS increase in MiB, None on GPU)."""
        if self.cuda:
            synchronize("cuda")
            return (torch.cuda.max_memory_allocated() - self._start[0]) / 2**20, None
        self._active.clear()
        self._idle.wait()
        self._sample()
        rss_peak = max(self._peak[1], _rss_high_water())
        heap = (self._peak[0] - self._start[0]) / 2**20 if self._libc is not None else None
        rss = (rss_peak - self._start[1]) / 2**20
        return (heap if heap is not None else rss), rss


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    """glibc with `mallinfo2` (2.33+), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.mallinfo2()
    except (OSError, AttributeError):
        return None
    return libc


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def _reset_rss_high_water() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS (Linux ≥ 4.0)
    except OSError:
        pass


def _rss_high_water() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class StepTimes:
    """Wall-clock seconds of one side's optimizer steps, warmup steps included (and skipped),
    with each step's peak memory increase (`PeakMemory.stop()`) where it was measured."""

    name: str
    tokens_per_step: int  # real (non-pad) tokens in one step's batch
    warmup: int
    seconds: list[float] = field(default_factory=list)
    memory: list[tuple[float, float | None] | None] = field(default_factory=list)

    def add(self, seconds: float, memory: tuple[float, float | None] | None = None) -> None:
        self.seconds.append(seconds)
        self.memory.append(memory)

    @property
    def timed(self) -> list[float]:
        return self.seconds[self.warmup:]

    @property
    def peak_mib(self) -> float | None:
        """The largest peak increase (MiB) of the timed steps; None when none was measured."""
        peaks = [m[0] for m in self.memory[self.warmup:] if m is not None]
        return max(peaks) if peaks else None

    @property
    def peak_rss_mib(self) -> float | None:
        peaks = [m[1] for m in self.memory[self.warmup:] if m is not None and m[1] is not None]
        return max(peaks) if peaks else None

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


@contextmanager
def measured(times: StepTimes, meter: PeakMemory | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """`with measured(times[name], meter, dev): step()` adds the step's seconds and peak memory."""
    if meter is not None:
        meter.start()
    with stopwatch(device) as t:
        yield
    times.add(t[0], meter.stop() if meter is not None else None)


def run_interleaved(steps: dict[str, Callable[[], None]], times: dict[str, StepTimes],
                    rounds: int, device: torch.device | str = "cpu", meter: PeakMemory | None = None) -> None:
    """Call each step function once per round, in turn, timing each into `times[name]`."""
    for _ in range(rounds):
        for name, step in steps.items():
            with measured(times[name], meter, device):
                step()


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

def format_table(rows: list[StepTimes], *, baseline: str | list[str], flops_per_token: float | None = None,
                 peak: float | None = None) -> str:
    """One line per side: tokens/step, median s/step [min–max], tokens/s, its ratio to each
    `baseline` side, and the peak memory increase of its timed steps (`PeakMemory`), when measured.

    With `flops_per_token` and `peak`, an MFU column (model FLOPs utilization) is added.
    """
    baselines = [baseline] if isinstance(baseline, str) else list(baseline)
    bases = [next(r for r in rows if r.name == b) for b in baselines]
    width = max(len(r.name) for r in rows)
    ratio_heads = [f"vs {b}" for b in baselines]
    head = f"{'':{width}}  tokens/step  s/step (median)  [min – max]      tokens/s   " + "   ".join(ratio_heads)
    mfu = bool(flops_per_token and peak)
    memory = any(r.peak_mib is not None for r in rows)
    head += "    MFU" * mfu + "   peak MiB" * memory
    lines = [head]
    for r in rows:
        line = (f"{r.name:{width}}  {r.tokens_per_step:11d}  {r.median_s:15.3f}  "
                f"[{min(r.timed):.3f} – {max(r.timed):.3f}]  {r.tokens_per_s:9.1f}   ")
        line += "   ".join(f"{f'{r.tokens_per_s / b.tokens_per_s:.2f}×':>{len(h)}}" for b, h in zip(bases, ratio_heads,
                                                                                                strict=True))
        if mfu:
            line += f"  {r.tokens_per_s * flops_per_token / peak:6.1%}"
        if memory:
            line += f"  {r.peak_mib:9.0f}" if r.peak_mib is not None else f"  {'n/a':>9}"
        lines.append(line)
    lines.append(f"(medians of {len(bases[0].timed)} timed steps after {bases[0].warmup} warmup steps, "
                 "steps interleaved between the sides" + ("; peak MiB: the largest memory increase of a timed step "
                                                         "over the memory at its start, see PeakMemory)" if memory
                                                         else ")"))
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


def agreement_line(name: str, ours: float, theirs: float, *, width: int = 15, tol: float = 1e-3,
                   against: str = "ours − TRL") -> str:
    """'name  0.693147   |ours − TRL| = 1.2e-05  within 1e-3' (or 'DIFFERS by more than 1e-3')."""
    diff = abs(ours - theirs)
    tol_text = f"{tol:.0e}".replace("e-0", "e-")  # 1e-3, not 0.001
    verdict = f"within {tol_text}" if diff <= tol else f"DIFFERS by more than {tol_text}"
    return f"{name:{width}} {ours:.6f}   |{against}| = {diff:.2e}  {verdict}"


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
