"""One loss dispatch: a target builds the teacher signal, a coverage and a divergence consume it.

  target      teacher  the privileged teacher's logits
              pmi      Purified OPSD: the PMI target from three teacher forwards (full, reference-only, base)
              demopsd  DemoPSD: the barycenter of the teacher and this forward's detached student, so it can
                       only be built inside the student's loss
  coverage    full     the whole (sharded) vocabulary               divergence reverse_kl | forward_kl | jsd
              topk     the target's global top-k (+ one tail bucket) divergence reverse_kl | forward_kl | jsd
              sampled  the sampled response token                    divergence k1 | k3 | pg (an estimator)

``Objective`` picks the coverage once from the ``LossConfig``. ``teacher_signal`` builds the target from one
micro-batch's teacher rows and, when the target does not depend on the student, keeps only what the coverage
reads (``Coverage.compact``: the target itself, its top-k, or its log-probs at the sampled tokens): the PP > 1
precompute then holds [tokens, k] or [tokens] per micro-batch, not [tokens, V/TP]. ``loss`` compacts a DemoPSD
target the same way inside the loss, then runs the coverage's divergence. The same two calls serve the
precompute and the in-loss path, so the loss kind is decided in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, Sequence, Union

import torch

from megatron_opsd.losses.divergence import vocab_parallel_divergence
from megatron_opsd.losses.sampled import sampled_token_loss, vocab_parallel_token_logprobs
from megatron_opsd.losses.targets import demopsd_target_logprobs, pmi_target_logprobs
from megatron_opsd.losses.topk import TeacherTopK, topk_divergence, vocab_parallel_topk
from megatron_opsd.losses.vocab_parallel import VocabRange, vocab_parallel_entropy

if TYPE_CHECKING:
    from megatron_opsd.config import LossConfig


@dataclass
class Target:
    """A full-vocabulary target on this rank's vocabulary shard [n, V/TP]: teacher logits (divided by the loss
    temperature where used) or normalised log-probs from a target builder (used as they are)."""

    values: torch.Tensor
    is_logprobs: bool = False


Compact = Union[Target, TeacherTopK, torch.Tensor]  # full: the target; topk: its top-k; sampled: log p [n]


@dataclass
class TeacherSignal:
    """What the student's loss reads from the teacher side of one micro-batch.

    ``compact``: the coverage's part of the target, when it could be taken before the student's forward;
    otherwise ``target`` (DemoPSD: the teacher logits its barycenter is built from). ``teacher_entropy_sum``:
    the privileged teacher's entropy summed over the loss tokens (logging), None when entropy is not logged.
    """

    compact: Optional[Compact] = None
    target: Optional[Target] = None
    teacher_entropy_sum: Optional[torch.Tensor] = None


class Coverage(NamedTuple):
    """Which tokens the divergence is taken over: how a target is compacted, and the loss on the compact form."""

    compact: Callable[["Objective", Target, torch.Tensor], Compact]
    loss: Callable[["Objective", torch.Tensor, Compact, torch.Tensor, torch.Tensor], tuple]


def _full_loss(obj: "Objective", student, target: Target, token_ids, weights):
    return vocab_parallel_divergence(student, target.values, kind=obj.cfg.divergence, beta=obj.cfg.beta,
                                     token_clip=obj.cfg.token_clip, teacher_is_logprobs=target.is_logprobs,
                                     **obj.loss_kwargs(weights))


def _topk_compact(obj: "Objective", target: Target, token_ids) -> TeacherTopK:
    return vocab_parallel_topk(target.values, obj.cfg.top_k, temperature=obj.temperature_for(target),
                               **obj.vocab_kwargs())


def _topk_loss(obj: "Objective", student, top: TeacherTopK, token_ids, weights):
    return topk_divergence(student, top, kind=obj.cfg.divergence, tail=obj.cfg.topk_tail, beta=obj.cfg.beta,
                           token_clip=obj.cfg.token_clip, **obj.loss_kwargs(weights))


@torch.no_grad()
def _sampled_compact(obj: "Objective", target: Target, token_ids) -> torch.Tensor:
    return vocab_parallel_token_logprobs(target.values, token_ids, temperature=obj.temperature_for(target),
                                         **obj.vocab_kwargs())


def _sampled_loss(obj: "Objective", student, teacher_logprobs: torch.Tensor, token_ids, weights):
    student_logprobs = vocab_parallel_token_logprobs(student, token_ids, temperature=obj.cfg.temperature,
                                                     **obj.vocab_kwargs())
    return sampled_token_loss(student_logprobs, teacher_logprobs, estimator=obj.cfg.divergence,
                              loss_mask=weights > 0, reduction="sum", token_weights=weights)


COVERAGES = {
    "full": Coverage(compact=lambda obj, target, token_ids: target, loss=_full_loss),
    "topk": Coverage(compact=_topk_compact, loss=_topk_loss),
    "sampled": Coverage(compact=_sampled_compact, loss=_sampled_loss),
}


@dataclass(frozen=True)
class Objective:
    """The loss of ``cfg`` (a ``LossConfig``) on this rank's vocabulary shard: ``group`` is the tensor-parallel
    group (None: one process), ``vocab_range`` the real (unpadded) vocabulary ids."""

    cfg: "LossConfig"
    group: Any = None
    vocab_range: VocabRange = None

    def __post_init__(self):
        if self.cfg.coverage not in COVERAGES:
            raise ValueError(f"loss.coverage={self.cfg.coverage!r}: choose one of {list(COVERAGES)}")
        object.__setattr__(self, "coverage", COVERAGES[self.cfg.coverage])

    @property
    def logs_entropy(self) -> bool:
        """Student/teacher entropy metrics: two full-vocabulary passes, by default only for full coverage."""
        return self.cfg.log_entropy if self.cfg.log_entropy is not None else self.cfg.coverage == "full"

    def vocab_kwargs(self) -> dict:
        return dict(group=self.group, vocab_range=self.vocab_range, chunk_tokens=self.cfg.chunk_tokens)

    def loss_kwargs(self, weights: torch.Tensor) -> dict:
        """The divergences' common keywords: the step's token weights, summed (``reduction="sum"``)."""
        return dict(loss_mask=weights > 0, temperature=self.cfg.temperature, reduction="sum", token_weights=weights,
                    **self.vocab_kwargs())

    def temperature_for(self, target: Target) -> float:
        return 1.0 if target.is_logprobs else self.cfg.temperature

    def target(self, teacher_rows: Sequence[torch.Tensor]) -> Target:
        """The target from one micro-batch's teacher rows (privileged teacher first; PMI: then the
        reference-only and base forwards). DemoPSD's stays the teacher's until ``loss`` has the student."""
        if self.cfg.target == "pmi":
            full, reference_only, base = teacher_rows
            return Target(pmi_target_logprobs(full, reference_only, base, temperature=self.cfg.temperature,
                                              clip=self.cfg.pmi_clip, beta=self.cfg.pmi_beta,
                                              center=self.cfg.pmi_center, **self.vocab_kwargs()), is_logprobs=True)
        return Target(teacher_rows[0])

    def teacher_signal(self, teacher_rows: Sequence[torch.Tensor], token_ids: torch.Tensor,
                       weights: torch.Tensor) -> TeacherSignal:
        """One micro-batch's signal: compacted now unless the target needs the student (DemoPSD)."""
        entropy = self.entropy_sum(teacher_rows[0], weights) if self.logs_entropy else None
        target = self.target(teacher_rows)
        if self.cfg.target == "demopsd":
            return TeacherSignal(target=target, teacher_entropy_sum=entropy)
        return TeacherSignal(compact=self.coverage.compact(self, target, token_ids), teacher_entropy_sum=entropy)

    def loss(self, student: torch.Tensor, signal: TeacherSignal, token_ids: torch.Tensor,
             weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(``sum_t weights_t * D_t`` with grad to ``student`` [n, V/TP], per-token D [n] detached)."""
        compact = signal.compact
        if compact is None:
            target = signal.target
            if self.cfg.target == "demopsd":  # the barycenter of the teacher and this forward's (detached) student
                target = Target(demopsd_target_logprobs(
                    student, target.values, temperature=self.cfg.temperature, alpha_max=self.cfg.demopsd_alpha_max,
                    beta=self.cfg.demopsd_beta, **self.vocab_kwargs()), is_logprobs=True)
            compact = self.coverage.compact(self, target, token_ids)
        return self.coverage.loss(self, student, compact, token_ids, weights)

    @torch.no_grad()
    def entropy_sum(self, logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Entropy of softmax(logits) at temperature 1 summed over the loss tokens (logging; one full-vocabulary pass)."""
        return (vocab_parallel_entropy(logits.detach(), **self.vocab_kwargs()) * (weights > 0)).sum()
