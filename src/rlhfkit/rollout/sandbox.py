"""Run untrusted Python (model-written code) in a separate, locked-down process.

`run_python(code)` starts a fresh interpreter (`python -I -S`, so no user site, no
site-packages, no PYTHON* variables) that runs *this file* as a bootstrap: it locks itself
down, then executes `code`. The bootstrap, not a `preexec_fn`, does the locking down,
because `preexec_fn` may deadlock in a parent with threads (a trainer always has some).

Layers, and where each holds (`SandboxResult.isolation` names the ones that held for a run):

- `rlimits` (always, required): RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE,
  RLIMIT_NPROC (fork bombs), no core files.
- `fresh-uid` (parent is root; required there): the code runs as a uid/gid drawn at random
  for this run and used by nothing else. It cannot write root's or anyone's files nor signal
  other processes; RLIMIT_NPROC (not enforced for root) counts only its own processes; and
  every process it leaves behind is found and killed by that uid.
- `netns` (root, or an ordinary user where the kernel allows user namespaces): a new, empty
  network namespace; not even loopback is up, so no connection leaves or arrives.
- `readonly-fs` (same as `netns`): a private mount namespace in which every mount is
  remounted read-only (/tmp, /dev/shm, the repo, HOME, ...).
- `tmpfs-workdir` (same as `netns`): the work dir is a fresh tmpfs of `disk_mb`, the only
  writable place.
- `no-new-privs` (always): setuid binaries cannot raise privileges.
- `audit-hook` (`audit_hook=True`, the default): an in-process second layer that rejects
  `socket.*`, writes/renames/removals outside the work dir, process creation (unless
  `allow_subprocess`), signals to other processes, and `ctypes`.

The audit hook is defense in depth, not a boundary: Python code can get around it (e.g.
through a C extension). The kernel layers are the boundary. Run as root (or where user
namespaces are allowed) for them all; as an ordinary user without user namespaces only
`rlimits`, `no-new-privs` and the audit hook remain, and the code can then read (not write,
the hook permitting) whatever that user can read.

The parent always kills the whole process group on timeout and, after every run, every
straggler: by uid under `fresh-uid`, else by session/process group (a process that called
`setsid` itself can escape that sweep; the audit hook forbids creating processes by default).
The temp dir is removed afterwards.

Linux only (namespaces, prctl, /proc). Only the standard library is imported here: this
file is also the child's `__main__`.
"""

from __future__ import annotations

import ctypes
import grp
import json
import linecache
import logging
import math
import os
import pwd
import random
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The child writes one JSON status line to this fd before running the code; the code may
# then write its own report there (CodeExecutionReward's harness does), kept apart from
# stdout so a flood of prints cannot push the results out of the truncated output.
REPORT_FD = 3

# Exit code the bootstrap uses when it could not lock itself down (never the code's own).
_SETUP_FAILED = 125

