"""One OPSD optimizer step on already-built micro-batches, through megatron's pipeline schedules.

A micro-batch is a dict of tensors for one side (student or teacher):
  tokens [b, L], position_ids [b, L]       the model inputs (padded to the step's common length L)
  row_mask [b, L] (bool)                    the logits that predict response tokens (row-major order = token order)
  weights [n]                               per-token loss weights, already normalised over the whole step
Student row i and teacher row i predict the same response token (the realignment is done when building the
micro-batches), so the divergence compares like with like even when the teacher context is longer.

Loss normalisation: the step's loss is ``sum_t weights_t * D_t`` over every response token of the step
(``weights`` sum to 1 for token_mean and sequence_mean), so the schedule runs with ``loss_reduction="sum"``.

What the student is pulled towards (``LossSettings.target``) and how (``LossSettings.kind``):
  teacher   the teacher's logits (``teacher.context``)
  pmi       Purified OPSD: the PMI target built from three teacher forwards (context, reference_only, base)
            before the student forward (``teacher_signals``), so one [tokens, V/TP] tensor is kept, not three
  demopsd   DemoPSD: the barycenter of the teacher and the student's own (detached) distribution, built in the
            loss function from the student's logits of this very forward
  kinds     reverse_kl | forward_kl | jsd over the full vocabulary; topk over the target's top-k (+ tail);
            k1 | k3 | pg on the sampled response tokens only (losses/sampled.py)
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Callable, ContextManager, Optional

import torch

from megatron_opsd.config import DEFAULT_DEMOPSD_BETA
from megatron_opsd.losses import (
    demopsd_target_logprobs,
    pmi_target_logprobs,
    sampled_token_loss,
    topk_divergence,
    vocab_parallel_divergence,
    vocab_parallel_entropy,
    vocab_parallel_token_logprobs,
    vocab_parallel_topk,
)
from megatron_opsd.parallel.device import to_device


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
    ``micro_batch_size * dp_size`` so every DP rank runs the same number of micro-batches. Built on the host,
    returned on the current device (``parallel.device.to_device``: the one place OPSD and GRPO batches move).
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
        microbatches.append(to_device({
            "tokens": tokens,
            "position_ids": torch.arange(length).unsqueeze(0).expand(micro_batch_size, -1).contiguous(),
            "row_mask": row_mask,
            "weights": torch.cat(mb_weights).float(),
        }))
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


def teacher_signal_source(teacher_model: Callable[[str], list], teacher_mbs: dict, student_mbs: list, *,
                          loss: "LossSettings", real_vocab_size: int,
                          teacher_scope: Callable[[str], ContextManager] = lambda context: nullcontext()):
    """What ``student_forward_backward`` reads the teacher from: per micro-batch at PP=1, per step at PP > 1.

    ``teacher_mbs`` maps each teacher context to its micro-batches (``teacher_signals``' order) and
    ``teacher_model(context)`` gives the model chunks that run that context (Purified OPSD's reference-only and
    base forwards run the frozen initial model, not the teacher replica); each forward of ``context`` runs inside
    ``teacher_scope(context)`` (LoRA: the adapters that context uses). At PP=1 the
    teacher forward of micro-batch i runs inside the student's loss for micro-batch i (a callable ``i -> signal``),
    so one micro-batch's teacher rows are alive at a time, as ``megatron-opsd plan`` assumes. At PP > 1 the
    teacher's forward is itself a pipeline and cannot run inside the student's 1F1B schedule: every micro-batch's
    teacher rows are collected first (a list), which the planner counts for PP > 1.
    """
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1:
        rows = {}
        for ctx, mbs in teacher_mbs.items():
            with teacher_scope(ctx):
                rows[ctx] = collect_teacher_rows(teacher_model(ctx), mbs)
        return teacher_signals(rows, student_mbs, loss=loss, real_vocab_size=real_vocab_size)

    def signal_for(index: int) -> dict:
        rows = {}
        for ctx, mbs in teacher_mbs.items():
            with teacher_scope(ctx):
                rows[ctx] = [_teacher_rows(teacher_model(ctx)[0], mbs[index])]
        return teacher_signals(rows, [student_mbs[index]], loss=loss, real_vocab_size=real_vocab_size)[0]

    return signal_for


@torch.no_grad()
def _teacher_rows(chunk, mb: dict) -> torch.Tensor:
    """A no-grad forward of one teacher micro-batch (PP=1) in eval mode, kept at its response rows only. The
    chunk may be the student itself (teacher.weights=live): its training mode is restored."""
    from megatron_opsd.training.schedule import model_forward, select_positions

    was_training = chunk.training
    chunk.eval()
    try:
        return select_positions(model_forward(chunk, mb), mb["row_mask"])
    finally:
        chunk.train(was_training)


@dataclass
class LossSettings:
    kind: str = "reverse_kl"  # reverse_kl | forward_kl | jsd | topk | k1 | k3 | pg
    beta: float = 0.5
    temperature: float = 1.0
    token_clip: Optional[float] = None
    chunk_tokens: int = 1024
    target: str = "teacher"  # teacher | pmi | demopsd
    top_k: Optional[int] = None  # kind=topk
    topk_tail: bool = True
    topk_divergence: str = "reverse_kl"
    pmi_beta: float = 1.0
    pmi_clip: float = 10.0
    pmi_center: str = "uniform"
    demopsd_alpha_max: float = 0.15
    demopsd_beta: float = DEFAULT_DEMOPSD_BETA

    @classmethod
    def from_config(cls, cfg) -> "LossSettings":
        """From an ``OPSDConfig``: every field of the same name in ``loss``, the PMI ones from ``teacher``."""
        from_teacher = {"pmi_beta", "pmi_clip", "pmi_center"}
        return cls(**{f.name: getattr(cfg.teacher if f.name in from_teacher else cfg.loss, f.name)
                      for f in fields(cls)})


SAMPLED = ("k1", "k3", "pg")


def tp_group():
    """The tensor-parallel group the vocabulary is sharded over, or None at TP=1 (the losses' one-process path)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None


def response_token_ids(mb: dict) -> torch.Tensor:
    """The token each response row of micro-batch ``mb`` predicts (row p predicts token p + 1)."""
    return torch.roll(mb["tokens"], -1, dims=1)[mb["row_mask"]]


def teacher_signals(teacher_rows: dict, microbatches: list[dict], *, loss: LossSettings,
                    real_vocab_size: int) -> Optional[list[dict]]:
    """Per student micro-batch, what its loss needs from the teacher forwards (last PP stage; None elsewhere).

    ``teacher_rows`` maps each teacher context to ``collect_teacher_rows``' output; the first entry is the
    privileged teacher (``teacher.context``), then ``reference_only`` and ``base`` for Purified OPSD. Returns
    dicts with ``target`` [n, V/TP] (teacher logits, or target log-probs when ``is_logprobs``), or, where the
    target does not depend on the student, only the compact part the loss reads: ``topk`` (kind=topk) or
    ``token_logprobs`` [n] (k1/k3/pg); plus ``teacher_entropy_sum`` (the privileged teacher's, for logging).
    """
    rows = list(teacher_rows.values())
    if rows[0] is None:
        return None
    group, vocab_range = tp_group(), (0, real_vocab_size)
    signals = []
    for i, mb in enumerate(microbatches):
        teacher, mask = rows[0][i], mb["weights"] > 0
        entropy = vocab_parallel_entropy(teacher, group=group, vocab_range=vocab_range, chunk_tokens=loss.chunk_tokens)
        signal = {"target": teacher, "is_logprobs": False, "teacher_entropy_sum": (entropy * mask).sum()}
        if loss.target == "pmi":
            full, reference_only, base = (r[i] for r in rows)
            signal["target"] = pmi_target_logprobs(full, reference_only, base, group=group, vocab_range=vocab_range,
                                                   temperature=loss.temperature, clip=loss.pmi_clip, beta=loss.pmi_beta,
                                                   center=loss.pmi_center, chunk_tokens=loss.chunk_tokens)
            signal["is_logprobs"] = True
        if loss.target != "demopsd":  # otherwise the target needs the student's logits: see student_loss
            if loss.kind == "topk":
                signal["topk"] = _topk(signal, loss, group, vocab_range)
                del signal["target"]
            elif loss.kind in SAMPLED:
                signal["token_logprobs"] = _token_logprobs(signal, response_token_ids(mb), loss, group, vocab_range)
                del signal["target"]
        signals.append(signal)
    return signals


def _topk(signal: dict, loss: LossSettings, group, vocab_range):
    temperature = 1.0 if signal["is_logprobs"] else loss.temperature
    return vocab_parallel_topk(signal["target"], loss.top_k, group=group, vocab_range=vocab_range,
                               temperature=temperature, chunk_tokens=loss.chunk_tokens)


def _token_logprobs(signal: dict, ids: torch.Tensor, loss: LossSettings, group, vocab_range) -> torch.Tensor:
    temperature = 1.0 if signal["is_logprobs"] else loss.temperature
    with torch.no_grad():
        return vocab_parallel_token_logprobs(signal["target"], ids, group=group, vocab_range=vocab_range,
                                             temperature=temperature, chunk_tokens=loss.chunk_tokens)


def student_loss(student: torch.Tensor, signal: dict, mb: dict, *, loss: LossSettings, real_vocab_size: int):
    """(weighted loss with grad to ``student`` [n, V/TP], per-token divergence [n] detached) for one micro-batch."""
    group, vocab_range = tp_group(), (0, real_vocab_size)
    mask, weights = mb["weights"] > 0, mb["weights"]
    if loss.target == "demopsd":  # the barycenter of the teacher and this forward's (detached) student
        signal = {**signal, "is_logprobs": True, "target": demopsd_target_logprobs(
            student, signal["target"], group=group, vocab_range=vocab_range, temperature=loss.temperature,
            alpha_max=loss.demopsd_alpha_max, beta=loss.demopsd_beta, chunk_tokens=loss.chunk_tokens)}
    common = dict(group=group, loss_mask=mask, temperature=loss.temperature, chunk_tokens=loss.chunk_tokens,
                  vocab_range=vocab_range, reduction="sum", token_weights=weights)
    if loss.kind == "topk":
        top = signal["topk"] if "topk" in signal else _topk(signal, loss, group, vocab_range)
        return topk_divergence(student, top, kind=loss.topk_divergence, tail=loss.topk_tail, beta=loss.beta,
                               token_clip=loss.token_clip, **common)
    if loss.kind in SAMPLED:
        ids = response_token_ids(mb)
        teacher_lp = (signal["token_logprobs"] if "token_logprobs" in signal
                      else _token_logprobs(signal, ids, loss, group, vocab_range))
        student_lp = vocab_parallel_token_logprobs(student, ids, group=group, vocab_range=vocab_range,
                                                   temperature=loss.temperature, chunk_tokens=loss.chunk_tokens)
        return sampled_token_loss(student_lp, teacher_lp, estimator=loss.kind, loss_mask=mask, reduction="sum",
                                  token_weights=weights)
    return vocab_parallel_divergence(student, signal["target"], kind=loss.kind, beta=loss.beta,
                                     token_clip=loss.token_clip, teacher_is_logprobs=signal["is_logprobs"], **common)


def student_forward_backward(ddp_chunks: list, microbatches: list[dict], signals: Optional[list], *,
                             loss: LossSettings, real_vocab_size: int):
    """Forward + backward of the loss to the teacher signals (``schedule.ForwardBackwardOutput``).

    ``signals``: ``teacher_signals``' output, (plain OPSD) the list of teacher rows from ``collect_teacher_rows``
    itself, or a callable ``index -> signal`` run in micro-batch ``index``'s loss (``teacher_signal_source``).
    """
    from megatron_opsd.training.schedule import forward_backward

    group, vocab_range = tp_group(), (0, real_vocab_size)
    index_of = {id(mb): i for i, mb in enumerate(microbatches)}
    if callable(signals):
        signal_at = signals
    else:
        listed = [s if isinstance(s, dict) else {"target": s, "is_logprobs": False} for s in signals or []]
        signal_at = listed.__getitem__

    def loss_fn(logits: torch.Tensor, mb: dict):
        student, signal = logits[mb["row_mask"]], signal_at(index_of[id(mb)])
        mask = mb["weights"] > 0
        weighted, per_token = student_loss(student, signal, mb, loss=loss, real_vocab_size=real_vocab_size)
        with torch.no_grad():
            entropy_s = vocab_parallel_entropy(student.detach(), group=group, vocab_range=vocab_range,
                                               chunk_tokens=loss.chunk_tokens)
            teacher_entropy = signal.get("teacher_entropy_sum")
            if teacher_entropy is None:
                teacher_entropy = (vocab_parallel_entropy(signal["target"], group=group, vocab_range=vocab_range,
                                                          chunk_tokens=loss.chunk_tokens) * mask).sum()
        return weighted, {"divergence_sum": (per_token * mask).sum(), "student_entropy_sum": (entropy_s * mask).sum(),
                          "teacher_entropy_sum": teacher_entropy, "tokens": mask.sum().float()}

    for chunk in ddp_chunks:
        chunk.train()
    tokens = microbatches[0]["tokens"]
    return forward_backward(ddp_chunks, microbatches, loss_fn, seq_length=tokens.shape[1],
                            micro_batch_size=tokens.shape[0], loss_reduction="sum")
