"""The ``collective`` weight transport: vLLM's weight-transfer flow over a torch.distributed group.

vLLM 0.32 drives weight updates through pluggable engines (``vllm.distributed.weight_transfer``): a worker
engine in every vLLM worker (``init_transfer_engine`` / ``start_weight_update`` / ``receive_weights`` /
``finish_weight_update``) and a trainer engine (``trainer_init`` / ``send_weights``). Its built-in data planes
need CUDA streams (nccl, ipc); this module registers one of ours under two names (``vllm_plugin.register``):

- ``gloo``: a gloo group (CPU; what CI runs at sidecar TP=2),
- ``opsd_nccl``: the same engine over a ``ProcessGroupNCCL`` (GPU).

Everything except the communicator is the same code. The group is stateless (its own ``TCPStore`` opened by
the trainer's sending rank; the sidecar's TP workers join as ranks ``1..K``), independent of the trainer's
and vLLM's own process groups. Tensors travel in vLLM's packed buckets (``packed_tensor.pack_tensors``), one
bucket at a time: no full-model copy on the trainer, and each worker loads a bucket as it arrives.

Fault semantics (why this is not vLLM's nccl engine):

- The sidecar validates the update (version above the served one; every tensor name, shape and dtype against
  the served checkpoint; nothing missing) *before* any tensor is broadcast, and every worker confirms it is
  ready to receive (a key in the group's store) before the trainer sends the first bucket.
- Bucket metadata and an end / abort marker travel through the store; every wait (store, broadcast, HTTP)
  has a deadline sized from the update's bytes (``sync_timeout_s``).
- All or nothing: a refused update, or one aborted before its first bucket, changes nothing on any worker
  (vLLM's layerwise reload puts every layer's previous tensors back). A transfer broken after some buckets
  were loaded is rolled back: just before vLLM's reload overwrites a layer's served tensors with new values
  (``layerwise._copy_and_restore_kernel_tensors``), each worker keeps a host copy of that layer's tensors, and
  an aborted update copies them back (``keep_previous``, the default: host memory of up to this worker's shard
  of the weights, freed when the update ends). The version moves only after every worker loaded every tensor
  and the trainer's commit marker arrived. With ``keep_previous=False`` (``rollout.keep_previous_weights``) a
  transfer broken mid-stream leaves the sidecar on its version, reporting ``partial_weights`` and refusing
  ``/generate`` (503) until a complete update arrives (docs/sidecar.md).
"""
from __future__ import annotations

import json
import math
import secrets
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.packed_tensor import pack_tensors, unpack_tensor
from vllm.logger import init_logger

from megatron_opsd.parallel.distributed import free_port
from megatron_opsd.rollout.auth import rendezvous_key, store_prefix, verify_members
from megatron_opsd.rollout.buckets import DEFAULT_BUCKET_BYTES


logger = init_logger(__name__)
COMMUNICATORS = {"gloo": "gloo", "opsd_nccl": "nccl"}  # vLLM backend name -> torch.distributed backend
END, ABORT = "end", "abort"


def sync_timeout_s(nbytes: int, base_s: float = 60.0, min_mb_per_s: float = 50.0) -> float:
    """Deadline for one update: a fixed part (rendezvous, HTTP, load) plus the bytes at a pessimistic rate."""
    return base_s + nbytes / (min_mb_per_s * 1e6)


def transfer_backend(on_gpu: bool) -> str:
    return "opsd_nccl" if on_gpu else "gloo"


def open_group(comm: str, host: str, port: int, rank: int, world_size: int, timeout_s: float, key: str):
    """A stateless group: its own TCPStore (rank 0 listens) and a gloo / NCCL backend object on it. Every key, the
    backend's rendezvous and ours, lives under a prefix derived from the rendezvous ``key`` (``auth.store_prefix``),
    and every member proves ``key`` to the others before the group is used (``auth.verify_members``)."""
    dist = torch.distributed
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    prefixed = dist.PrefixStore(store_prefix(key), store)
    if comm == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        group = dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    else:
        group = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    verify_members(group, key, rank, world_size, timeout_s, device="cuda" if comm == "nccl" else "cpu")
    return prefixed, group


