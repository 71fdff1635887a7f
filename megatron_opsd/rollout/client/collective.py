"""The trainer's end of the ``collective`` weight transport (``rollout/transfer.py`` has the wire both ends run).

``CollectiveTrainerEngine`` is vLLM's trainer-side engine (``WeightTransferTrainerFactory``, registered here under
``gloo`` / ``opsd_nccl``), one per sidecar replica, talking to the sidecar's weight routes through
``SidecarClient`` (``_ReplicaWeightSync``); ``broadcast_update`` pushes one gather to every replica, two buckets in
flight. Imports vLLM at its top: the trainer process loads it only for ``rollout.transport: collective``.
"""
from __future__ import annotations

import math
import secrets
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import ClassVar, Iterable, Iterator, Optional

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine

from megatron_opsd.parallel.distributed import free_port
from megatron_opsd.rollout.secret import rendezvous_key
from megatron_opsd.rollout.transfer import (COMMUNICATORS, DEFAULT_PUSH_BUCKET_BYTES, IN_FLIGHT, CollectiveInitInfo,
                                            CollectiveUpdateInfo, PeerFailed, close_group, open_group, plan_buckets,
                                            report_failure, round_key, wait_s, wait_work)

ENGINE_NAMES = ("gloo", "opsd_nccl")  # vLLM backend names (rollout/transfer.py COMMUNICATORS)


def register_trainer_engines() -> None:
    """Register ``CollectiveTrainerEngine`` with vLLM's trainer factory under both names (idempotent); the workers'
    engine is registered in vLLM's processes (``worker/vllm_plugin.py``)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    for name in ENGINE_NAMES:
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(name, __name__, "CollectiveTrainerEngine")


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
        keys = [round_key(round_.info.round_id, name, r) for r in range(1, self.init_info.world_size)]
        failed = round_key(round_.info.round_id, "failed")
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
        self.store.set(round_key(info.round_id, "commit"), "ok")
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