_KILL_REASONS = {
    signal.SIGXCPU: "cpu_time",
    signal.SIGXFSZ: "file_size",
}


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did."""

    ok: bool                          # exited by itself with code 0, within every limit
    returncode: int | None            # exit code; -N when ended by signal N
    stdout: str                       # first `max_output_bytes` of stdout (bad utf-8 replaced)
    stderr: str                       # first `max_output_bytes` of stderr
    timed_out: bool                   # the wall-clock limit ran out and the sandbox killed it
    killed_reason: str | None         # "timeout", "cpu_time", "signal SIGKILL", ...; None
                                      # when it exited by itself (MemoryError included)
    duration_s: float                 # wall-clock seconds from start to exit
    report: str = ""                  # what the code wrote to fd 3 (REPORT_FD)
    output_truncated: bool = False    # some stdout/stderr/report bytes were dropped
    isolation: tuple[str, ...] = ()   # the layers that held for this run (see module docstring)


class SandboxSetupError(RuntimeError):
    """The sandbox could not be set up (not the code's fault): never scored as a failure."""


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    cpu_s: int | None = None,
    max_output_bytes: int = 64 * 1024,
    max_processes: int = 32,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    disk_mb: int = 64,
    allow_subprocess: bool = False,
    audit_hook: bool = True,
    python: str | None = None,
) -> SandboxResult:
    """Run `code` as `__main__` in a fresh sandboxed interpreter and wait for it.

    timeout_s: wall-clock limit, start-up included; the process group is then killed.
    memory_mb: address-space limit (RLIMIT_AS); exceeding it gives MemoryError.
    cpu_s: CPU-seconds limit (RLIMIT_CPU, ends with SIGXCPU); None: ceil(timeout_s) + 1.
    max_output_bytes: bytes kept of stdout, of stderr and of the fd-3 report, each.
    max_processes: RLIMIT_NPROC (threads count too).
    max_file_mb / max_open_files: RLIMIT_FSIZE / RLIMIT_NOFILE.
    disk_mb: size of the tmpfs work dir (where a mount namespace is available).
    allow_subprocess: let the audit hook allow fork/exec/spawn (rlimits still apply).
    audit_hook: install the in-process second layer (turn off only to test the kernel layers).
    python: interpreter to run; default `sys.executable`. Only its standard library is
      importable in the sandbox.
    """
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb),
                        ("max_output_bytes", max_output_bytes), ("max_processes", max_processes),
                        ("max_file_mb", max_file_mb), ("max_open_files", max_open_files),
                        ("disk_mb", disk_mb)):
        if not value > 0:
            raise ValueError(f"run_python: {name} must be > 0, got {value!r}")
    if cpu_s is None:
        cpu_s = math.ceil(timeout_s) + 1
    if cpu_s <= 0:
        raise ValueError(f"run_python: cpu_s must be > 0, got {cpu_s!r}")

    base = tempfile.mkdtemp(prefix="rlhfkit-sandbox-")
    try:
        return _run_in(base, code, timeout_s=timeout_s, memory_mb=memory_mb, cpu_s=cpu_s,
                       max_output_bytes=max_output_bytes, max_processes=max_processes,
                       max_file_mb=max_file_mb, max_open_files=max_open_files, disk_mb=disk_mb,
                       allow_subprocess=allow_subprocess, audit_hook=audit_hook,
                       python=python or sys.executable)
    finally:
        _remove_tree(base)


# --------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------

