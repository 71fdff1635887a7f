"""megatron-core's local (no Transformer Engine) GPT spec, with a norm that runs under sequence parallelism.

megatron-core 0.16.1's local spec builds every norm as ``WrappedTorchNorm`` (torch ``RMSNorm`` / ``LayerNorm``),
which asserts "sequence parallel not supported by torch LayerNorm"; its final-norm fallback with apex installed
(``FusedLayerNorm``) refuses RMSNorm. So on CPU, and on a GPU without Transformer Engine,
``parallel.sequence_parallel`` could not build. Nothing in a per-token norm depends on how the sequence is
split, so the forward is unchanged; what sequence parallelism changes is the weight gradient: each TP rank
sees only its ``seq / TP`` tokens, so it holds a partial sum. ``SequenceParallelTorchNorm`` marks its
parameters ``sequence_parallel`` exactly as megatron's ``FusedLayerNorm`` and TE's norms do, and megatron's
``finalize_model_grads`` (``_allreduce_non_tensor_model_parallel_grads``) then sums those gradients over the TP
group. The q/k norms (Qwen3) are summed across TP with or without sequence parallelism (each rank normalises only
its heads), by megatron's name rule for ``qk_layernorm``.

The Transformer Engine spec is not touched: ``TENorm`` handles sequence parallelism itself.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Optional

import torch


class SequenceParallelTorchNorm:
    """megatron's ``WrappedTorchNorm`` (same checks, same torch module) that also accepts sequence parallelism,
    with its parameters marked ``sequence_parallel`` when the config enables it."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, persist_layer_norm: bool = False,
                zero_centered_gamma: bool = False, normalization: str = "LayerNorm") -> torch.nn.Module:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        # WrappedTorchNorm's only objection to sequence parallelism is the gradient reduction handled below.
        unsplit = copy.copy(config)
        unsplit.sequence_parallel = False
        norm = WrappedTorchNorm(unsplit, hidden_size, eps=eps, persist_layer_norm=persist_layer_norm,
                                zero_centered_gamma=zero_centered_gamma, normalization=normalization)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", config.sequence_parallel)
        return norm


def local_block_spec(config, vp_stage: Optional[int] = None):
    """The decoder block of this (virtual) pipeline stage: megatron's local layer spec with every norm (input,
    pre-MLP, q/k and the final norm) a ``SequenceParallelTorchNorm``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization)
    attention = layer.submodules.self_attention
    qk_norm = SequenceParallelTorchNorm if config.qk_layernorm else IdentityOp
    attention = replace(attention, submodules=replace(attention.submodules, q_layernorm=qk_norm, k_layernorm=qk_norm))
    layer = replace(layer, submodules=replace(layer.submodules, input_layernorm=SequenceParallelTorchNorm,
                                              pre_mlp_layernorm=SequenceParallelTorchNorm, self_attention=attention))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=SequenceParallelTorchNorm)
