"""Student and teacher token sequences for a batch of rollouts, with the response tokens realigned.

Student row b = chat(student prompt) + response tokens; teacher row b = chat(teacher context) + the *same*
response tokens. The prompts have different lengths, so response token t sits at a different index in
each. For every response token kept in the loss, the batch records the index of the logit that predicts
it (the logit at position i predicts token i+1):

    student_logits[b, student_pos[b, t]]  and  teacher_logits[b, teacher_pos[b, t]]  both predict y_t.

Layout: right padding to the longest row, length rounded up to ``pad_to_multiple_of``; no packing (each
rollout is its own row). Flat indices (``*_flat``) index the ``[B * L]`` row-major flattening of logits of
shape ``[B, L, V]``, which lets the loss gather only the response positions.

Truncated OPD: with a horizon h only response tokens t < h enter the loss, and the sequences are cut at
prompt + h tokens. That is exact, not an approximation: attention is causal, so logits before the cut do
not depend on tokens after it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

import torch

from megatron_opsd.config import DataConfig, RolloutConfig, TeacherConfig
from megatron_opsd.data.contexts import student_messages, teacher_context_names, teacher_messages
from megatron_opsd.data.datasets import PromptExample


class ChatTokenizer(Protocol):
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: Optional[bool] = None) -> list[int]: ...


@dataclass
class SequenceBatch:
    """One forward pass worth of right-padded rows (student, or one teacher context)."""

    tokens: torch.Tensor  # [B, L] long
    position_ids: torch.Tensor  # [B, L] long
    prompt_lengths: torch.Tensor  # [B] long
    lengths: torch.Tensor  # [B] long: prompt + kept response tokens (the rest is padding)
    loss_mask: torch.Tensor  # [B, L] float: 1 where the logit predicts a response token in the loss
    labels: torch.Tensor  # [B, L] long: labels[b, i] = tokens[b, i + 1] (pad id past the end)
    pos: torch.Tensor  # [B, R] long: index of the logit predicting response token t (0 where masked)
    flat: torch.Tensor  # [N] long: b * L + pos[b, t] over the loss tokens, in (b, t) order


@dataclass
class Batch:
    """Student and teacher sequences for the same rollouts, plus the per-loss-token bookkeeping."""

    student: SequenceBatch
    teachers: dict[str, SequenceBatch]  # keyed by context name (one entry, three with teacher.purified)
    response_tokens: torch.Tensor  # [B, R] long (pad id past each response)
    response_mask: torch.Tensor  # [B, R] bool: t < min(len(response), horizon)
    response_lengths: torch.Tensor  # [B] long: full generated lengths (before any horizon)
    seq_ids: torch.Tensor  # [N] long: the row of each loss token (for sequence_mean)
    token_ids: torch.Tensor  # [N] long: the response token each loss position predicts
    example_ids: list[str] = field(default_factory=list)

    @property
    def teacher(self) -> SequenceBatch:
        """The (first) privileged teacher."""
        return next(iter(self.teachers.values()))

    @property
    def num_loss_tokens(self) -> int:
        return int(self.seq_ids.numel())


def horizon_at_step(step: int, rollout_cfg: RolloutConfig) -> Optional[int]:
    """Response tokens that enter the loss at ``step``: None (all), a fixed horizon, or linear growth."""
    if rollout_cfg.horizon_growth is None:
        return rollout_cfg.horizon
    start, end, steps = rollout_cfg.horizon_start, rollout_cfg.horizon_end, rollout_cfg.horizon_steps
    if None in (start, end, steps):
        raise ValueError("rollout.horizon_growth=linear needs rollout.horizon_start, horizon_end and horizon_steps")
    frac = min(max(step, 0), steps) / steps
    return int(round(start + (end - start) * frac))


def encode_prompt(tokenizer: ChatTokenizer, messages: list[dict], max_prompt_tokens: int, example_id: str,
                  what: str, enable_thinking: Optional[bool] = None) -> list[int]:
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking))
    if len(ids) > max_prompt_tokens:
        raise ValueError(f"the {what} prompt of example {example_id!r} has {len(ids)} tokens, more than "
                         f"data.max_prompt_tokens={max_prompt_tokens}; raise data.max_prompt_tokens or drop the example")
    return ids


def student_prompt_ids(tokenizer: ChatTokenizer, example: PromptExample, data_cfg: DataConfig,
                       enable_thinking: Optional[bool] = None) -> list[int]:
    """Token ids the rollout engine generates from."""
    return encode_prompt(tokenizer, student_messages(example, data_cfg), data_cfg.max_prompt_tokens, example.id,
                         "student", enable_thinking)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_rows(prompts: Sequence[list[int]], responses: Sequence[list[int]], keep: Sequence[int], pad_id: int,
              pad_to_multiple_of: int) -> SequenceBatch:
    """Right-pad prompt + response[:keep] rows; loss positions are the logits predicting response[:keep]."""
    bsz = len(prompts)
    lengths = [len(p) + k for p, k in zip(prompts, keep)]
    seq_len = _round_up(max(max(lengths), 1), pad_to_multiple_of)
    max_keep = max(max(keep), 1) if keep else 1
    tokens = torch.full((bsz, seq_len), pad_id, dtype=torch.long)
    pos = torch.zeros((bsz, max_keep), dtype=torch.long)
    loss_mask = torch.zeros((bsz, seq_len), dtype=torch.float32)
    flat = []
    for b, (prompt, resp, k) in enumerate(zip(prompts, responses, keep)):
        row = list(prompt) + list(resp[:k])
        tokens[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        idx = torch.arange(k, dtype=torch.long) + len(prompt) - 1
        pos[b, :k] = idx
        loss_mask[b, idx] = 1.0
        flat.append(idx + b * seq_len)
    labels = torch.full_like(tokens, pad_id)
    labels[:, :-1] = tokens[:, 1:]
    return SequenceBatch(
        tokens=tokens,
        position_ids=torch.arange(seq_len, dtype=torch.long).unsqueeze(0).expand(bsz, -1).contiguous(),
        prompt_lengths=torch.tensor([len(p) for p in prompts], dtype=torch.long),
        lengths=torch.tensor(lengths, dtype=torch.long),
        loss_mask=loss_mask, labels=labels, pos=pos,
        flat=torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long),
    )


def build_batch(tokenizer: ChatTokenizer, examples: Sequence[PromptExample], responses: Sequence[list[int]],
                data_cfg: DataConfig, teacher_cfg: TeacherConfig, *, enable_thinking: Optional[bool] = None,
                horizon: Optional[int] = None, rollouts_for_teacher: Optional[Sequence[Optional[str]]] = None,
                contexts: Optional[Sequence[str]] = None, pad_id: Optional[int] = None) -> Batch:
    """Build the student batch and one teacher batch per context for rollouts ``responses[b]`` of ``examples[b]``.

    ``rollouts_for_teacher[b]`` is the correct rollout text shown to a ``rollout`` (DemoPSD) teacher.
    ``contexts`` defaults to ``teacher_context_names(teacher_cfg)``. Prompts are tokenized once per
    (example, context) even when a prompt has several rollouts.
    """
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses; pass one example per rollout")
    if not examples:
        raise ValueError("build_batch needs at least one rollout")
    if horizon is not None and horizon < 1:
        raise ValueError(f"rollout.horizon must be >= 1, got {horizon}")
    if pad_id is None:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    contexts = list(contexts or teacher_context_names(teacher_cfg))
    rollouts_for_teacher = list(rollouts_for_teacher) if rollouts_for_teacher is not None else [None] * len(examples)
    max_p = data_cfg.max_prompt_tokens

    cache: dict[tuple, list[int]] = {}

    def prompt_ids(ex: PromptExample, ctx: Optional[str], rollout: Optional[str]) -> list[int]:
        key = (ex.id, ex.prompt, ctx, rollout)
        if key not in cache:
            if ctx is None:
                msgs, what = student_messages(ex, data_cfg), "student"
            else:
                msgs, what = teacher_messages(ex, data_cfg, teacher_cfg, ctx, rollout), f"teacher ({ctx})"
            cache[key] = encode_prompt(tokenizer, msgs, max_p, ex.id, what, enable_thinking)
        return cache[key]

    responses = [list(r) for r in responses]
    keep = [len(r) if horizon is None else min(len(r), horizon) for r in responses]
    student = pack_rows([prompt_ids(ex, None, None) for ex in examples], responses, keep, pad_id,
                        data_cfg.pad_to_multiple_of)
    teachers = {
        ctx: pack_rows([prompt_ids(ex, ctx, r if ctx == "rollout" or ctx == "template" else None)
                        for ex, r in zip(examples, rollouts_for_teacher)],
                       responses, keep, pad_id, data_cfg.pad_to_multiple_of)
        for ctx in contexts
    }

    max_r = max(max(len(r) for r in responses), 1)
    response_tokens = torch.full((len(responses), max_r), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), max_r), dtype=torch.bool)
    for b, (r, k) in enumerate(zip(responses, keep)):
        response_tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[b, :k] = True
    seq_ids = torch.cat([torch.full((k,), b, dtype=torch.long) for b, k in enumerate(keep)])
    token_ids = response_tokens[response_mask[:, : response_tokens.shape[1]]]
    return Batch(student=student, teachers=teachers, response_tokens=response_tokens, response_mask=response_mask,
                 response_lengths=torch.tensor([len(r) for r in responses], dtype=torch.long), seq_ids=seq_ids,
                 token_ids=token_ids, example_ids=[ex.id for ex in examples])


def gather_response_logits(logits: torch.Tensor, seq: SequenceBatch) -> torch.Tensor:
    """[B, L, V] logits -> [N, V]: the rows that predict the loss tokens, in (b, t) order."""
    bsz, seq_len = logits.shape[:2]
    if seq_len != seq.tokens.shape[1] or bsz != seq.tokens.shape[0]:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the batch layout {tuple(seq.tokens.shape)}")
    return logits.reshape(bsz * seq_len, -1).index_select(0, seq.flat.to(logits.device))