def _run_in(base: str, code: str, *, timeout_s: float, memory_mb: int, cpu_s: int,
            max_output_bytes: int, max_processes: int, max_file_mb: int, max_open_files: int,
            disk_mb: int, allow_subprocess: bool, audit_hook: bool, python: str) -> SandboxResult:
    # base (root-only but traversable) holds the code; base/work is the code's only
    # writable place and its HOME, owned by the sandbox identity.
    workdir = os.path.join(base, "work")
    os.mkdir(workdir, 0o700)
    identity = _fresh_identity() if os.geteuid() == 0 else None
    if identity is not None:
        os.chown(workdir, *identity)
        os.chmod(base, 0o711)
    code_path = os.path.join(base, "main.py")
    with open(os.open(code_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w",
              encoding="utf-8") as f:
        f.write(code)

    report_r, report_w = os.pipe()
    config = {
        "code_path": code_path, "workdir": workdir, "report_fd": report_w,
        "parent_pid": os.getpid(),
        "uid": identity[0] if identity else None, "gid": identity[1] if identity else None,
        "memory_mb": memory_mb, "cpu_s": cpu_s, "max_processes": max_processes,
        "max_file_mb": max_file_mb, "max_open_files": max_open_files, "disk_mb": disk_mb,
        "allow_subprocess": allow_subprocess, "audit_hook": audit_hook,
    }
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [python, "-I", "-S", os.path.abspath(__file__), json.dumps(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=base, env=env, start_new_session=True, pass_fds=(report_w,))
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    uid = identity[0] if identity else None
    try:
        streams, truncated, timed_out, duration = _collect(
            proc, report_r, start=start, timeout_s=timeout_s, cap=max_output_bytes, uid=uid)
    finally:
        _kill_everything(proc.pid, uid)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(report_r)
        proc.stdout.close()
        proc.stderr.close()
        _kill_everything(proc.pid, uid)

    status_line, _, report = streams["report"].partition(b"\n")
    stdout = streams["stdout"].decode("utf-8", "replace")
    stderr = streams["stderr"].decode("utf-8", "replace")
    try:
        status = json.loads(status_line) if status_line else {}
    except ValueError:
        status = {}
    if proc.returncode == _SETUP_FAILED and "error" in status:
        raise SandboxSetupError(f"the sandbox could not be set up: {status['error']}")
    if "isolation" not in status and not timed_out:
        raise SandboxSetupError(
            f"the sandbox child exited (code {proc.returncode}) before locking down; "
            f"stderr: {stderr[-2000:]}")
    isolation = tuple(status.get("isolation", ()))
    _warn_once_if_weak(isolation)

    rc = proc.returncode
    if timed_out:
        killed_reason = "timeout"
    elif rc is not None and rc < 0:
        sig = -rc
        killed_reason = _KILL_REASONS.get(sig) or f"signal {_signal_name(sig)}"
    else:
        killed_reason = None
    return SandboxResult(
        ok=(rc == 0 and not timed_out), returncode=rc, stdout=stdout, stderr=stderr,
        timed_out=timed_out, killed_reason=killed_reason, duration_s=duration,
        report=report.decode("utf-8", "replace"), output_truncated=truncated,
        isolation=isolation)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _collect(proc: subprocess.Popen, report_r: int, *, start: float, timeout_s: float, cap: int,
             uid: int | None) -> tuple[dict[str, bytes], bool, bool, float]:
    """Read stdout, stderr and the report pipe until all close or the deadline passes.

    Bytes beyond `cap` per stream are read and dropped (never buffered) so a chatty child
    neither blocks on a full pipe nor fills the parent's memory.
    """
    assert proc.stdout is not None and proc.stderr is not None
    names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", report_r: "report"}
    # The status line comes before the code's own report and must survive the cap.
    caps = {"stdout": cap, "stderr": cap, "report": cap + 64 * 1024}
    buffers = {name: bytearray() for name in names.values()}
    truncated = False
    timed_out = False
    exited_at: float | None = None
    deadline = start + timeout_s
    grace_deadline: float | None = None
    selector = selectors.DefaultSelector()
    for fd in names:
        selector.register(fd, selectors.EVENT_READ)
    try:
        while selector.get_map():
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                # Whatever the code left behind still holds the pipes open: end it now
                # rather than waiting for the deadline.
                _kill_everything(proc.pid, uid)
                grace_deadline = now + 1.0
            if exited_at is None and now >= deadline:
                timed_out = True
                _kill_everything(proc.pid, uid)
                proc.kill()
                proc.wait()
                exited_at = time.monotonic()
                grace_deadline = exited_at + 1.0
            if grace_deadline is not None and now >= grace_deadline:
                # Something outside our reach still holds a pipe (only possible without
                # `fresh-uid`); stop reading rather than hang.
                logger.warning("sandbox: output pipes still open 1 s after exit; giving up on them")
                break
            wait = 0.05 if exited_at is None else 0.01
            for key, _ in selector.select(timeout=wait):
                fd = key.fd
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(fd)
                    continue
                buf = buffers[names[fd]]
                room = caps[names[fd]] - len(buf)
                if room > 0:
                    buf += chunk[:room]
                if len(chunk) > max(room, 0):
                    truncated = True
    finally:
        selector.close()
    if exited_at is None:
        proc.wait()
        exited_at = time.monotonic()
    return {k: bytes(v) for k, v in buffers.items()}, truncated, timed_out, exited_at - start


def _kill_everything(pgid: int, uid: int | None) -> None:
    """SIGKILL the sandbox's process group and every other process it left behind."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(200):
        stragglers = _stragglers(pgid, uid)
        if not stragglers:
            return
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.002)
    logger.warning("sandbox: processes still alive after repeated SIGKILL: %s", stragglers)


def _stragglers(pgid: int, uid: int | None) -> list[int]:
    """Live (non-zombie) processes of the run: by uid when it has its own, else by group/session."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
            if state in (b"Z", b"X"):
                continue
            if uid is None:
                if pgrp == pgid or session == pgid:
                    found.append(int(entry))
            elif _real_uid(entry) == uid:
                found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return found


def _real_uid(pid: str) -> int | None:
    # Not os.stat(/proc/pid).st_uid: a process that dropped root is non-dumpable, and
    # its /proc entries then belong to root.
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Uid:"):
                return int(line.split()[1])
    return None


def _fresh_identity() -> tuple[int, int]:
    """A uid/gid pair no account uses, so this run's processes and files are its alone."""
    rng = random.SystemRandom()
    while True:
        uid = rng.randrange(1 << 30, (1 << 31) - 2)
        try:
            pwd.getpwuid(uid)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(uid)
            continue
        except KeyError:
            return uid, uid


def _remove_tree(path: str) -> None:
    def retry_writable(func, p, _exc):
        # The code may have chmod'ed its own dirs to 0 (without fresh-uid, as the same user).
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=retry_writable)


_warned_weak = False


def _warn_once_if_weak(isolation: tuple[str, ...]) -> None:
    global _warned_weak
    missing = [layer for layer in ("netns", "readonly-fs") if layer not in isolation]
    if missing and not _warned_weak:
        _warned_weak = True
        logger.warning("sandbox: running without %s (only %s hold here); see "
                       "rlhfkit.rollout.sandbox for what that leaves open",
                       ", ".join(missing), ", ".join(isolation))


# --------------------------------------------------------------------------------------
# Child side: runs as __main__ of `python -I -S sandbox.py CONFIG`
# --------------------------------------------------------------------------------------

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME, _MS_STRICTATIME = 16384, 1 << 18, 1 << 21, 1 << 24
# Per-mount flags that must be kept on a remount (the kernel refuses to clear them inside
# a user namespace, and keeping them is what we want anyway).
_KEPT_MOUNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                     "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME,
                     "relatime": _MS_RELATIME, "strictatime": _MS_STRICTATIME}
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38


