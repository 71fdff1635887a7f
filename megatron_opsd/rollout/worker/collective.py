"""The vLLM workers' end of the ``collective`` weight transport (``rollout/transfer.py`` has the wire both ends run).

``CollectiveWeightTransferEngine`` runs in every vLLM worker: vLLM builds it through its
``WeightTransferEngineFactory`` under the names ``gloo`` / ``opsd_nccl`` (``worker/vllm_plugin.py``); the sidecar
drives it with ``collective_rpc`` (``init_weight_transfer_engine``, ``start_weight_update``, ``update_weights``,
``finish_weight_update``, and the extension's ``opsd_update_error`` / ``opsd_abort_weight_update``).
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.distributed.weight_transfer.base import WeightTransferEngine
from vllm.distributed.weight_transfer.packed_tensor import unpack_tensor
from vllm.logger import init_logger

from megatron_opsd.rollout.transfer import (COMMUNICATORS, IN_FLIGHT, CollectiveInitInfo, CollectiveUpdateInfo,
                                            PeerFailed, close_group, open_group, plan_buckets, report_failure,
                                            round_key, wait_key, wait_work)

logger = init_logger(__name__)


class CollectiveWeightTransferEngine(WeightTransferEngine[CollectiveInitInfo, CollectiveUpdateInfo]):
    """Runs in every vLLM worker (registered by ``worker/vllm_plugin.register``)."""

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
        self.store.set(round_key(info.round_id, "ready", self.rank), "1")
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
        self.store.set(round_key(info.round_id, "done", self.rank), "1")
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
