"""The one device rule: every tensor that enters megatron or a collective lives on the current device.

On a GPU that is ``cuda:<torch.cuda.current_device()>`` (the rank's GPU, set by ``init_distributed``); on CPU it
is ``cpu`` (``parallel.cpu_compat`` maps ``torch.cuda.current_device()`` to cpu there). Batches are built on the
host and moved here in one place per trainer (the micro-batch builders call ``to_device``), the way
Megatron-LM's ``get_batch`` moves every field with ``.cuda(non_blocking=True)``; metric sums cross ranks only
through ``all_reduce_sum`` (``sum_over_ranks`` for micro-batch metrics), because NCCL refuses CPU tensors
("No backend type associated with device type cpu").
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch


def current_device() -> torch.device:
    """The device this rank computes on: its GPU under CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_device(batch: dict) -> dict:
    """A micro-batch dict with every tensor on ``current_device()`` (other values unchanged).

    ``non_blocking`` copies overlap the host-to-device transfer with the previous micro-batch's compute (pinned
    memory is not required for correctness)."""
    device = current_device()
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def all_reduce_sum(values: Sequence[float], group: Optional[torch.distributed.ProcessGroup] = None) -> list[float]:
    """``values`` summed over the ranks of ``group`` (default: the world), as python floats.

    The sums travel as one float64 tensor on ``current_device()``, so the same call works on NCCL and gloo."""
    sums = torch.tensor([float(v) for v in values], dtype=torch.float64, device=current_device())
    if torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(sums, group=group)
    return sums.tolist()


def sum_over_ranks(per_microbatch: Sequence[Mapping], keys: Sequence[str], *, owner: bool = True,
                   group: Optional[torch.distributed.ProcessGroup] = None) -> dict[str, float]:
    """Each of ``keys`` summed over this rank's micro-batch metrics and then over the ranks of ``group``.

    The one way metrics cross ranks: a rank that is not ``owner`` (not the last pipeline stage, or a
    tensor-parallel rank holding a copy of rank 0's numbers) adds 0, so every number is counted once; every
    rank of ``group`` must call it with the same ``keys`` (one all-reduce)."""
    local = [sum(float(m[k]) for m in per_microbatch) if owner else 0.0 for k in keys]
    return dict(zip(keys, all_reduce_sum(local, group)))
