"""OPSD losses: vocab-parallel full-vocabulary divergences and logging helpers (see divergence.py)."""
from megatron_opsd.losses.divergence import vocab_parallel_divergence
from megatron_opsd.losses.vocab_parallel import vocab_parallel_entropy

__all__ = ["vocab_parallel_divergence", "vocab_parallel_entropy"]
