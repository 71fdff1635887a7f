"""Process lifetime: every process we start dies with its parent, and SIGTERM runs the normal shutdown.

Every starter (the sidecar, the ``--nproc`` launcher's ranks, pipeline stages, math-verify's pool) goes through
this module, which depends on the standard library only, so that ``python -m megatron_opsd.lifecycle`` (the
wrapper below) starts in milliseconds and any layer can import it.

- ``start_process(cmd)`` runs ``cmd`` in its own process group (so stopping it reaches the whole tree, e.g. a
  sidecar's vLLM workers) through a small wrapper that binds it to this process before ``exec``:
  ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux, then a re-check of the parent pid (the parent may have died
  between ``fork`` and ``prctl``). Where prctl is missing, or the starter is not the main thread (the kernel
  fires PDEATHSIG when the *thread* that forked exits), the wrapper stays as a supervisor instead: it runs the
  command and kills the group when the parent pid goes away.
- ``stop_process(proc)``: SIGTERM to the group, a grace period, then SIGKILL to whatever of the group is left.
- ``bind_to_parent(pid)`` is the same binding for processes that Python's multiprocessing starts (launcher
  ranks, pool workers), called first thing in the child.
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


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


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


def wrapped_command(cmd: Sequence[str]) -> list[str]:
    """``cmd`` behind the wrapper that binds it to this process (see ``_wrapper_main``)."""
    pid, watch = parent_binding()
    return [sys.executable, "-m", "megatron_opsd.lifecycle", "--parent-pid", str(pid),
            *(["--watch"] if watch else []), "--", *cmd]


def start_process(cmd: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, ...)`` in a new process group, dying with this process (see the module doc)."""
    return subprocess.Popen(wrapped_command(cmd), process_group=0, **popen_kwargs)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_process made the child its group's leader: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def stop_process(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> Optional[int]:
    """SIGTERM ``proc``'s process group, wait ``grace_s``, then SIGKILL the group (also members that outlive the
    leader, e.g. workers of a server that exited first). Returns the exit code."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    return proc.wait()


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


def _wrapper_main(argv: Sequence[str]) -> int:
    """``python -m megatron_opsd.lifecycle --parent-pid PID [--watch] -- CMD...``: bind, then become CMD."""
    parser = argparse.ArgumentParser(prog="python -m megatron_opsd.lifecycle")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--watch", action="store_true", help="supervise (poll the parent) instead of prctl")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given after --")
    if not args.watch and set_parent_death_signal(signal.SIGKILL):
        if not _parent_alive(args.parent_pid):
            return 1
        os.execvp(cmd[0], cmd)  # PDEATHSIG survives exec (not for set-uid programs)
    # Supervisor: this process leads the group; kill all of it when the parent goes away.
    child = subprocess.Popen(cmd)
    watch_parent(args.parent_pid, lambda: os.killpg(os.getpgid(0), signal.SIGKILL))
    signal.signal(signal.SIGTERM, lambda s, f: child.send_signal(s))
    signal.signal(signal.SIGINT, lambda s, f: child.send_signal(s))
    return child.wait()


if __name__ == "__main__":
    sys.exit(_wrapper_main(sys.argv[1:]))