# ---------------------------------------------------------------------------------------------------- wire info
@dataclass
class CollectiveInitInfo(WeightTransferInitInfo):
    """Worker side of the rendezvous (sent by the trainer through the sidecar)."""

    master_address: str
    master_port: int
    world_size: int  # 1 trainer sender + the sidecar's workers
    rank_offset: int = 1
    timeout_s: float = 300.0
    keep_previous: bool = True  # host copies of overwritten tensors until the update ends (rollback on abort)
    nonce: str = ""  # this rendezvous's nonce, from the trainer
    store_key: str = field(default="", repr=False)  # HMAC(secret, nonce), added by the sidecar (auth.rendezvous_key)


@dataclass
class CollectiveUpdateInfo(WeightTransferUpdateInfo):
    """One update: the announced tensors (validated before anything is sent) and the round's store keys."""

    round_id: str
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    timeout_s: float = 300.0

    def __post_init__(self):
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError("update_info: names, dtype_names and shapes must have the same length")

    def expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {n: (tuple(s), getattr(torch, d)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)}

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * getattr(torch, d).itemsize for d, s in zip(self.dtype_names, self.shapes))


def _key(round_id: str, *parts: Any) -> str:
    return "/".join([round_id, *map(str, parts)])


# nn.Module bookkeeping that vLLM's reload itself keeps consistent (parameters are re-registered in place)
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"})


class PreviousWeights:
    """What an update overwrites, kept so that an aborted update can put it back: host copies of the served
    tensors, taken just before vLLM's layerwise reload copies a layer's new values into them, and each
    overwritten layer's plain attributes as they were when the update started.

    vLLM has no rollback of its own. ``layerwise._copy_and_restore_kernel_tensors`` (called once a layer has all
    its tensors, and by ``finalize_layerwise_reload`` for partly loaded ones) is where served storage changes; it
    is looked up by name at call time, so it is wrapped while an update is open. The attributes matter where a
    kernel keeps weights outside the layer's tensors: on CPU, ``process_weights_after_loading`` binds
    ``layer.cpu_linear`` to a oneDNN handle packed from the new weights; on GPU the processed values live in the
    tensors (CUDA graphs hold their addresses), and the attributes only carry flags."""

    def __init__(self):
        self.copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (served tensor, host copy)
        self.attributes: dict[torch.nn.Module, dict] = {}  # layer -> its plain attributes at the start
        self.overwritten: dict[int, torch.nn.Module] = {}
        self._original = None

    def open(self, model: torch.nn.Module) -> None:
        from vllm.model_executor.model_loader.reload import layerwise

        self.close()
        self.attributes = {layer: {k: v for k, v in vars(layer).items() if k not in _MODULE_INTERNALS}
                           for layer in model.modules()}
        self._original = original = layerwise._copy_and_restore_kernel_tensors

        def copy_keeping_previous(layer, info):
            parameters, buffers = info.kernel_tensors
            for served in (*parameters.values(), *buffers.values()):
                if id(served) not in self.copies:
                    self.copies[id(served)] = (served, served.detach().to("cpu", copy=True))
            self.overwritten[id(layer)] = layer
            return original(layer, info)

        layerwise._copy_and_restore_kernel_tensors = copy_keeping_previous

    def restore(self) -> int:
        """Put every kept tensor and attribute back; returns how many tensors."""
        with torch.no_grad():
            for served, previous in self.copies.values():
                served.copy_(previous)
        for layer in self.overwritten.values():
            if layer not in self.attributes:  # not a module of the model at the update's start: nothing to put back
                continue
            before = self.attributes[layer]
            for key in [k for k in vars(layer) if k not in _MODULE_INTERNALS and k not in before]:
                delattr(layer, key)
            for key, value in before.items():
                object.__setattr__(layer, key, value)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(self.copies)

    def close(self) -> None:
        from vllm.model_executor.model_loader.reload import layerwise

        if self._original is not None:
            layerwise._copy_and_restore_kernel_tensors = self._original
            self._original = None
        self.copies, self.attributes, self.overwritten = {}, {}, {}


