"""Per-rank workers for the planner tests: one real megatron training step on CPU, with its memory measured.

What is measured (bytes, this rank):
- weights / grads / optimizer state: ``nbytes`` of the real tensors (megatron's DDP grad buffers, the
  distributed optimizer's fp32 master shards and Adam moments);
- activations: the distinct storages autograd saves for backward during the model forward (recorded with
  ``torch.autograd.graph.saved_tensors_hooks``; parameters excluded) - the quantity the Korthikanti formula
  models; allocator temporaries are not part of it;
- student logits: the storages saved by the loss (the fp32 logits).
"""
from __future__ import annotations

import os

import torch


def _storage(t: torch.Tensor):
    st = t.untyped_storage()
    return st.data_ptr(), st.nbytes()


def _held_by_custom_nodes(loss: torch.Tensor):
    """(storage ptr, bytes) of tensors that custom autograd Functions in ``loss``'s graph keep as attributes for
    their backward (the vocab-parallel divergence keeps its precomputed gradient as ``ctx.grad``)."""
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if torch.is_tensor(getattr(node, "grad", None)):
            yield _storage(node.grad)
        stack.extend(next_node for next_node, _ in node.next_functions)


def measured_training_steps(hf_dir: str, seq_length: int, micro_batch_size: int, recomputes: list) -> list:
    """One fresh model and training step per recompute mode; the measurements of each."""
    return [measured_training_step(hf_dir, seq_length, micro_batch_size, r) for r in recomputes]


def measured_training_step(hf_dir: str, seq_length: int, micro_batch_size: int, recompute) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_opsd.losses.divergence import vocab_parallel_divergence
    from megatron_opsd.models.gpt import build_model
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_opsd.config import OptimConfig
    from megatron_opsd.training.engine import optimizer_step, setup_training, zero_grads

    torch.manual_seed(0)
    chunks = build_model(hf_dir, params_dtype=torch.bfloat16, recompute_granularity=recompute)
    ddp, optimizer, scheduler = setup_training(chunks, OptimConfig(lr=1e-4, use_distributed_optimizer=True), 1000)
    vocab = chunks[0].real_vocab_size
    tokens = torch.randint(0, vocab, (micro_batch_size, seq_length))
    positions = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1)
    causal = torch.triu(torch.ones(seq_length, seq_length), diagonal=1).bool()[None, None]  # explicit: recompute
    param_ptrs = {_storage(p)[0] for p in ddp[0].parameters()}
    saved: dict = {"model": {}, "loss": {}}
    phase = ["model"]
    teacher_holder = {}

    def pack(t):
        ptr, nbytes = _storage(t)
        if ptr not in param_ptrs and ptr != teacher_holder.get("ptr"):
            if os.environ.get("PLAN_DEBUG") and ptr not in saved[phase[0]]:
                print("SAVED", phase[0], tuple(t.shape), t.dtype, nbytes, flush=True)
            saved[phase[0]][ptr] = nbytes
        return t

    def forward_step(data_iterator, model):
        next(data_iterator)
        phase[0] = "model"
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(tokens, positions, attention_mask=causal)

        def loss_func(output):
            teacher = torch.randn(output.shape, dtype=torch.float32)
            teacher_holder["ptr"] = _storage(teacher)[0]
            phase[0] = "loss"
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, _ = vocab_parallel_divergence(output.float(), teacher, group=ps.get_tensor_model_parallel_group(),
                                                    vocab_range=(0, vocab), chunk_tokens=64)
            for ptr, nbytes in _held_by_custom_nodes(loss):  # the gradient the divergence keeps for its backward
                saved["loss"][ptr] = nbytes
            return loss.clone(), {}

        return logits, loss_func

    # megatron's own schedule with this forward_step (it hooks the saved tensors), then our optimizer step
    zero_grads(ddp, optimizer)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=ddp[0],
                                num_microbatches=1, seq_length=seq_length, micro_batch_size=micro_batch_size,
                                forward_only=False)
    assert optimizer_step(optimizer, scheduler)["update_successful"]
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    optim_bytes = 0
    for opt in inner:
        for group in opt.param_groups:
            for p in group["params"]:
                optim_bytes += p.nbytes  # fp32 master shards
                optim_bytes += sum(v.nbytes for k, v in opt.state.get(p, {}).items()
                                   if torch.is_tensor(v) and k != "step")
    return {
        "weights": sum(p.nbytes for p in ddp[0].parameters()),
        "grads": sum(buf.grad_data.nbytes for buf in ddp[0].buffers),
        "param_count": sum(p.numel() for p in ddp[0].parameters()),
        "optimizer": optim_bytes,
        "activations": sum(saved["model"].values()),
        "loss_held": sum(saved["loss"].values()),
    }
