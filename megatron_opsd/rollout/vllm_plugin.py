"""vLLM general plugin (entry point ``vllm.general_plugins``): vLLM calls ``register`` in every process it starts."""


def register() -> None:
    """Register megatron-opsd's additions with vLLM (nothing yet)."""