# ---------------------------------------------------------------------------------------------------- worker
class CollectiveWeightTransferEngine(WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]):
    """Runs in every vLLM worker (loaded through the ``vllm.general_plugins`` entry point)."""

    init_info_cls = CollectiveInitInfo
    update_info_cls = CollectiveUpdateInfo

    def __init__(self, config, vllm_config, device, model):
        super().__init__(config, vllm_config, device, model)
        self.comm = COMMUNICATORS[config.backend]
        self.store = self.group = None
        self.rank = -1
        self.loaded_any = False
        self.error = None  # why this worker's last update_weights failed
        self.keep_previous = True
        self.previous = PreviousWeights()

    def init_transfer_engine(self, init_info: CollectiveInitInfo) -> None:
        self.shutdown()
        self.keep_previous = init_info.keep_previous
        pc = self.parallel_config
        self.rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
        self.store, self.group = open_group(self.comm, init_info.master_address, init_info.master_port,
                                            self.rank, init_info.world_size, init_info.timeout_s, init_info.store_key)

    def start_weight_update(self) -> None:
        """vLLM's layerwise reload (as its nccl engine): each layer is re-processed once all its tensors arrived."""
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self.loaded_any = False
        if self.keep_previous:
            self.previous.open(self.model)
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Receive one update. A failure is kept in ``self.error`` (read by the sidecar through the worker
        extension's ``opsd_update_error``), not raised: vLLM's multiproc executor stops reading replies at the
        first worker that raised, which leaves the other workers' replies queued, and every later call at TP > 1
        would then read the reply of the call before it."""
        self.error = None
        try:
            self.receive_weights(self.parse_update_info(update_info))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001 - reported through opsd_update_error
            self.error = f"{type(err).__name__}: {err}"
            logger.warning("weight update failed on this worker: %s", self.error)

    def receive_weights(self, info: CollectiveUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("weight transfer group not initialised (POST /init_weight_transfer_engine first, "
                               "or the previous update broke it)")
        expected = info.expected()
        self.store.set_timeout(timedelta(seconds=info.timeout_s))
        self.store.set(_key(info.round_id, "ready", self.rank), "1")
        received: set[str] = set()
        index = 0
        while True:
            meta = json.loads(self.store.get(_key(info.round_id, "bucket", index)))
            if meta.get(ABORT):
                raise RuntimeError(f"trainer aborted the update: {meta[ABORT]}")
            if meta.get(END):
                break
            for name, shape in zip(meta["names"], meta["shapes"]):
                if name not in expected or tuple(shape) != expected[name][0]:
                    raise ValueError(f"bucket {index}: tensor {name!r} {shape} was not announced")
            dtypes = [expected[n][1] for n in meta["names"]]
            buffer = torch.empty(sum(meta["sizes"]), dtype=torch.uint8, device=self.device)
            self.group.broadcast(buffer, 0, timedelta(seconds=info.timeout_s)).wait(timedelta(seconds=info.timeout_s))
            self.loaded_any = True
            self.model.load_weights(unpack_tensor(buffer, meta["names"], meta["shapes"], dtypes, meta["sizes"]))
            received.update(meta["names"])
            index += 1
        missing = sorted(set(expected) - received)
        if missing:
            raise ValueError(f"{len(missing)} announced tensors never arrived, e.g. {missing[:3]}")
        verdict = self.store.get(_key(info.round_id, "commit")).decode()
        if verdict != "ok":
            raise RuntimeError(f"trainer did not commit the update: {verdict}")

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        self.previous.close()  # committed: the previous tensors are no longer needed

    def abort(self) -> bool:
        """End a failed update: vLLM's finalize gives layers that received nothing their tensors back, and the
        kept copies restore every layer that had been overwritten. Returns whether this worker is left with
        partly new weights (only without ``keep_previous``, after some bucket was loaded)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        try:
            finalize_layerwise_reload(self.model, self.model_config)
            if self.keep_previous:
                logger.warning("weight update aborted: restored the %d tensors it had overwritten",
                               self.previous.restore())
                return False
            return self.loaded_any
        except Exception:  # noqa: BLE001 - the session must end; report the weights as suspect instead
            logger.exception("weight update aborted, and ending it failed: the weights may be partly new")
            return True
        finally:
            self.previous.close()

    def shutdown(self) -> None:
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
    timeout_s: float = 300.0
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    keep_previous: bool = True  # the workers' rollback copies (CollectiveInitInfo.keep_previous)
    secret: str = field(default="", repr=False)  # the run's secret: each rendezvous's key is derived from it


@dataclass
class CollectiveNcclTrainerInitInfo(CollectiveTrainerInitInfo):
    backend: ClassVar[str] = "opsd_nccl"


class WeightTransferError(RuntimeError):
    """A collective weight push failed; the message says at which step and why."""


class CollectiveTrainerEngine(TrainerWeightTransferEngine[CollectiveTrainerInitInfo]):
    """Trainer side. ``client`` is a sidecar client with the four weight-sync calls (``SidecarWeightSyncClient``).

    ``send_weights(named_tensors, metadata, version)`` runs on the sending rank only; the other trainer ranks
    take part in the gather (``iter_hf_tensors``) outside, exactly as with the HTTP transport.
    """

    init_info_cls = CollectiveTrainerInitInfo

    def __init__(self, *, client, init_info: CollectiveTrainerInitInfo, is_sender: bool = True):
        super().__init__(client=client, source=None, is_sender=is_sender)
        self.init_info = init_info
        self.comm = COMMUNICATORS[init_info.backend]
        self.store = self.group = None

    @classmethod
    def trainer_init(cls, init_info: CollectiveTrainerInitInfo, *, client, source=None) -> "CollectiveTrainerEngine":
        engine = cls(client=client, init_info=init_info, is_sender=init_info.is_sender)
        if engine.is_sender:
            engine.connect()
        return engine

    def connect(self) -> None:
        """Open the group: the sidecar's workers join inside ``init_weight_transfer_engine``, concurrently."""
        info = self.init_info
        nonce = secrets.token_hex(16)  # one-time: the sidecar derives the same key from its secret
        worker_info = CollectiveInitInfo(info.master_address, info.master_port, info.world_size, 1, info.timeout_s,
                                         info.keep_previous, nonce=nonce)
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self.client.init_weight_transfer_engine, asdict(worker_info))
            try:
                self.store, self.group = open_group(self.comm, info.master_address, info.master_port, 0,
                                                    info.world_size, info.timeout_s,
                                                    rendezvous_key(info.secret, nonce))
            except Exception as err:
                raise WeightTransferError(f"weight transfer group on {info.master_address}:{info.master_port} "
                                          f"did not form within {info.timeout_s:.0f} s: {err}") from err
            future.result(timeout=info.timeout_s)

    def send_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], metadata: list[ParamMeta],
                     version: int) -> dict:
        """Push one update: announce and validate, wait for every worker, broadcast buckets, commit."""
        if self.group is None:  # broken by an earlier failure: a fresh rendezvous on a fresh port
            self.init_info.master_port = free_port()
            self.connect()
        info = CollectiveUpdateInfo(uuid.uuid4().hex[:12], [m.name for m in metadata],
                                    [str(m.dtype).removeprefix("torch.") for m in metadata],
                                    [list(m.shape) for m in metadata])
        info.timeout_s = sync_timeout_s(info.nbytes, base_s=self.init_info.timeout_s)
        start = time.perf_counter()
        self.client.start_weight_update(version=version, update_info=asdict(info))  # refusals happen here
        pool = ThreadPoolExecutor(1)
        reply: Future = pool.submit(self.client.update_weights, asdict(info))
        stats = dict(buckets=0, tensors=0, bytes=0)
        try:
            self._wait_ready(info, reply)
            for chunk in self._buckets(named_tensors, metadata):
                self._send(info, stats["buckets"], chunk)
                stats["buckets"] += 1
                stats["tensors"] += len(chunk.names)
                stats["bytes"] += chunk.packed_tensor.numel()
            if stats["tensors"] != len(metadata):
                raise WeightTransferError(f"the trainer sent {stats['tensors']} of the {len(metadata)} announced "
                                          "tensors")
            self.store.set(_key(info.round_id, "bucket", stats["buckets"]), json.dumps({END: True}))
            self.store.set(_key(info.round_id, "commit"), "ok")
            result = reply.result(timeout=info.timeout_s)
        except BaseException as err:
            self._abort(info, stats["buckets"], err, reply)
            raise self._explain(err, reply, version, info) from err
        finally:
            pool.shutdown(wait=False)  # a worker stuck in the group must not hang the trainer too
        self.client.finish_weight_update(version)
        return dict(stats, version=version, total_s=time.perf_counter() - start, timeout_s=info.timeout_s,
                    apply_s=result.get("apply_s", float("nan")) if isinstance(result, dict) else float("nan"))

    def _wait_ready(self, info: CollectiveUpdateInfo, reply: Future) -> None:
        keys = [_key(info.round_id, "ready", r) for r in range(1, self.init_info.world_size)]
        deadline = time.monotonic() + info.timeout_s
        while not self.store.check(keys):
            if reply.done():
                reply.result()  # the sidecar refused or failed before receiving: raise its error
                raise WeightTransferError("the sidecar answered before its workers were ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sidecar workers not ready to receive within {info.timeout_s:.0f} s")
            time.sleep(0.02)

    def _buckets(self, named_tensors, metadata: list[ParamMeta]) -> Iterator:
        announced = {m.name: m for m in metadata}

        def checked():
            for name, tensor in named_tensors:
                meta = announced.get(name)
                if meta is None or tuple(tensor.shape) != tuple(meta.shape):
                    raise WeightTransferError(f"tensor {name!r} {tuple(tensor.shape)} was not announced")
                yield name, tensor.detach().to(meta.dtype)

        stream = checked()
        while (chunk := pack_tensors(stream, lambda item: item[1], self.init_info.bucket_bytes)) is not None:
            yield chunk

    def _send(self, info: CollectiveUpdateInfo, index: int, chunk) -> None:
        meta = dict(names=chunk.names, shapes=chunk.shapes, sizes=chunk.tensor_sizes)
        self.store.set(_key(info.round_id, "bucket", index), json.dumps(meta))
        timeout = timedelta(seconds=info.timeout_s)
        self.group.broadcast(chunk.packed_tensor, 0, timeout).wait(timeout)

    def _abort(self, info: CollectiveUpdateInfo, index: int, err: BaseException, reply: Future) -> None:
        """Tell waiting workers to roll back; after a broken broadcast the group is rebuilt next time."""
        message = json.dumps({ABORT: f"{type(err).__name__}: {err}"[:500]})
        try:
            self.store.set(_key(info.round_id, "bucket", index), message)
            self.store.set(_key(info.round_id, "commit"), message)
        except Exception:  # noqa: BLE001 - the store's peers may be gone; the group is reset below anyway
            pass
        if isinstance(err, WeightTransferError):  # the group is intact: let the sidecar end its session first
            try:
                reply.result(timeout=min(info.timeout_s, 60.0))
            except Exception:  # noqa: BLE001 - its refusal is expected; the trainer's error is reported
                pass
        else:
            self.shutdown()

    def _explain(self, err: BaseException, reply: Future, version: int, info) -> WeightTransferError:
        detail = f"{type(err).__name__}: {err}"
        if reply.done() and reply.exception() is not None and reply.exception() is not err:
            detail += f"; sidecar: {reply.exception()}"
        return WeightTransferError(f"collective weight push v{version} ({info.nbytes / 1e6:.1f} MB, deadline "
                                   f"{info.timeout_s:.0f} s) failed: {detail}. The sidecar keeps its previous "
                                   "weights unless it died")

    def shutdown(self) -> None:
        self.group = self.store = None
