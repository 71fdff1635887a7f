"""The ``collective`` weight transport: vLLM's weight-transfer flow over a torch.distributed group.

vLLM 0.32 drives weight updates through pluggable engines (``vllm.distributed.weight_transfer``): a worker
engine in every vLLM worker (``init_transfer_engine`` / ``start_weight_update`` / ``receive_weights`` /
``finish_weight_update``) and a trainer engine (``trainer_init`` / ``send_weights``). Its built-in data planes
need CUDA streams (nccl, ipc); this module registers one of ours under two names (``vllm_plugin.register``):

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
import secrets
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Iterable, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor
from vllm.logger import init_logger

from megatron_opsd.parallel.distributed import free_port, route_source_address
from megatron_opsd.rollout.auth import rendezvous_key, store_prefix, verify_members


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
    backend's rendezvous and ours, lives under a prefix derived from the rendezvous ``key`` (``auth.store_prefix``),
    and every member proves ``key`` to the others before the group is used (``auth.verify_members``). The
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
    failed, pause, next_check = _key(round_id, "failed"), 0.0005, 0.0
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
    key, failed = _key(round_id, name), _key(round_id, "failed")
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if store.check([failed]):
            raise PeerFailed(store.get(failed).decode())
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {name!r} from the trainer within {timeout_s:.0f} s")
        time.sleep(0.005)


def report_failure(store, round_id: str, reason: str) -> None:
    try:
        store.set(_key(round_id, "failed"), reason[:500])
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
    store_key: str = field(default="", repr=False)  # HMAC(secret, nonce), added by the sidecar (auth.rendezvous_key)


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


def _key(round_id: str, *parts: Any) -> str:
    return "/".join([round_id, *map(str, parts)])


# ---------------------------------------------------------------------------------------------------- worker
class CollectiveWeightTransferEngine(WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]):
    """Runs in every vLLM worker (loaded through the ``vllm.general_plugins`` entry point)."""

    init_info_cls = CollectiveInitInfo
    update_info_cls = CollectiveUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.comm = COMMUNICATORS[config.backend]
        self.store = self.group = None
        self.group_timeout_s = 0.0
        self.rank = -1
        self.loaded_any = False
        self.error = None  # why this worker's last update_weights failed

    def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
        self.shutdown()
        pc = self.parallel_config
        self.rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.group_timeout_s = 2 * init_info.timeout_s
        self.store, self.group = open_group(self.comm, init_info.master_address, init_info.master_port,
                                            self.rank, init_info.world_size, init_info.timeout_s, init_info.store_key)

    def start_weight_update(self) -> None:
        """vLLM's layerwise reload (as its nccl engine): each layer is re-processed once all its tensors arrived."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.loaded_any = False
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Receive one update. A failure tears the group down (every peer learns it through the store's
        ``failed`` key) and is kept in ``self.error`` (read by the sidecar through the worker extension's
        ``opsd_update_error``), not raised: vLLM's multiproc executor stops reading replies at the first worker
        that raised, which leaves the other workers' replies queued, and every later call at TP > 1 would then
        read the reply of the call before it."""
        self.error = None
        info = None
        try:
            info = self.parse_update_info(update_info)
            self.receive_weights(info)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - reported through opsd_update_error
            self.error = f"{type(err).__name__}: {err}"
            logger.warning("weight update failed on this worker; tearing the transfer group down: %s", self.error)
            if self.store is not None and info is not None and not isinstance(err, PeerFailed):
                report_failure(self.store, info.round_id, f"sidecar worker rank {self.rank}: {self.error}")
            self.shutdown()

    def receive_weights(self, info: CollectiveUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer group not initialised (POST /init_weight_transfer_engine first, "
                               "or the previous update broke it)")
        dtypes = [getattr(torch, d) for d in info.dtype_names]
        sizes = info.sizes()
        plan = plan_buckets(sizes, info.bucket_bytes)
        self.store.set(_key(info.round_id, "ready", self.rank), "1")
        in_flight: list = []

        def post(k: int) -> None:
            start, stop = plan[k]
            buffer = torch.empty(sum(sizes[start:stop]), dtype=torch.uint8, device=self.device)
            in_flight.append((buffer, self.group.broadcast(buffer, 0)))

        for k in range(min(IN_FLIGHT, len(plan))):
            post(k)
        for k, (start, stop) in enumerate(plan):
            if info.fail_at_bucket == k and self.rank == 1:
                raise MemoryError(f"injected fault before bucket {k} (update_info.fail_at_bucket)")
            buffer, work = in_flight.pop(0)
            wait_work(work, self.store, info.round_id, info.bucket_wait_s(buffer.numel()), f"bucket {k}")
            self.loaded_any = True
            self.model.load_weights(unpack_tensor(buffer, info.names[start:stop], info.shapes[start:stop],
                                                  dtypes[start:stop], sizes[start:stop]))
            del buffer
            if k + IN_FLIGHT < len(plan):
                post(k + IN_FLIGHT)
        self.store.set(_key(info.round_id, "done", self.rank), "1")
        # the trainer's verdict: it commits once every worker is done; a failure anywhere sets "failed" instead
        wait_key(self.store, info.round_id, "commit", info.bucket_wait_s(info.bucket_bytes) + info.base_s)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def abort(self) -> bool:
        """End a failed update: vLLM's finalize gives layers that received nothing their tensors back. Returns
        whether this worker is left with partly new weights (some bucket was loaded)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        try:
            finalize_layerwise_reload(self.model, self.model_config)
            return self.loaded_any
        except Exception:  # noqa: BLE001 - the session must end; report the weights as suspect instead
            logger.exception("weight update aborted, and ending it failed: the weights may be partly new")
            return True
        finally:
            self.shutdown()  # the group is unusable after a failure (the trainer rendezvouses a fresh one)

    def shutdown(self) -> None:
        close_group(self.group, self.group_timeout_s + 5)
        self.group = self.store = None


