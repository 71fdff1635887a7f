"""megatron_opsd: on-policy self-distillation for reasoning LLMs on megatron-core."""

__version__ = "0.1.0"
