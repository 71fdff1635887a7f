"""Process lifetime: every process we start dies with its parent, and SIGTERM runs the normal shutdown.

Every starter (the sidecar, the ``--nproc`` launcher's ranks, pipeline stages, math-verify's pool) goes through
this module, which depends on the standard library only, so that its guard process
(``python -m megatron_opsd.lifecycle``) starts in milliseconds and any layer can import it.

- A **guard** is a tiny process that leads a process group and SIGKILLs that whole group once its parent is
  gone: told by the kernel (``prctl(PR_SET_PDEATHSIG)`` on Linux, then a re-check of the parent pid, which may
  have died between ``fork`` and ``prctl``), or, where prctl is missing or the starter is not the main thread
  (the kernel fires PDEATHSIG when the *thread* that forked exits), by polling the parent pid. A group reaches
  every descendant that does not start its own session: a sidecar's vLLM workers, multiprocessing managers and
  resource trackers that libraries (megatron's checkpoint writer) start behind our back.
- ``start_process(cmd)`` runs ``cmd`` under a guard in a new process group; the guard ignores SIGTERM/SIGINT
  (they reach ``cmd`` through the group) and exits with ``cmd``'s code.
- ``stop_process(proc)``: SIGTERM to the group, a grace period, then SIGKILL to whatever of the group is left.
- ``bind_to_parent(pid)`` + ``guard_process_group()`` do the same for processes that Python's multiprocessing
  starts (launcher ranks, pool workers), first thing in the child.
- ``install_shutdown_handlers()``: SIGTERM (what slurm sends at a time limit) raises ``SystemExit`` in the main
  thread, so ``finally`` blocks and context managers stop children and leave checkpoints as they are; further
  SIGTERM/SIGINT during that shutdown are ignored so it is not cut short (SIGKILL still works).

A parent that dies without a shutdown (SIGKILL, OOM killer, segfault) takes its children with SIGKILL: nobody is
left to talk to them, and checkpoints are written atomically, so nothing is lost that a clean stop would keep.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Optional, Sequence

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_POLL_S = 0.5
STOP_GRACE_S = 20.0


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` for the calling process; False where the call does not exist."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _parent_alive(parent_pid: int) -> bool:
    return os.getppid() == parent_pid


def watch_parent(parent_pid: int, on_death: Callable[[], None], poll_s: float = WATCH_POLL_S) -> threading.Thread:
    """A daemon thread that calls ``on_death()`` once this process's parent is no longer ``parent_pid``."""
    def watch() -> None:
        while _parent_alive(parent_pid):
            time.sleep(poll_s)
        on_death()

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def bind_to_parent(parent_pid: int, watch: bool = False, sig: int = signal.SIGKILL) -> None:
    """Make this process die (``sig``) when ``parent_pid`` dies. Call it first thing in a child.

    ``watch=True`` (the parent started us from a thread other than its main thread, whose exit would fire
    PDEATHSIG early) or no prctl: a watchdog thread on the parent pid instead.
    """
    if not watch and set_parent_death_signal(sig):
        if not _parent_alive(parent_pid):  # died before prctl took effect: the kernel will not tell us
            os.kill(os.getpid(), sig)
        return
    watch_parent(parent_pid, lambda: os.kill(os.getpid(), sig))


def _started_from_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def parent_binding() -> tuple[int, bool]:
    """``(parent_pid, watch)`` for ``bind_to_parent`` in a child that this thread starts now."""
    return os.getpid(), not _started_from_main_thread()


def wrapped_command(cmd: Sequence[str] = ()) -> list[str]:
    """``cmd`` under a guard bound to this process (no ``cmd``: the guard alone, see ``_guard_main``)."""
    pid, watch = parent_binding()
    return [sys.executable, "-m", "megatron_opsd.lifecycle", "--parent-pid", str(pid),
            *(["--watch"] if watch else []), "--", *cmd]


