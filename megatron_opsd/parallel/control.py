"""The control plane: a gloo process group for the waits around rank-0-only work, apart from the tensor groups.

Rank 0 alone samples rollouts, grades them, evaluates, starts a sidecar and pushes adapters, while every other
rank waits for the result (an object broadcast) or for rank 0 to finish (a barrier). Waiting on the NCCL world
group would put that wait under NCCL's watchdog: torch's ``ProcessGroupNCCL`` aborts the job when a collective
is not complete after the group's timeout (``parallel.timeout_minutes``, default 30), and a MATH-500 evaluation
at 4-8k tokens plus a step's rollouts can take longer. These waits therefore run on their own gloo group (CPU
objects; no NCCL work is pending while a rank waits here) with a long timeout of its own
(``parallel.control_timeout_minutes``). Tensors stay on the NCCL groups. A dead rank 0 still ends the wait
early: gloo sees the closed connection, and torchrun / srun stop the other ranks when one exits.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
from typing import Any, Optional

import torch

_CONTROL_GROUP = None
# The job's rendezvous store (init_process_group's), kept past the groups' teardown: under torchrun it is the agent's
# store (TORCHELASTIC_USE_AGENT_STORE), which outlives every rank, so a rank that stops on a UsageError leaves its
# message there for the ranks it leaves waiting (``report_usage_error`` / ``peer_usage_error``). Public: a test puts a
# store of its own here.
JOB_STORE = None
_JOB_RANK, _JOB_WORLD = 0, 1
_USAGE_KEY, _USAGE_COUNT_KEY = "megatron_opsd/usage_error", "megatron_opsd/usage_error_reports"
_USAGE_DONE_KEY = "megatron_opsd/usage_error_done"
STORE_HOST_WAIT_S = 10.0  # how long the rank serving the store waits for the others to read a reported error
STORE_CALL_BOUND_S = 10.0  # the longest a rank on its way out talks to the job's store


def init_control_group(timeout_minutes: float) -> None:
    """COLLECTIVE (every rank, in the same order as any other ``new_group``): create the control group."""
    global _CONTROL_GROUP, JOB_STORE, _JOB_RANK, _JOB_WORLD
    _CONTROL_GROUP = torch.distributed.new_group(backend="gloo",
                                                 timeout=datetime.timedelta(minutes=timeout_minutes))
    _JOB_RANK, _JOB_WORLD = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if _JOB_WORLD > 1:
        JOB_STORE = torch.distributed.distributed_c10d._get_default_store()


def use_control_group(group) -> None:
    """Make ``group`` (made by an earlier ``init_control_group`` of this world) the control group again."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = group


def destroy_control_group() -> None:
    """Forget the group (``torch.distributed.destroy_process_group`` frees it with every other group)."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = None


def control_group() -> Optional[Any]:
    """The control group; None (the default group) when ``init_distributed`` did not create one."""
    return _CONTROL_GROUP


def _single_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1


def broadcast_object(obj, src: int = 0):
    """``obj`` from global rank ``src`` on every rank (picklable objects; a no-op on one process), on the
    control group: the other ranks may wait here for as long as rank 0's work takes."""
    if _single_process():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def barrier() -> None:
    """Every rank waits for the others on the control group (a no-op on one process)."""
    if not _single_process():
        torch.distributed.barrier(group=_CONTROL_GROUP)


def report_usage_error(message: str) -> Optional[bool]:
    """Record this rank's UsageError for the job (a mistake only a rank could find). The peers it leaves waiting
    find it when their collective breaks (``peer_usage_error``) and stop without a traceback; torchrun's summary
    shows the line as the root cause (its per-rank error file, ``TORCHELASTIC_ERROR_FILE``, read by
    torch/distributed/elastic/multiprocessing/errors: ``{"message": {"message": ..., "extraInfo": {"timestamp":
    ...}}}``). True when this rank is the job's first to report (it prints the line), False for a later one, None
    outside a distributed job (the caller's rank-0 rule applies)."""
    if JOB_STORE is None:
        return None
    _write_launcher_error_file(message)

    def claim() -> bool:
        first = JOB_STORE.add(_USAGE_COUNT_KEY, 1) == 1
        if first:
            JOB_STORE.set(_USAGE_KEY, message)
        _stopped(JOB_STORE)
        return first

    try:
        return _bounded(claim, STORE_CALL_BOUND_S + STORE_HOST_WAIT_S)
    except Exception:  # noqa: BLE001 - the store went away with its host: fall back to the rank-0 rule
        return None


def peer_usage_error(wait_s: float = 5.0) -> Optional[str]:
    """The UsageError another rank of this job reported (``report_usage_error``), waiting up to ``wait_s`` for it;
    asked by a rank whose own run failed, typically in a collective that the reporting rank left. None when no
    rank reported one (then the failure is this rank's own and keeps its traceback)."""
    if JOB_STORE is None:
        return None

    def read() -> str:
        JOB_STORE.wait([_USAGE_KEY], datetime.timedelta(seconds=wait_s))
        message = JOB_STORE.get(_USAGE_KEY).decode()
        _stopped(JOB_STORE)
        return message

    try:
        message = _bounded(read, wait_s + STORE_CALL_BOUND_S)
    except Exception:  # noqa: BLE001 - nothing reported in time, or the store is gone or cut off
        return None
    _write_launcher_error_file(f"stopped by another rank's error: {message}")
    return message


def _bounded(call, seconds: float):
    """``call()``, given up after ``seconds`` (TimeoutError) and left to finish on a daemon thread. A store call
    can block far past its own timeout when the store's host is cut off (link down, host frozen): torch's
    TCPStore::doWait, after ``receiveValueWithTimeout`` gives up, sends CANCEL_WAIT and then reads the reply with
    ``client_->receiveValue<detail::WaitResponseType>()``, under the store's whole timeout ("this is the cancel
    wait timeout, once here we expect the server to respond in a timely fashion"). A rank that is already failing
    must still print its own error and exit, whatever the store does."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as err:  # noqa: BLE001 - handed to the caller below
            outcome["error"] = err

    worker = threading.Thread(target=run, name="opsd-store-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise TimeoutError(f"the job's store did not answer within {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _stopped(store) -> None:
    """Count this rank as stopped on the reported error. The rank that serves the store (rank 0 when the process
    group made its own TCPStore: srun or a plain launch; under torchrun the agent serves it) must outlive the
    others' reading of it: it leaves its process groups first (ranks still waiting in a collective with it see the
    break now, not when it exits), then waits up to ``STORE_HOST_WAIT_S`` for every rank to have stopped."""
    store.add(_USAGE_DONE_KEY, 1)
    if _JOB_RANK != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    deadline = time.monotonic() + STORE_HOST_WAIT_S
    while store.add(_USAGE_DONE_KEY, 0) < _JOB_WORLD and time.monotonic() < deadline:
        time.sleep(0.05)


def _write_launcher_error_file(message: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
