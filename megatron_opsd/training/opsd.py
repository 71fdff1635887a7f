"""One OPSD optimizer step on already-built micro-batches, through megatron's pipeline schedules.

A micro-batch is a dict of tensors for one side (student or teacher):
  tokens [b, L], position_ids [b, L]       the model inputs (padded to the step's common length L)
  row_mask [b, L] (bool)                    the logits that predict response tokens (row-major order = token order)
  weights [n]                               per-token loss weights, already normalised over the whole step
Student row i and teacher row i predict the same response token (the realignment is done when building the
micro-batches), so the divergence compares like with like even when the teacher context is longer.

Loss normalisation: the step's loss is ``sum_t weights_t * D_t`` over every response token of the step
(``weights`` sum to 1 for token_mean and sequence_mean), so the schedule runs with ``loss_reduction="sum"``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_opsd.losses import vocab_parallel_divergence, vocab_parallel_entropy


def token_weights(response_lengths: list[int], reduction: str) -> list[torch.Tensor]:
    """Per-token weights for each sequence so the step's loss is a token mean / sequence mean / sum."""
    total = sum(response_lengths)
    sequences = sum(1 for n in response_lengths if n > 0)
    out = []
    for n in response_lengths:
        if reduction == "token_mean":
            w = 1.0 / max(total, 1)
        elif reduction == "sequence_mean":
            w = 1.0 / (max(n, 1) * max(sequences, 1))
        elif reduction == "sum":
            w = 1.0
        else:
            raise ValueError(f"loss.reduction={reduction!r}: choose token_mean, sequence_mean or sum")
        out.append(torch.full((n,), w, dtype=torch.float32))
    return out


def build_microbatches(prompts: list[list[int]], responses: list[list[int]], weights: list[torch.Tensor], *,
                       micro_batch_size: int, pad_id: int, pad_multiple: int = 8, dp_size: int = 1,
                       dp_rank: int = 0) -> list[dict]:
    """This DP rank's micro-batches for one side (student or teacher) of the step.

    Sequence i is ``prompts[i] + responses[i]``; the logit at position p predicts token p+1, so response token
    t is predicted by row ``len(prompts[i]) - 1 + t``. All micro-batches are padded to one length (megatron's
    schedules need fixed shapes), and the sequence count is padded with zero-weight dummies to a multiple of
    ``micro_batch_size * dp_size`` so every DP rank runs the same number of micro-batches.
    """
    if not (len(prompts) == len(responses) == len(weights)):
        raise ValueError("prompts, responses and weights must have one entry per sequence")
    prompts, responses, weights = list(prompts), list(responses), list(weights)
    group = micro_batch_size * dp_size
    while len(prompts) % group:
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
        microbatches.append({
            "tokens": tokens,
            "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, -1).contiguous(),
            "row_mask": row_mask,
            "weights": torch.cat(mb_weights).float(),
        })
    return microbatches


def collect_teacher_rows(teacher_chunks: list, microbatches: list[dict]) -> Optional[list]:
    """Teacher logits at the response rows of each micro-batch (local vocab shard), on the last PP stage
    (None elsewhere). Only the response rows are kept, so memory is [response tokens, V/TP] per step."""
    from megatron_opsd.training.schedule import collect_logits

    for chunk in teacher_chunks:
        chunk.eval()
    tokens = microbatches[0]["tokens"]
    return collect_logits(teacher_chunks, microbatches, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
                          gather_positions_key="row_mask")


@dataclass
class LossSettings:
    kind: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    token_clip: Optional[float] = None
    chunk_tokens: int = 1024


def student_forward_backward(ddp_chunks: list, microbatches: list[dict], teacher_rows: Optional[list], *,
                             loss: LossSettings, real_vocab_size: int):
    """Forward + backward of the divergence to the stored teacher rows (``schedule.ForwardBackwardOutput``)."""
    from megatron.core import parallel_state as ps

    from megatron_opsd.training.schedule import forward_backward

    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    vocab_range = (0, real_vocab_size)
    teacher_by_batch = {id(mb): rows for mb, rows in zip(microbatches, teacher_rows or [])}

    def loss_fn(logits: torch.Tensor, mb: dict):
        student, teacher = logits[mb["row_mask"]], teacher_by_batch[id(mb)]
        mask = mb["weights"] > 0
        weighted, per_token = vocab_parallel_divergence(
            student, teacher, kind=loss.kind, group=group, loss_mask=mask, temperature=loss.temperature,
            beta=loss.beta, token_clip=loss.token_clip, chunk_tokens=loss.chunk_tokens, vocab_range=vocab_range,
            reduction="sum", token_weights=mb["weights"])
        with torch.no_grad():
            entropy_s = vocab_parallel_entropy(student.detach(), group=group, vocab_range=vocab_range)
            entropy_t = vocab_parallel_entropy(teacher, group=group, vocab_range=vocab_range)
        return weighted, {"divergence_sum": (per_token * mask).sum(), "student_entropy_sum": (entropy_s * mask).sum(),
                          "teacher_entropy_sum": (entropy_t * mask).sum(), "tokens": mask.sum().float()}

    for chunk in ddp_chunks:
        chunk.train()
    tokens = microbatches[0]["tokens"]
    return forward_backward(ddp_chunks, microbatches, loss_fn, seq_length=tokens.shape[1],
                            micro_batch_size=tokens.shape[0], loss_reduction="sum")