def update_error(worker):
    """``collective_rpc`` target: why this worker's last ``update_weights`` failed (None: it did not)."""
    return getattr(getattr(worker, "weight_transfer_engine", None), "error", None)


def abort_weight_update(worker) -> bool:
    """``collective_rpc`` target (runs on each vLLM worker): end a failed update session (``abort``); returns
    whether this worker's weights are now partly new."""
    engine = getattr(worker, "weight_transfer_engine", None)
    if engine is None:
        return False
    try:
        if isinstance(engine, CollectiveWeightTransferEngine):
            return engine.abort()
        engine.finish_weight_update()
        return False
    finally:
        engine.reset_weight_update_target()
        worker._weight_update_active = False


# ---------------------------------------------------------------------------------------------------- trainer
@dataclass
class CollectiveTrainerInitInfo(TrainerInitInfo):
    """Trainer side: where the group's store listens (an address the sidecar's workers can reach)."""

    backend: ClassVar[str] = "gloo"
    master_address: str
    master_port: int
    world_size: int
    timeout_s: float = 60.0  # fixed part of every wait (rollout.sync_timeout_s)
    bucket_bytes: int = DEFAULT_PUSH_BUCKET_BYTES
    # until every worker receives: the sidecar first lets the generations in flight finish (no collective is
    # pending meanwhile); the client's request timeout
    ready_timeout_s: float = 600.0
    secret: str = field(default="", repr=False)  # the run's secret: each rendezvous's key is derived from it


@dataclass
class CollectiveNcclTrainerInitInfo(CollectiveTrainerInitInfo):
    backend: ClassVar[str] = "opsd_nccl"


class WeightTransferError(RuntimeError):
    """A collective weight push failed; the message says at which step and why."""


@dataclass
class _Round:
    """One update in progress on one replica: its announced info and the sidecar's ``/update_weights`` reply."""

    info: CollectiveUpdateInfo
    reply: Future
    pool: ThreadPoolExecutor


