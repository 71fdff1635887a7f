"""The ``collective`` weight transport's wire, shared by both ends: vLLM's weight-transfer flow over a
torch.distributed group.

The trainer's end is ``client/collective.py`` (``CollectiveTrainerEngine``, ``broadcast_update``), the vLLM
workers' end ``worker/collective.py`` (``CollectiveWeightTransferEngine``); this module holds what both run: the
group (``open_group`` / ``close_group``), the bucket plan, the polled waits and the store keys
of one round, and the wire infos.

vLLM 0.32 drives weight updates through pluggable engines (``vllm.distributed.weight_transfer``): a worker
engine in every vLLM worker (``init_transfer_engine`` / ``start_weight_update`` / ``receive_weights`` /
``finish_weight_update``) and a trainer engine (``trainer_init`` / ``send_weights``). Its built-in data planes
need CUDA streams (nccl, ipc); one of ours is registered under two names (``worker/vllm_plugin.register``,
``client/collective.register_trainer_engines``):

- ``gloo``: a gloo group (CPU; what CI runs at sidecar TP=2),
- ``opsd_nccl``: the same engine over a ``ProcessGroupNCCL`` (GPU).

Everything except the communicator is the same code. The group is stateless (its own ``TCPStore`` opened by
the trainer's sending rank; the sidecar's TP workers join as ranks ``1..K``), independent of the trainer's
and vLLM's own process groups.

Speed: both ends cut the announced tensor list into the same buckets (``plan_buckets``, 1 GiB by default), so
no per-bucket metadata or store round trip exists; each side keeps two buckets in flight (the trainer packs
bucket k+1 while k is on the wire; a worker loads bucket k while k+1 arrives), as vLLM's own packed NCCL
engine does with its 2 x 1 GiB buffers. One gather feeds every sidecar replica (``broadcast_update``).

Faults (NCCL hangs where gloo raises, so nothing here waits inside a collective): every wait polls its work
with a deadline (``wait_s``: a fixed part plus the bucket's bytes at a quarter of the measured rate, far below
the trainer's NCCL timeout) and the group's store for a ``failed`` key that any rank sets when it gives up.
On any failure every rank aborts the group (``ProcessGroup.abort``) and drops it; vLLM's own nccl engine says
why nothing less will do (``vllm/distributed/weight_transfer/nccl_engine.py``, ``send_weights``): "If the
broadcast raised, the worker is still blocked in the matching NCCL call and will never return ... the
transfer group is unusable either way and the caller has to tear it down." The sidecar then refuses
``/generate`` (503, with the reason) until a complete update arrives, and the trainer rendezvouses a fresh
group and pushes again (``SidecarClient.push_collective``). No previous weights are kept: the re-push is the
recovery (docs/sidecar.md).
"""
from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Optional

import torch
from vllm.distributed.weight_transfer.base import WeightTransferInitInfo, WeightTransferUpdateInfo
from vllm.logger import init_logger

from megatron_opsd.parallel.distributed import route_source_address
from megatron_opsd.rollout.secret import store_prefix, verify_members

logger = init_logger(__name__)
COMMUNICATORS = {"gloo": "gloo", "opsd_nccl": "nccl"}  # vLLM backend name -> torch.distributed backend
DEFAULT_PUSH_BUCKET_BYTES = 1 << 30  # vLLM's packed engine: DEFAULT_PACKED_BUFFER_SIZE_BYTES (x 2 buffers)
IN_FLIGHT = 2  # buckets on the wire per side: double buffering
MIN_RATE = 50e6  # bytes/s assumed before a push was measured, and the floor after
# torch's ProcessGroupNCCL.hpp: "CleanUpOnly: just clean up collectives and abort communicators without tearing
# down process" (ErrorHandlingMode 2; TearDown = 1 is what TORCH_NCCL_ASYNC_ERROR_HANDLING=1 asks for)
NCCL_CLEAN_UP_ONLY = "2"


def wait_s(nbytes: int, base_s: float, rate: Optional[float] = None) -> float:
    """Deadline of one wait: a fixed part (rendezvous, HTTP, one bucket's load) plus ``nbytes`` at a quarter of
    the measured rate ``rate`` (bytes/s; at least ``MIN_RATE``)."""
    return base_s + nbytes / max(MIN_RATE, (rate or 0.0) / 4)


def transfer_backend(on_gpu: bool) -> str:
    return "opsd_nccl" if on_gpu else "gloo"


@contextmanager
def _nccl_errors_clean_up_only():
    """The transfer group's NCCL errors abort its communicator but never the process: the mode is read from the
    environment when a ProcessGroupNCCL is built, and launch scripts export TearDown (1) for the trainer's own
    groups."""
    previous = os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING")
    os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = NCCL_CLEAN_UP_ONLY
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_NCCL_ASYNC_ERROR_HANDLING", None)
        else:
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = previous


