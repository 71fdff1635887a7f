"""Run a function on N local processes with real torch.distributed (gloo on CPU) and collect results.

Used by the tests and by tools that need TP/PP on one machine without torchrun. Each worker initialises
torch.distributed and megatron's parallel state from a ``ParallelConfig`` and calls ``fn(*args)``; the
per-rank return values (picklable) come back as a list indexed by global rank. A failure in any rank is
re-raised in the parent with that rank's traceback; a ``UsageError`` (bad config, input or layout: every rank
hits the same one) is re-raised as itself, once, so the CLI prints it as one line. Ranks die with the parent
(``lifecycle.bind_to_parent``), each leads a process group that dies with it (``lifecycle.guard_process_group``),
and an exception in the parent (SIGTERM's SystemExit, Ctrl-C) stops them with SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.multiprocessing as mp

from megatron_opsd.errors import UsageError
from megatron_opsd.lifecycle import (STOP_GRACE_S, bind_to_parent, guard_process_group, install_shutdown_handlers,
                                     parent_binding)
# free_port lives in distributed.py (the rendezvous picks one too); still importable from here, its old path
from megatron_opsd.parallel.distributed import (ParallelConfig, destroy_distributed, free_port,  # noqa: F401
                                               init_distributed)


def _worker(rank: int, world_size: int, port: int, cfg: ParallelConfig, fn: Callable, args: tuple, out_dir: str,
            env: dict, parent_pid: int, parent_watch: bool) -> None:
    bind_to_parent(parent_pid, watch=parent_watch)  # replaces torch's PDEATHSIG (SIGINT) by SIGKILL + re-check
    guard_process_group()  # what this rank starts (megatron's checkpoint-writer manager, ...) dies with it
    install_shutdown_handlers()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, int(env.get("OPSD_THREADS_PER_RANK", "1"))))
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        try:
            init_distributed(cfg)
        except Exception as err:  # noqa: BLE001 - the port was free when picked; another process took it since
            if "EADDRINUSE" not in str(err):
                raise
            path.write_bytes(pickle.dumps(("port_taken", str(err).splitlines()[-1])))
            raise
        result = fn(*args)
        path.write_bytes(pickle.dumps(("ok", result)))
    except UsageError as err:  # the parent re-raises it as is (no per-rank traceback)
        path.write_bytes(pickle.dumps(("usage", err)))
        raise
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        if not path.exists():  # (a taken port is reported as such)
            path.write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise
    finally:
        destroy_distributed()


class DistributedError(RuntimeError):
    pass


def _stop_ranks(processes: list, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every live rank (they run their normal shutdown), SIGKILL those left after ``grace_s``."""
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in processes:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()


class _PortTaken(Exception):
    pass


def run_distributed(fn: Callable, world_size: int, cfg: Optional[ParallelConfig] = None, *args: Any,
                    env: Optional[dict] = None, attempts: int = 3) -> list:
    """Run ``fn(*args)`` on ``world_size`` spawned processes; returns each rank's return value.

    The rendezvous port is picked free, but another process may bind it before rank 0 does (two launches at
    once, e.g. parallel test workers): then nothing has run yet, and the launch is retried on a new port."""
    cfg = cfg or ParallelConfig()
    cfg.validate_world(world_size)
    for attempt in range(1, attempts + 1):
        try:
            return _launch(fn, world_size, cfg, args, env)
        except _PortTaken as err:
            if attempt == attempts:
                raise DistributedError(f"the rendezvous port was taken {attempts} times: {err}") from None


def _each_layout(fn: Callable, layouts: list) -> list:
    results = []
    for cfg, args in layouts:
        init_distributed(cfg)  # each layout's groups are created once (distributed.py _set_up_layout)
        results.append(fn(*args))
    return results


def run_layouts(fn: Callable, world_size: int, layouts: list, env: Optional[dict] = None) -> list:
    """``fn(*args)`` at each ``(ParallelConfig, args)`` of ``layouts`` in turn, in one world of ``world_size``
    processes: the ranks start once (a spawn costs ~10-20 s of imports on CPU) instead of once per layout.
    Returns, per layout, the per-rank return values (as ``run_distributed`` does for one)."""
    per_rank = run_distributed(_each_layout, world_size, layouts[0][0], fn, layouts, env=env)
    return [[rank[i] for rank in per_rank] for i in range(len(layouts))]


def _launch(fn: Callable, world_size: int, cfg: ParallelConfig, args: tuple, env: Optional[dict]) -> list:
    with tempfile.TemporaryDirectory(prefix="opsd-dist-") as out_dir:
        ctx = mp.start_processes(
            _worker,
            args=(world_size, free_port(), cfg, fn, args, out_dir, dict(env or {}), *parent_binding()),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        try:
            while not ctx.join():
                pass
        except BaseException as err:
            if not isinstance(err, mp.ProcessRaisedException):  # SIGTERM's SystemExit, Ctrl-C, ...
                _stop_ranks(ctx.processes)
                raise
            reports = []
            for rank in range(world_size):
                path = Path(out_dir) / f"rank{rank}.pkl"
                if path.exists():
                    status, value = pickle.loads(path.read_bytes())
                    if status == "usage":
                        raise value from None
                    if status == "port_taken":
                        raise _PortTaken(value)
                    if status == "error":
                        reports.append(f"--- rank {rank} ---\n{value}")
            raise DistributedError("\n".join(reports) or str(err)) from None
        results = []
        for rank in range(world_size):
            status, value = pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes())
            results.append(value)
        return results