class CollectiveTrainerEngine(TrainerWeightTransferEngine[CollectiveTrainerInitInfo]):
    """Trainer side, one per sidecar replica. ``client`` is a sidecar client with the four weight-sync calls
    (``_ReplicaWeightSync``). ``send_weights`` pushes to this replica alone; ``broadcast_update`` pushes one
    gather to several. Only the sending rank has an engine; the other trainer ranks take part in the gather
    (``iter_hf_tensors``) outside, exactly as with the HTTP transport."""

    init_info_cls = CollectiveTrainerInitInfo

    def __init__(self, *, client, init_info: CollectiveTrainerInitInfo, is_sender: bool = True):
        super().__init__(client=client, source=None, is_sender=is_sender)
        self.init_info = init_info
        self.comm = COMMUNICATORS[init_info.backend]
        self.store = self.group = None
        self.rate: Optional[float] = None  # bytes/s of the last complete push (deadlines use a quarter of it)
        self.current: Optional[_Round] = None  # the round begun and not yet ended or failed
        self.fail_at_bucket: Optional[int] = None  # fault injection for tests, used by the next push only

    @classmethod
    def trainer_init(cls, init_info: CollectiveTrainerInitInfo, *, client, source=None) -> "CollectiveTrainerEngine":
        engine = cls(client=client, init_info=init_info, is_sender=init_info.is_sender)
        if engine.is_sender:
            engine.connect()
        return engine

    @property
    def max_wait_s(self) -> float:
        """The longest deadline of this push's waits (one bucket at the measured rate)."""
        return wait_s(self.init_info.bucket_bytes, self.init_info.timeout_s, self.rate)

    @property
    def group_wait_s(self) -> float:
        """The longest any wait can be (no rate measured: the floor); the group's own timeout is twice this."""
        return wait_s(self.init_info.bucket_bytes, self.init_info.timeout_s)

    def connect(self) -> None:
        """Open the group: the sidecar's workers join inside ``init_weight_transfer_engine``, concurrently."""
        info, timeout_s = self.init_info, self.group_wait_s
        nonce = secrets.token_hex(16)  # one-time: the sidecar derives the same key from its secret
        worker_info = CollectiveInitInfo(info.master_address, info.master_port, info.world_size, 1, timeout_s,
                                         nonce=nonce)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self.client.init_weight_transfer_engine, asdict(worker_info))
            try:
                self.store, self.group = open_group(self.comm, info.master_address, info.master_port, 0,
                                                    info.world_size, timeout_s,
                                                    rendezvous_key(info.secret, nonce))
            except Exception as err:
                raise WeightTransferError(f"weight transfer group on {info.master_address}:{info.master_port} "
                                          f"did not form within {timeout_s:.0f} s: {err}") from err
            future.result(timeout=timeout_s)

    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], metadata: list[ParamMeta],
                     version: int) -> dict:
        """Push one update to this replica; raises ``WeightTransferError`` (the group torn down) on failure."""
        stats, failures = broadcast_update([self], named_tensors, metadata, version)
        if failures:
            raise failures[self]
        return stats

    # -- one round ------------------------------------------------------------------------------------------
    def begin(self, metadata: list[ParamMeta], version: int, restore: bool = False) -> _Round:
        """Announce (the sidecar validates it: refusals happen here) and wait until every worker is receiving;
        ``restore``: the sidecar takes ``version`` even if not newer (``SidecarClient.push_weights``)."""
        if self.group is None:  # broken by an earlier failure: a fresh rendezvous on a fresh port
            self.init_info.master_port = free_port()
            self.connect()
        info = CollectiveUpdateInfo(uuid.uuid4().hex[:12], [m.name for m in metadata],
                                    [str(m.dtype).removeprefix("torch.") for m in metadata],
                                    [list(m.shape) for m in metadata], self.init_info.bucket_bytes,
                                    self.init_info.timeout_s, self.rate, self.fail_at_bucket)
        self.fail_at_bucket = None
        self.client.start_weight_update(version=version, update_info=asdict(info), restore=restore)
        pool = ThreadPoolExecutor(1)
        self.current = round_ = _Round(info, pool.submit(self.client.update_weights, asdict(info)), pool)
        self._wait_keys(round_, "ready", max(info.base_s, self.init_info.ready_timeout_s))
        return round_

    def _wait_keys(self, round_: _Round, name: str, timeout_s: float) -> None:
        """Wait until every worker set ``name`` in the store; the sidecar's early answer or a ``failed`` key
        ends the wait."""
        keys = [_key(round_.info.round_id, name, r) for r in range(1, self.init_info.world_size)]
        failed = _key(round_.info.round_id, "failed")
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            if self.store.check([failed]):
                raise PeerFailed(self.store.get(failed).decode())
            if round_.reply.done():
                round_.reply.result()  # the sidecar refused or failed: raise its error
                raise WeightTransferError(f"the sidecar answered before its workers were {name}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecar workers not {name} within {timeout_s:.0f} s")
            time.sleep(0.005)

    def wait(self, round_: _Round, work, nbytes: int, what: str) -> None:
        wait_work(work, self.store, round_.info.round_id, round_.info.bucket_wait_s(nbytes), what)

    def end(self, round_: _Round, version: int, transfer_s: float) -> dict:
        """Every worker loaded everything; the sidecar moved its version: confirm it, record the rate."""
        info = round_.info
        self._wait_keys(round_, "done", info.bucket_wait_s(info.bucket_bytes))
        self.store.set(_key(info.round_id, "commit"), "ok")
        result = round_.reply.result(timeout=info.base_s)
        round_.pool.shutdown(wait=False)
        self.current = None
        self.client.finish_weight_update(version)
        self.rate = info.nbytes / max(transfer_s, 1e-6)
        return result if isinstance(result, dict) else {}

    def fail(self, round_: Optional[_Round], err: BaseException, version: int, nbytes: int) -> WeightTransferError:
        """Tear the group down on both ends (the store's ``failed`` key tells the workers, then ``abort``), let
        the sidecar end its session (bounded), and explain."""
        detail = f"{type(err).__name__}: {err}"
        round_, self.current = round_ or self.current, None
        if round_ is not None:
            report_failure(self.store, round_.info.round_id, f"trainer: {detail}")
        self.shutdown()
        if round_ is not None:
            try:
                round_.reply.result(timeout=round_.info.base_s)
            except Exception as reply_err:  # noqa: BLE001 - expected: the sidecar reports the failed update
                if reply_err is not err:
                    detail += f"; sidecar: {type(reply_err).__name__}: {reply_err}"
            finally:
                round_.pool.shutdown(wait=False)  # a worker stuck in the group must not hang the trainer too
        error = WeightTransferError(f"collective weight push v{version} ({nbytes / 1e6:.1f} MB, waits bounded by "
                                    f"{self.max_wait_s:.0f} s) failed: {detail}".replace("\n", " "))
        error.__cause__ = err  # callers tell a refusal (the sidecar's 4xx: pushing again cannot help) from a fault
        return error

    def shutdown(self) -> None:
        close_group(self.group, 2 * self.group_wait_s + 5)
        self.group = self.store = None