def open_group(comm: str, host: str, port: int, rank: int, world_size: int, timeout_s: float, key: str):
    """A stateless group: its own TCPStore (rank 0 listens) and a gloo / NCCL backend object on it. Every key, the
    backend's rendezvous and ours, lives under a prefix derived from the rendezvous ``key`` (``secret.store_prefix``),
    and every member proves ``key`` to the others before the group is used (``secret.verify_members``). The
    backend's own timeout is twice ``timeout_s`` so that our polled deadlines fire first."""
    dist = torch.distributed
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(store_prefix(key), store)
    if comm == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = 2 * timeout
        with _nccl_errors_clean_up_only():
            group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:  # bound to this host's address on its route to the store's host: gloo's default is what the host's name
        # resolves to (127.x in many containers), which the other host would be told to connect to
        options = dist.ProcessGroupGloo._Options()
        options._timeout = 2 * timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=route_source_address(host))]
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, options)
    verify_members(group, key, rank, world_size, timeout_s, device="cuda" if comm == "nccl" else "cpu")
    return prefixed, group


def close_group(group, linger_s: float) -> None:
    """Abort (NCCL: ``ncclCommAbort``, which frees a rank blocked in the group; gloo: nothing to cancel) and drop
    it ``linger_s`` later, from a timer thread: destroying a ProcessGroupGloo joins its threads, which wait for
    the operations in progress (a receive from a stopped peer ends only at the group's own timeout)."""
    if group is None:
        return
    try:
        group.abort()
    except Exception:  # noqa: BLE001 - already broken; dropping it is all that is left
        logger.warning("aborting the weight transfer group failed", exc_info=True)
    _LINGERING.append(group)
    timer = threading.Timer(linger_s, _LINGERING.remove, (group,))
    timer.daemon = True
    timer.start()


_LINGERING: list = []  # aborted groups until their operations in progress timed out


def plan_buckets(sizes: list[int], bucket_bytes: int) -> list[tuple[int, int]]:
    """Consecutive tensors ``[start, stop)`` of at most ``bucket_bytes`` (a larger tensor travels alone): the same
    cut on the trainer and on every worker, from the announced list alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: {bucket_bytes} must be positive")
    plan, start, size = [], 0, 0
    for i, nbytes in enumerate(sizes):
        if i > start and size + nbytes > bucket_bytes:
            plan.append((start, i))
            start, size = i, 0
        size += nbytes
    if start < len(sizes):
        plan.append((start, len(sizes)))
    return plan


class PeerFailed(RuntimeError):
    """Another rank of the transfer group gave up (its reason is the message)."""


def wait_work(work, store, round_id: str, timeout_s: float, what: str) -> None:
    """Wait for ``work`` without ever blocking inside the collective: poll it, and the store's ``failed`` key."""
    deadline = time.monotonic() + timeout_s
    failed, pause, next_check = round_key(round_id, "failed"), 0.0005, 0.0
    while not work.is_completed():
        now = time.monotonic()
        if now >= next_check:
            if store.check([failed]):
                raise PeerFailed(store.get(failed).decode())
            next_check = now + 0.05
        if now > deadline:
            raise TimeoutError(f"{what} did not complete within {timeout_s:.0f} s")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
    work.wait()  # raises the collective's own error (gloo: a peer closed the connection)


def wait_key(store, round_id: str, name: str, timeout_s: float) -> None:
    """Wait for key ``name`` of the round, or raise ``PeerFailed`` once some rank set ``failed``."""
    key, failed = round_key(round_id, name), round_key(round_id, "failed")
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if store.check([failed]):
            raise PeerFailed(store.get(failed).decode())
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {name!r} from the trainer within {timeout_s:.0f} s")
        time.sleep(0.005)


def report_failure(store, round_id: str, reason: str) -> None:
    try:
        store.set(round_key(round_id, "failed"), reason[:500])
    except Exception:  # noqa: BLE001 - the store's owner (the trainer) may be gone; the deadlines still hold
        pass


# ---------------------------------------------------------------------------------------------------- wire info
@dataclass
class CollectiveInitInfo(WeightTransferInitInfo):
    """Worker side of the rendezvous (sent by the trainer through the sidecar)."""

    master_address: str
    master_port: int
    world_size: int  # 1 trainer sender + the sidecar's workers
    rank_offset: int = 1
    timeout_s: float = 300.0
    nonce: str = ""  # this rendezvous's nonce, from the trainer
    store_key: str = field(default="", repr=False)  # HMAC(secret, nonce), added by the sidecar (secret.rendezvous_key)


@dataclass
class CollectiveUpdateInfo(WeightTransferUpdateInfo):
    """One update: the announced tensors (validated before anything is sent), how they are cut into buckets,
    and the deadlines' parameters."""

    round_id: str
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int = DEFAULT_PUSH_BUCKET_BYTES
    base_s: float = 60.0  # fixed part of every wait
    rate: Optional[float] = None  # measured bytes/s of earlier pushes (deadlines use a quarter of it)
    fail_at_bucket: Optional[int] = None  # fault injection for tests: worker rank 1 raises before this bucket

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError("update_info: names, dtype_names and shapes must have the same length")

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(s), getattr(torch, d)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)}

    def sizes(self) -> list[int]:
        return [math.prod(s) * getattr(torch, d).itemsize for d, s in zip(self.dtype_names, self.shapes)]

    @property
    def nbytes(self) -> int:
        return sum(self.sizes())

    def bucket_wait_s(self, nbytes: int) -> float:
        return wait_s(nbytes, self.base_s, self.rate)


def round_key(round_id: str, *parts: Any) -> str:
    """A store key of one update round (``ready`` / ``done`` / ``commit`` / ``failed``, per rank where it says)."""
    return "/".join([round_id, *map(str, parts)])
