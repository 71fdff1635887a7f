"""OPSD losses: vocab-parallel full-vocabulary divergences, sampled-token estimators, teacher top-k divergences,
Purified-OPSD (PMI) and DemoPSD target builders, entropy logging, per-token reduction weights, and the one
dispatch from a ``LossConfig`` (target x coverage x divergence) to them (objective.py).

The vocabulary is never gathered: every function takes this rank's [..., vocab_shard] logits and the
tensor-parallel ``group`` (None = single process) and works in fp32 token chunks (see divergence.py).
"""
from megatron_opsd.losses.divergence import vocab_parallel_divergence
from megatron_opsd.losses.objective import Objective, Target, TeacherSignal
from megatron_opsd.losses.sampled import (sampled_token_loss, truncated_importance_ratio, vocab_parallel_logprobs_at,
                                         vocab_parallel_token_logprobs)
from megatron_opsd.losses.targets import demopsd_target_logprobs, pmi_target_logprobs
from megatron_opsd.losses.topk import TeacherTopK, topk_divergence, vocab_parallel_bucket_logprobs, vocab_parallel_topk
from megatron_opsd.losses.vocab_parallel import vocab_parallel_entropy
from megatron_opsd.losses.weights import reduction_weights, token_weights

__all__ = [
    "Objective",
    "Target",
    "TeacherSignal",
    "reduction_weights",
    "token_weights",
    "vocab_parallel_divergence",
    "sampled_token_loss",
    "truncated_importance_ratio",
    "vocab_parallel_logprobs_at",
    "vocab_parallel_token_logprobs",
    "vocab_parallel_entropy",
    "TeacherTopK",
    "topk_divergence",
    "vocab_parallel_bucket_logprobs",
    "vocab_parallel_topk",
    "pmi_target_logprobs",
    "demopsd_target_logprobs",
]