def _pack(stream: Iterator, metadata: list[ParamMeta], start: int, stop: int) -> torch.Tensor:
    """Tensors ``start..stop`` of the announced list from ``stream`` (checked against it), as one uint8 buffer."""
    parts = []
    for meta in metadata[start:stop]:
        name, tensor = next(stream, (None, None))
        if name != meta.name or tensor is None or tuple(tensor.shape) != tuple(meta.shape):
            got = "the end of the stream" if name is None else f"{name!r} {tuple(getattr(tensor, 'shape', ()))}"
            raise WeightTransferError(f"tensor {got} was not announced here (expected {meta.name!r} "
                                      f"{tuple(meta.shape)})")
        parts.append(tensor.detach().to(meta.dtype).contiguous().view(-1).view(torch.uint8))
    return torch.cat(parts) if len(parts) > 1 else parts[0]  # a tensor alone: sent from its own storage


def broadcast_update(engines: list[CollectiveTrainerEngine], named_tensors: Iterable[tuple[str, torch.Tensor]],
                     metadata: list[ParamMeta], version: int, restore: bool = False) -> tuple[Optional[dict], dict]:
    """Push one gather of ``named_tensors`` (in ``metadata``'s order) to every engine's replica, two buckets in
    flight. Returns (statistics or None when every replica failed, {engine: WeightTransferError}); a replica
    that fails is torn down and dropped while the others go on."""
    sizes = [math.prod(m.shape) * m.dtype.itemsize for m in metadata]
    nbytes = sum(sizes)
    bucket_bytes = engines[0].init_info.bucket_bytes if engines else DEFAULT_PUSH_BUCKET_BYTES
    plan = plan_buckets(sizes, bucket_bytes)
    live: dict[CollectiveTrainerEngine, _Round] = {}
    failures: dict = {}
    start = time.perf_counter()

    def drop(engine, err: BaseException) -> None:
        failures[engine] = engine.fail(live.pop(engine, None), err, version, nbytes)

    for engine in engines:
        try:
            engine.init_info.bucket_bytes = bucket_bytes
            live[engine] = engine.begin(metadata, version, restore)
        except Exception as err:  # noqa: BLE001 - this replica failed; the others still get the version
            drop(engine, err)
    stream = iter(named_tensors)
    in_flight: list[tuple[int, torch.Tensor, dict]] = []

    def retire() -> None:
        index, buffer, works = in_flight.pop(0)
        for engine, work in works.items():
            if engine in live:
                try:
                    engine.wait(live[engine], work, buffer.numel(), f"bucket {index}")
                except Exception as err:  # noqa: BLE001
                    drop(engine, err)

    try:
        for index, (first, stop) in enumerate(plan):
            if not live:
                break
            if len(in_flight) == IN_FLIGHT:
                retire()
            # gathered and packed while the previous bucket is on the wire: rank 0 holds at most this bucket's
            # tensors, its packed copy and one bucket in flight (planning.memory.push_transient_bytes)
            buffer = _pack(stream, metadata, first, stop)
            works = {}
            for engine in list(live):
                try:
                    works[engine] = engine.group.broadcast(buffer, 0)
                except Exception as err:  # noqa: BLE001
                    drop(engine, err)
            in_flight.append((index, buffer, works))
            del buffer
        while in_flight:
            retire()
        if live and next(stream, None) is not None:
            raise WeightTransferError(f"the trainer's stream has more tensors than the {len(metadata)} announced")
    except Exception as err:  # noqa: BLE001 - a trainer-side failure (the stream): every replica aborts
        for engine in list(live):
            drop(engine, err)
    transfer_s = time.perf_counter() - start
    results = []
    for engine in list(live):
        try:
            results.append(engine.end(live[engine], version, transfer_s))
        except Exception as err:  # noqa: BLE001
            drop(engine, err)
    if not results:
        return None, failures
    return dict(buckets=len(plan), tensors=len(metadata), bytes=nbytes, version=version, transfer_s=transfer_s,
                total_s=time.perf_counter() - start, apply_s=max(r.get("apply_s", float("nan")) for r in results),
                wait_s=max(e.max_wait_s for e in engines), replicas=len(results)), failures
