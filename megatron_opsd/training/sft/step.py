"""The SFT step: ``sft_step`` is the method, one optimizer step (the global batch's micro-batches -> forward/backward
of the weighted cross-entropy -> optimizer), through the same megatron model, schedules and optimizer as OPSD.

The step's loss is the exact mean over all trainable tokens of the step (all micro-batches and data-parallel
ranks): per-token weights 1/N with ``loss_reduction="sum"``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_opsd.losses.vocab_parallel import mask_padded_vocab
from megatron_opsd.models.gpt import sequence_multiple
from megatron_opsd.parallel.device import sum_over_ranks
from megatron_opsd.training.engine import optimizer_step, zero_grads
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.schedule import forward_backward
from megatron_opsd.training.sft.data import build_sft_microbatches

if TYPE_CHECKING:
    from megatron_opsd.training.sft.trainer import SFTTrainer

__all__ = ["SFT_PHASES", "make_weighted_ce_loss_fn", "sft_step"]

SFT_PHASES = ("time/batch", "time/student", "time/optimizer", "time/eval")


def make_weighted_ce_loss_fn(real_vocab_size: int):
    """``loss_fn(logits, mb)`` for ``forward_backward(loss_reduction="sum")``: ``sum(weights * CE)``, vocab-parallel
    (megatron's kernel), padded vocabulary rows excluded."""
    def loss_fn(logits: torch.Tensor, mb: dict):
        logits = mask_padded_vocab(logits.float(), real_vocab_size, ps.get_tensor_model_parallel_group())
        per_token = vocab_parallel_cross_entropy(logits, mb["labels"])
        mask = mb["weights"] > 0
        return (per_token * mb["weights"]).sum(), {"tokens": mask.sum().float(),
                                                   "ce_sum": (per_token.detach() * mask).sum()}

    return loss_fn


def sft_step(t: "SFTTrainer", timer: PhaseTimer) -> dict:
    """One SFT step: the global batch's micro-batches -> forward/backward (weighted CE) -> optimizer."""
    cfg, run = t.cfg, t.run
    mbs = build_sft_microbatches(t.sampler.next_batch(), micro_batch_size=cfg.optim.micro_batch_size,
                                 pad_id=run.tokenizer.pad_token_id,
                                 pad_multiple=sequence_multiple(cfg, cfg.data.pad_to_multiple_of),
                                 microbatch_multiple=cfg.parallel.microbatch_multiple(),
                                 dp_size=run.dp_size, dp_rank=run.dp_rank,
                                 pack_to=cfg.data.max_seq_len if cfg.data.packing else None,
                                 group_by_length=cfg.data.group_by_length,
                                 one_length=cfg.parallel.pipeline_model_parallel_size > 1)
    timer.lap("time/batch")
    zero_grads(run.ddp, run.optimizer)
    for chunk in run.ddp:
        chunk.train()
    out = forward_backward(run.ddp, mbs, t.loss_fn, seq_length=max(mb["tokens"].shape[1] for mb in mbs),
                           micro_batch_size=cfg.optim.micro_batch_size, loss_reduction="sum")
    owner = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    tokens = sum_over_ranks(out.metrics, ["tokens"], owner=owner)["tokens"]
    timer.lap("time/student")
    lr = run.optimizer.param_groups[0]["lr"]  # the LR this step used
    info = optimizer_step(run.optimizer, run.scheduler)
    timer.lap("time/optimizer")
    metrics = {"loss": out.loss, "tokens": tokens, "grad_norm": float(info["grad_norm"] or 0.0), "lr": lr}
    return metrics  # the loop counts the step