def start_process(cmd: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, ...)`` in a new process group under a guard: the group dies with this process."""
    return subprocess.Popen(wrapped_command(cmd), process_group=0, **popen_kwargs)


def guard_process_group() -> subprocess.Popen:
    """Make this process lead a new process group and start a guard that SIGKILLs the group when this process
    dies, whatever kills it. For processes that multiprocessing starts (launcher ranks): what they start in
    turn, such as megatron's checkpoint-writer manager process, goes with them."""
    if os.getpgid(0) != os.getpid():  # (a session leader already leads its group and may not move)
        os.setpgid(0, 0)
    return subprocess.Popen(wrapped_command())


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_process made the child its group's leader: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> Optional[int]:
    """SIGTERM ``proc``'s process group, wait ``grace_s``, then SIGKILL the group (also members that outlive the
    leader, e.g. workers of a server that exited first). Returns the exit code; calling it again is a no-op (the
    group id could belong to someone else by then)."""
    if getattr(proc, "_group_reaped", False):
        return proc.returncode
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    proc._group_reaped = True
    return proc.returncode


def run_process(cmd: Sequence[str], grace_s: float = STOP_GRACE_S, **popen_kwargs) -> int:
    """Like ``subprocess.run(cmd).returncode``, but through ``start_process``; an exception here (SIGTERM's
    SystemExit, Ctrl-C) stops the child with ``stop_process`` before propagating."""
    proc = start_process(cmd, **popen_kwargs)
    try:
        return proc.wait()
    finally:
        stop_process(proc, grace_s)


_shutting_down = threading.Event()


def _on_shutdown_signal(signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if _shutting_down.is_set():
        print(f"[pid {os.getpid()}] {name} during shutdown: ignored (already stopping)", file=sys.stderr,
              flush=True)
        return
    _shutting_down.set()
    print(f"[pid {os.getpid()}] {name} received: shutting down (stopping child processes)", file=sys.stderr,
          flush=True)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


def install_shutdown_handlers() -> None:
    """SIGTERM -> ``SystemExit(143)`` and SIGINT -> ``KeyboardInterrupt`` in the main thread, once; a second
    signal during the shutdown is ignored. Call from a CLI's main thread (a no-op elsewhere)."""
    if not _started_from_main_thread():
        return
    signal.signal(signal.SIGTERM, _on_shutdown_signal)
    signal.signal(signal.SIGINT, _on_shutdown_signal)


def _kill_own_group(*_args) -> None:
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _guard_main(argv: Sequence[str]) -> int:
    """``python -m megatron_opsd.lifecycle --parent-pid PID [--watch] -- [CMD...]``: SIGKILL this process's group
    (this guard included) once PID is no longer its parent; run CMD meanwhile and exit with its code (no CMD:
    wait). The parent's death arrives as SIGUSR1 (PDEATHSIG) or, with ``--watch``, from a polling thread."""
    parser = argparse.ArgumentParser(prog="python -m megatron_opsd.lifecycle")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--watch", action="store_true", help="poll the parent pid instead of prctl")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if os.getpgid(0) not in (os.getpid(), args.parent_pid):
        parser.error("the guard must lead its process group (start_process) or share its parent's "
                     "(guard_process_group); refusing to kill someone else's group")
    signal.signal(signal.SIGUSR1, _kill_own_group)
    if args.watch or not set_parent_death_signal(signal.SIGUSR1):
        watch_parent(args.parent_pid, _kill_own_group)
    elif not _parent_alive(args.parent_pid):  # died before prctl took effect: the kernel will not tell us
        _kill_own_group()
    child = subprocess.Popen(cmd) if cmd else None
    for sig in (signal.SIGTERM, signal.SIGINT):  # after Popen: the command keeps the default handlers
        signal.signal(sig, lambda *_: None)  # they reach the command through the group
    if child is None:
        while True:
            signal.pause()
    code = child.wait()
    return 128 - code if code < 0 else code  # killed by signal N: exit 128 + N, as a shell reports it


if __name__ == "__main__":
    sys.exit(_guard_main(sys.argv[1:]))