def _child_main(config_json: str) -> None:
    # Everything the child uses is imported at the top of this file, before the lock-down,
    # while the whole standard library is reachable.
    cfg = json.loads(config_json)
    if cfg["report_fd"] != REPORT_FD:
        os.dup2(cfg["report_fd"], REPORT_FD, inheritable=False)
        os.close(cfg["report_fd"])
    try:
        code, isolation = _lock_down(cfg)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        _write_report_line({"error": f"{type(exc).__name__}: {exc}"})
        os._exit(_SETUP_FAILED)
    _write_report_line({"isolation": isolation})
    if cfg["audit_hook"]:
        _install_audit_hook(cfg["workdir"], allow_subprocess=cfg["allow_subprocess"])
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    # Source lines for tracebacks: the code is not on any path the child can read.
    linecache.cache["main.py"] = (len(code), None, code.splitlines(True), "main.py")
    try:
        exec(compile(code, "main.py", "exec"), namespace)  # noqa: S102 - this is the sandbox
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - printed like the interpreter would
        # Leave this bootstrap's own frame out of the traceback the code's author reads.
        traceback.print_exception(type(exc), exc, exc.__traceback__.tb_next)
        sys.stderr.flush()
        raise SystemExit(1) from None


def _write_report_line(obj: dict) -> None:
    os.write(REPORT_FD, (json.dumps(obj) + "\n").encode())


