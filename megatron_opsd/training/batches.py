"""The micro-batches of prompt + response sequences that OPSD and GRPO train on (SFT builds its own from
conversations: ``training/sft/data.py``).

A micro-batch is a dict of tensors for one side (student or teacher):
  tokens [b, L], position_ids [b, L]       the model inputs (padded to the step's common length L)
  row_mask [b, L] (bool)                    the logits that predict response tokens (row-major order = token order)
  weights [n]                               per-token loss weights, already normalised over the whole step
and ``index`` (int), its position in the step's list, which a loss function reads to find its per-micro-batch
state (OPSD's teacher signal, GRPO's reference rows). Other per-token values (GRPO's advantages and behaviour
log-probs, OPSD's sampling log-probs) are stored beside ``weights`` in the same layout (``add_per_token``).
Student row i and teacher row i predict the same response token (the realignment is done when building the
micro-batches), so a divergence compares like with like even when the teacher context is longer.
"""
from __future__ import annotations

import torch

from megatron_opsd.parallel.device import to_device

__all__ = ["add_per_token", "response_microbatches", "response_token_ids"]


def response_microbatches(prompts: list[list[int]], responses: list[list[int]], weights: list[torch.Tensor], *,
                          micro_batch_size: int, pad_id: int, pad_multiple: int = 8, microbatch_multiple: int = 1,
                          dp_size: int = 1, dp_rank: int = 0) -> list[dict]:
    """This DP rank's micro-batches for one side (student or teacher) of the step.

    Sequence i is ``prompts[i] + responses[i]``; the logit at position p predicts token p+1, so response token
    t is predicted by row ``len(prompts[i]) - 1 + t``. All micro-batches are padded to one length (megatron's
    schedules need fixed shapes), and the sequence count is padded with zero-weight dummies to a multiple of
    ``micro_batch_size * dp_size * microbatch_multiple`` so every DP rank runs the same number of micro-batches,
    a multiple of ``microbatch_multiple`` (``ParallelConfig.microbatch_multiple``: PP for an interleaved
    pipeline, whose schedule refuses other counts; how many rollouts a filter keeps varies). Built on the host,
    returned on the current device (``parallel.device.to_device``: the one place OPSD and GRPO batches move).
    """
    if not (len(prompts) == len(responses) == len(weights)):
        raise ValueError("prompts, responses and weights must have one entry per sequence")
    prompts, responses, weights = list(prompts), list(responses), list(weights)
    group = micro_batch_size * dp_size
    while len(prompts) % (group * microbatch_multiple):
        prompts.append([pad_id])
        responses.append([pad_id])
        weights.append(torch.zeros(1))
    longest = max(len(p) + len(r) for p, r in zip(prompts, responses))
    length = -(-longest // pad_multiple) * pad_multiple
    microbatches = []
    for start in range(dp_rank * micro_batch_size, len(prompts), group):
        tokens = torch.full((micro_batch_size, length), pad_id, dtype=torch.long)
        row_mask = torch.zeros((micro_batch_size, length), dtype=torch.bool)
        mb_weights = []
        for j in range(micro_batch_size):
            prompt, response = prompts[start + j], responses[start + j]
            if len(weights[start + j]) != len(response):
                raise ValueError(f"sequence {start + j}: {len(weights[start + j])} weights for "
                                 f"{len(response)} response tokens")
            seq = prompt + response
            tokens[j, : len(seq)] = torch.tensor(seq)
            row_mask[j, len(prompt) - 1: len(prompt) - 1 + len(response)] = True
            mb_weights.append(weights[start + j])
        microbatches.append(to_device({
            "index": len(microbatches),
            "tokens": tokens,
            "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, -1).contiguous(),
            "row_mask": row_mask,
            "weights": torch.cat(mb_weights).float(),
        }))
    return microbatches


def add_per_token(microbatches: list[dict], key: str, prompts: list, responses: list, values: list,
                  **layout) -> None:
    """Store ``values`` (one tensor per response, one value per token) as ``mb[key]`` in the micro-batches'
    response-row layout (the same padding and DP split as ``response_microbatches``' weights)."""
    for mb, other in zip(microbatches, response_microbatches(prompts, responses, values, **layout)):
        mb[key] = other["weights"]


def response_token_ids(mb: dict) -> torch.Tensor:
    """The token each response row of micro-batch ``mb`` predicts (row p predicts token p + 1)."""
    return torch.roll(mb["tokens"], -1, dims=1)[mb["row_mask"]]
