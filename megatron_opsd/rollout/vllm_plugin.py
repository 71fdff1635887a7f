"""vLLM general plugin (entry point ``vllm.general_plugins``): vLLM calls ``register`` in every process it starts."""

COLLECTIVE_MODULE = "megatron_opsd.rollout.collective"


def register() -> None:
    """Register our weight-transfer engines (``gloo`` on CPU, ``opsd_nccl`` on GPU) with both vLLM factories.

    Idempotent: the trainer calls it too, and vLLM may load plugins more than once in a process.
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for name in ("gloo", "opsd_nccl"):
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(name, COLLECTIVE_MODULE, "CollectiveWeightTransferEngine")
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(name, COLLECTIVE_MODULE, "CollectiveTrainerEngine")