def _lock_down(cfg: dict) -> tuple[str, list[str]]:
    """Apply every layer that this machine permits; returns the code and the layers that held."""
    libc = ctypes.CDLL(None, use_errno=True)
    isolation: list[str] = []
    with open(cfg["code_path"], encoding="utf-8") as f:
        code = f.read()
    sys.dont_write_bytecode = True
    workdir, uid, gid = cfg["workdir"], cfg["uid"], cfg["gid"]
    as_root = os.geteuid() == 0
    if as_root and uid is None:
        raise RuntimeError("running as root without a sandbox identity")

    # 1. Namespaces: a fresh network stack and a private mount table.
    in_userns = False
    if as_root:
        namespaces = _unshare_first(libc, (_CLONE_NEWNS | _CLONE_NEWNET, _CLONE_NEWNET,
                                           _CLONE_NEWNS))
    else:
        my_uid, my_gid = os.getuid(), os.getgid()
        namespaces = _unshare_first(libc, (_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET,
                                           _CLONE_NEWUSER | _CLONE_NEWNET))
        if namespaces:
            in_userns = True
            # Map our own ids only: without a mapping, creating files fails with EOVERFLOW.
            _write_file("/proc/self/setgroups", "deny")
            _write_file("/proc/self/uid_map", f"{my_uid} {my_uid} 1")
            _write_file("/proc/self/gid_map", f"{my_gid} {my_gid} 1")
    if namespaces & _CLONE_NEWNET:
        isolation.append("netns")

    # 2. Read-only view of every mount, and a private size-limited tmpfs as the work dir.
    if namespaces & _CLONE_NEWNS:
        owner = (uid, gid) if as_root else (os.getuid(), os.getgid())
        read_only, tmpfs = _read_only_view(libc, workdir, disk_mb=cfg["disk_mb"], owner=owner)
        isolation += ["readonly-fs"] * read_only + ["tmpfs-workdir"] * tmpfs

    # 3. Keep a handle on the standard library: after dropping to the fresh uid its path may
    # run through a directory only root may enter (e.g. pyenv under /root).
    stdlib_fd = None
    if as_root:
        stdlib_fd = os.open(sys.base_prefix, os.O_RDONLY | os.O_DIRECTORY)

    # 4. Resource limits, set while still allowed to lower hard limits too.
    mb = 1024 * 1024
    limits = {
        resource.RLIMIT_AS: cfg["memory_mb"] * mb,
        resource.RLIMIT_CPU: (cfg["cpu_s"], cfg["cpu_s"] + 1),
        resource.RLIMIT_FSIZE: cfg["max_file_mb"] * mb,
        resource.RLIMIT_NOFILE: cfg["max_open_files"],
        resource.RLIMIT_NPROC: cfg["max_processes"],
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        soft, hard = value if isinstance(value, tuple) else (value, value)
        resource.setrlimit(which, (soft, hard))
    # Over-size writes then fail with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    isolation.append("rlimits")

    # 5. Drop root for the fresh identity (clears every capability).
    if as_root:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("could not drop privileges")
        isolation.append("fresh-uid")
    elif in_userns:
        _drop_capabilities(libc)

    # 6. No privilege gain through exec; die with the parent.
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        isolation.append("no-new-privs")
    # (The signal follows the parent *thread* that started us; run_python waits in that
    # thread until we are gone, so it cannot fire early.)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != cfg["parent_pid"]:
        os._exit(_SETUP_FAILED)  # the parent died before the signal was armed

    os.chdir(workdir)
    if stdlib_fd is not None:
        _reroot_stdlib(f"/proc/self/fd/{stdlib_fd}")
    if cfg["audit_hook"]:
        isolation.append("audit-hook")
    return code, isolation


def _reroot_stdlib(alias: str) -> None:
    """Import the standard library through `alias` (a /proc/self/fd link to sys.base_prefix,
    opened while still root, which reaches it without entering its parent directories)."""
    prefix = sys.base_prefix

    def rerooted(paths: list) -> list:
        return [alias + p[len(prefix):] if isinstance(p, str) and p.startswith(prefix) else p
                for p in paths]

    sys.path[:] = rerooted(sys.path)
    sys.path_importer_cache.clear()
    # Packages imported already (encodings, ...) find their submodules through __path__.
    for module in list(sys.modules.values()):
        path = getattr(module, "__path__", None)
        if isinstance(path, list):
            path[:] = rerooted(path)


def _unshare_first(libc, candidates: tuple[int, ...]) -> int:
    """Try each flag set in turn; the first that the kernel grants (0 if none)."""
    for flags in candidates:
        if libc.unshare(flags) == 0:
            return flags
    return 0


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read_only_view(libc, workdir: str, *, disk_mb: int,
                    owner: tuple[int, int]) -> tuple[bool, bool]:
    """Remount every mount read-only in this (private) mount namespace, then mount a tmpfs
    on the work dir. Returns (every mount is read-only, the tmpfs is mounted)."""
    def mount(source, target, fstype, flags, data) -> bool:
        enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
        return libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0

    # Keep our remounts from propagating back to the parent's namespace.
    if not mount(None, "/", None, _MS_REC | _MS_PRIVATE, None):
        return False, False
    all_held = True
    for mountpoint, options in _mounts():
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        for opt in options:
            flags |= _KEPT_MOUNT_FLAGS.get(opt, 0)
        if not mount(None, mountpoint, None, flags, None):
            all_held = False
    size_opts = f"size={disk_mb}m,mode=0700,uid={owner[0]},gid={owner[1]}"
    tmpfs = mount("tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, size_opts)
    return all_held, tmpfs


def _mounts() -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of every mount visible here, from mountinfo."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            # Octal escapes (\040 for a space) in paths.
            mountpoint = fields[4].encode("utf-8", "surrogateescape").decode("unicode_escape")
            out.append((mountpoint, fields[5].split(",")))
    return out


def _drop_capabilities(libc) -> None:
    """Clear every capability (inside a user namespace we would otherwise hold them all)."""
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    header = Header(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (Data * 2)()
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


def _install_audit_hook(workdir: str, *, allow_subprocess: bool) -> None:
    """Second layer: refuse sockets, writes outside `workdir`, new processes, ctypes."""
    realpath = os.path.realpath
    fsdecode = os.fsdecode
    getpid = os.getpid
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    allowed_files = ("/dev/null",)
    # event -> positions of the path arguments it writes to
    path_events = {
        "os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1),
        "os.link": (1,), "os.symlink": (1,), "os.chmod": (0,), "os.chown": (0,),
        "os.truncate": (0,), "os.utime": (0,), "os.chflags": (0,), "os.lchflags": (0,),
        "os.mkfifo": (0,), "os.mknod": (0,), "shutil.rmtree": (0,),
    }
    process_events = {"os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn",
                      "os.system", "os.startfile", "subprocess.Popen", "pty.spawn"}

    def inside(path) -> bool:
        if isinstance(path, int):
            return True  # an fd the process already holds
        resolved = realpath(fsdecode(path))
        return (resolved == workdir or resolved.startswith(workdir + "/")
                or resolved in allowed_files)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writes and path is not None and not inside(path):
                raise PermissionError(
                    f"sandbox: writing outside the work dir is not allowed: {path!r}")
        elif event in path_events:
            for i in path_events[event]:
                if i < len(args) and args[i] is not None and not inside(args[i]):
                    raise PermissionError(f"sandbox: {event} outside the work dir is not allowed")
        elif event.startswith("socket."):
            raise PermissionError("sandbox: network access is not allowed")
        elif event in process_events:
            if not allow_subprocess:
                raise PermissionError(f"sandbox: creating processes is not allowed ({event})")
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event != "os.kill" or args[0] != getpid():
                raise PermissionError("sandbox: signalling other processes is not allowed")
        elif event.startswith("ctypes."):
            raise PermissionError("sandbox: ctypes is not allowed")

    sys.addaudithook(hook)


if __name__ == "__main__":
    _child_main(sys.argv[1])
