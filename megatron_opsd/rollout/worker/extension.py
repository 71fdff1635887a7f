"""Methods vLLM adds to each of its workers (``--worker-extension-cls``); the sidecar calls them by name through
``EngineClient.collective_rpc``, so they run on every TP worker, in whatever process vLLM put it.

Importing this module registers the workers' weight-transfer engine (``vllm_plugin.register``): vLLM resolves the
extension class in ``init_worker`` (vllm/v1/worker/worker_base.py: ``worker_extension_cls =
resolve_obj_by_qualname(parallel_config.worker_extension_cls)``) before the worker builds its engine
(vllm/v1/worker/gpu_worker.py: ``self.weight_transfer_engine = WeightTransferEngineFactory.create_engine(...)``), so
the engine is found even where the package's ``vllm.general_plugins`` entry point is missing or stale (an editable
install made before a module moved).
"""
from __future__ import annotations

from megatron_opsd.rollout.worker.collective import abort_weight_update, update_error
from megatron_opsd.rollout.worker.vllm_plugin import register

register()


class SidecarWorkerExtension:
    def opsd_load_weights(self, paths: list[str]):
        """Reload weights in place from staged safetensors files (HF names, full tensors: each TP worker keeps
        its own shard through the model's ``load_weights``). Returns None, or why it failed: raising would leave
        the other TP workers' replies queued in vLLM's executor (see ``worker/collective.update_weights``)."""
        from safetensors import safe_open

        def tensors():
            for path in paths:
                with safe_open(path, framework="pt") as handle:
                    for name in handle.keys():
                        yield name, handle.get_tensor(name)

        try:
            self.reload_weights(weights_iterator=tensors())
        except Exception as err:  # noqa: BLE001 - returned to the sidecar, which raises it
            return f"{type(err).__name__}: {err}"
        return None

    def opsd_update_error(self):
        """Why this worker's last collective ``update_weights`` failed, or None."""
        return update_error(self)

    def opsd_abort_weight_update(self) -> bool:
        """End a failed collective update session; whether this worker had loaded some bucket already."""
        return abort_weight_update(self)
