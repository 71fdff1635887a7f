"""One OPSD optimizer step on already-built micro-batches, through megatron's pipeline schedules.

A micro-batch is a dict of tensors for one side (student or teacher):
  tokens [b, L], position_ids [b, L]       the model inputs (padded to the step's common length L)
  rows [n]                                  flat indices into [b*L] of the logits that predict response tokens
  weights [n]                               per-token loss weights, already normalised over the whole step
Student row i and teacher row i predict the same response token (the realignment is done when building the
micro-batches), so the divergence compares like with like even when the teacher context is longer.

Loss normalisation: the step's loss is ``sum_t weights_t * D_t`` over every response token of the step
(``weights`` sum to 1 for token_mean and sequence_mean). Megatron's schedule divides each micro-batch loss by
the number of micro-batches and DDP averages gradients over data-parallel ranks, so each micro-batch's loss
is multiplied by ``num_microbatches * dp_size`` to undo both.
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
        rows, mb_weights = [], []
        for j in range(micro_batch_size):
            prompt, response = prompts[start + j], responses[start + j]
            if len(weights[start + j]) != len(response):
                raise ValueError(f"sequence {start + j}: {len(weights[start + j])} weights for "
                                 f"{len(response)} response tokens")
            seq = prompt + response
            tokens[j, : len(seq)] = torch.tensor(seq)
            first = j * length + len(prompt) - 1
            rows.append(torch.arange(first, first + len(response)))
            mb_weights.append(weights[start + j])
        microbatches.append({
            "tokens": tokens,
            "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, -1).contiguous(),
            "rows": torch.cat(rows),
            "weights": torch.cat(mb_weights).float(),
        })
    return microbatches


def _rows(logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1]).index_select(0, rows)


def _run_schedule(model_chunks: list, microbatches: list[dict], forward_step, *, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq_length = microbatches[0]["tokens"].shape[1]
    mbs = microbatches[0]["tokens"].shape[0]
    iterators = [iter(microbatches) for _ in model_chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(model_chunks) > 1 else iterators[0],
        model=model_chunks if len(model_chunks) > 1 else model_chunks[0],
        num_microbatches=len(microbatches), seq_length=seq_length, micro_batch_size=mbs,
        forward_only=forward_only)


@torch.no_grad()
def collect_teacher_rows(teacher_chunks: list, microbatches: list[dict]) -> list[Optional[torch.Tensor]]:
    """Teacher logits at the response rows of each micro-batch (local vocab shard), on the last PP stage.

    Other stages get an empty list. Only the response rows are kept, so memory is [tokens, V/TP] per step.
    """
    collected: list = []

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["tokens"], mb["position_ids"], attention_mask=None)

        def loss_func(logits):
            collected.append(_rows(logits, mb["rows"]).detach())
            return logits.new_zeros(()), {}

        return output, loss_func

    for chunk in teacher_chunks:
        chunk.eval()
    _run_schedule(teacher_chunks, microbatches, forward_step, forward_only=True)
    return collected


@dataclass
class LossSettings:
    kind: str = "reverse_kl"
    beta: float = 0.5
    temperature: float = 1.0
    token_clip: Optional[float] = None
    chunk_tokens: int = 1024


def student_forward_backward(ddp_chunks: list, microbatches: list[dict], teacher_rows: list, *,
                             loss: LossSettings, real_vocab_size: int, dp_size: int) -> list[dict]:
    """Forward + backward of the divergence to the stored teacher rows; returns per-micro-batch metrics."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    scale = len(microbatches) * dp_size
    vocab_range = (0, real_vocab_size)
    index = iter(range(len(microbatches)))

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        output = model(mb["tokens"], mb["position_ids"], attention_mask=None)

        def loss_func(logits):
            i = next(index)
            student = _rows(logits, mb["rows"])
            weights = mb["weights"]
            mask = weights > 0
            weighted, per_token = vocab_parallel_divergence(
                student, teacher_rows[i], kind=loss.kind, group=group, loss_mask=mask,
                temperature=loss.temperature, beta=loss.beta, token_clip=loss.token_clip,
                chunk_tokens=loss.chunk_tokens, vocab_range=vocab_range, reduction="sum", token_weights=weights)
            with torch.no_grad():
                entropy_s = vocab_parallel_entropy(student.detach(), group=group, vocab_range=vocab_range)
                entropy_t = vocab_parallel_entropy(teacher_rows[i], group=group, vocab_range=vocab_range)
            metrics = {
                "loss": weighted.detach().clone(),
                "divergence_sum": (per_token * mask).sum(),
                "student_entropy_sum": (entropy_s * mask).sum(),
                "teacher_entropy_sum": (entropy_t * mask).sum(),
                "tokens": mask.sum().float(),
            }
            return (weighted * scale).clone(), metrics

        return output, loss_func

    for chunk in ddp_chunks:
        chunk.train()
    return _run_schedule(ddp_chunks, microbatches, forward_step, forward_only=False)


# --------------------------------------------------------------------------------------------- teacher
def copy_weights_(dst_chunks: list, src_chunks: list) -> None:
    """Hard copy between two replicas sharded the same way (frozen init, refresh every M steps)."""
    from megatron_opsd.models.gpt import unwrap

    with torch.no_grad():
        for dst, src in zip(dst_chunks, src_chunks):
            for (name, p_dst), (_, p_src) in zip(unwrap(dst).named_parameters(), unwrap(src).named_parameters()):
                p_dst.copy_(p_src)


def ema_update_(ema_chunks: list, src_chunks: list, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * current, shard-local."""
    from megatron_opsd.models.gpt import unwrap

    with torch.no_grad():
        for dst, src in zip(ema_chunks, src_chunks):
            for p_dst, p_src in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
                p_dst.mul_(decay).add_(p_src, alpha=1.0 - decay)
