"""vLLM general plugin (entry point ``vllm.general_plugins``): vLLM calls ``register`` in every process it starts."""

COLLECTIVE_MODULE = "megatron_opsd.rollout.worker.collective"
ENGINE_NAMES = ("gloo", "opsd_nccl")  # vLLM backend names (rollout/transfer.py COMMUNICATORS)


def register() -> None:
    """Register the workers' weight-transfer engine (``gloo`` on CPU, ``opsd_nccl`` on GPU) with vLLM's engine factory.

    Idempotent: vLLM may load plugins more than once in a process, and ``worker/extension.py`` calls it too. The
    trainer's engine is registered by the trainer (``client/collective.register_trainer_engines``).
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for name in ENGINE_NAMES:
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, COLLECTIVE_MODULE, "CollectiveWeightTransferEngine")
