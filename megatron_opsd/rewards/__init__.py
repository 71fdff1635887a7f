"""Verifiers (math-verify, exact match, user callables), boxed-answer extraction and group filters.

Light on import: names are resolved lazily, and math-verify is imported only when first used.
"""
import importlib

_EXPORTS = {
    "extract_boxed_answer": "megatron_opsd.rewards.boxed",
    "build_reward": "megatron_opsd.rewards.build",
    "load_callable": "megatron_opsd.rewards.build",
    "MathVerifier": "megatron_opsd.rewards.math",
    "ExactVerifier": "megatron_opsd.rewards.exact",
    "group_filter": "megatron_opsd.rewards.filters",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megatron_opsd.rewards' has no attribute {name!r}")
