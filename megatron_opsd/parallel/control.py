"""The control plane: a gloo process group for the waits around rank-0-only work, apart from the tensor groups.

Rank 0 alone samples rollouts, grades them, evaluates, starts a sidecar and pushes adapters, while every other
rank waits for the result (an object broadcast) or for rank 0 to finish (a barrier). Waiting on the NCCL world
group would put that wait under NCCL's watchdog: torch's ``ProcessGroupNCCL`` aborts the job when a collective
is not complete after the group's timeout (``parallel.timeout_minutes``, default 30), and a MATH-500 evaluation
at 4-8k tokens plus a step's rollouts can take longer. These waits therefore run on their own gloo group (CPU
objects; no NCCL work is pending while a rank waits here) with a long timeout of its own
(``parallel.control_timeout_minutes``). Tensors stay on the NCCL groups. A dead rank 0 still ends the wait
early: gloo sees the closed connection, and torchrun / srun stop the other ranks when one exits.
"""
from __future__ import annotations

import datetime
from typing import Any, Optional

import torch

_CONTROL_GROUP = None


def init_control_group(timeout_minutes: float) -> None:
    """COLLECTIVE (every rank, in the same order as any other ``new_group``): create the control group."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = torch.distributed.new_group(backend="gloo",
                                                 timeout=datetime.timedelta(minutes=timeout_minutes))


def use_control_group(group) -> None:
    """Make ``group`` (made by an earlier ``init_control_group`` of this world) the control group again."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = group


def destroy_control_group() -> None:
    """Forget the group (``torch.distributed.destroy_process_group`` frees it with every other group)."""
    global _CONTROL_GROUP
    _CONTROL_GROUP = None


def control_group() -> Optional[Any]:
    """The control group; None (the default group) when ``init_distributed`` did not create one."""
    return _CONTROL_GROUP


def _single_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1


def broadcast_object(obj, src: int = 0):
    """``obj`` from global rank ``src`` on every rank (picklable objects; a no-op on one process), on the
    control group: the other ranks may wait here for as long as rank 0's work takes."""
    if _single_process():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=_CONTROL_GROUP)
    return box[0]


def barrier() -> None:
    """Every rank waits for the others on the control group (a no-op on one process)."""
    if not _single_process():
        torch.distributed.barrier(group=_CONTROL_GROUP)
