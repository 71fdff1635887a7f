"""Megatron DDP + distributed optimizer + LR schedule, wired the way Megatron-LM's training loop wires them.

``setup_training`` wraps this rank's model chunks in megatron's ``DistributedDataParallel``, builds the
(distributed) Adam optimizer and an ``OptimizerParamScheduler`` — the scheduler is what applies the per-group
weight-decay multipliers, so biases and 1-D parameters (norms) get no weight decay — and installs
``finalize_model_grads`` (which all-reduces the TP-duplicated q/k-norm gradients and the tied-embedding
gradients across pipeline stages), ``grad_scale_func`` and ``no_sync_func`` into the model config, as the
pipeline schedules expect. ``zero_grads`` / ``optimizer_step`` bracket each step's ``schedule.forward_backward``.
"""
from __future__ import annotations

import re
import warnings

from megatron_opsd.config import OptimConfig


def setup_training(model_chunks: list, optim: OptimConfig, total_steps: int):
    """Returns ``(ddp_chunks, optimizer, scheduler)`` for this rank's chunks; ``optim`` is the config's ``optim``
    section, ``total_steps`` the LR schedule's length (``train.steps``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = model_chunks[0].config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=optim.use_distributed_optimizer)
    ddp_chunks = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(i > 0))
                  for i, chunk in enumerate(model_chunks)]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
                        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
                        clip_grad=optim.clip_grad, bf16=config.bf16, fp16=config.fp16,
                        params_dtype=config.params_dtype,
                        use_distributed_optimizer=optim.use_distributed_optimizer),
        ddp_chunks,
    )
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if optim.warmup_steps else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps, lr_decay_steps=max(total_steps, 1),
        lr_decay_style=optim.lr_decay_style, start_wd=optim.weight_decay, end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [chunk.no_sync for chunk in ddp_chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    return ddp_chunks, optimizer, scheduler


# megatron-core 0.16.1's distributed optimizer zeroes its shard views' .grad, which torch warns about on every run
# (distrib_optimizer.py zero_grad: "self.shard_fp32_groups,  # throws grad-access warning"): silenced there only
NON_LEAF_GRAD_WARNING = "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed"


def zero_grads(ddp_chunks: list, optimizer) -> None:
    """Zero the DDP grad buffers and the optimizer's grads: call before each step's forward_backward."""
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=re.escape(NON_LEAF_GRAD_WARNING), category=UserWarning)
        optimizer.zero_grad()


def optimizer_step(optimizer, scheduler) -> dict:
    """Clip, step (the distributed optimizer all-gathers the updated params) and advance the LR schedule."""
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=1)
    return {"grad_norm": grad_norm, "update_successful": update_successful,
            "lr": optimizer.param_groups[0]["lr"]}
