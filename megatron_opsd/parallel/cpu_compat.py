"""Let megatron-core's real code run on CPU under the gloo backend.

megatron-core assumes CUDA throughout. Rather than forking it, we patch the handful of places where it
touches CUDA so that its own layers, schedules, DDP and distributed optimizer run unchanged on CPU.
Applied only when CUDA is absent (``apply()`` is a no-op on a GPU machine). Verified on megatron-core
0.16.1 + torch 2.13 (CPU); every patched symbol is named below with the reason.

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``: megatron allocates with
   ``device=torch.cuda.current_device()`` in ~100 places (GlobalMemoryBuffer, tensor_parallel mappings and
   layers, p2p communication, DDP buffers).
2. ``torch.cuda.synchronize`` -> no-op: the P2P communicator calls it after ``batch_isend_irecv``.
3. ``torch.cuda.manual_seed`` / ``get_rng_state`` / ``set_rng_state`` -> the CPU generator, so TP ranks are
   seeded identically and ``model_parallel_cuda_manual_seed`` works.
4. ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state`` -> the CPU
   generator (the originals index ``torch.cuda.default_generators``). The RNG tracker's ``add`` calls
   ``torch.cuda.get_rng_state`` and is covered by 3. On CPU the "CUDA" and CPU generators are one, so the
   tracker's "CPU RNG state changed within GPU RNG context" warning is meaningless and silenced.
5. A global ``TorchFunctionMode`` that maps ``device="cuda"`` literals to CPU, makes ``Tensor.cuda()`` the
   identity, and answers ``Tensor.type()`` with the ``torch.cuda.*`` name (the schedules, the optimizers'
   ``param.type() == 'torch.cuda.FloatTensor'`` checks and ``clip_grads`` need these).
6. ``megatron.core.pipeline_parallel.p2p_communication._batched_p2p_ops``: gloo pairs point-to-point
   messages between two ranks in posting order. Megatron posts send_prev, recv_prev, send_next, recv_next;
   with interleaved pipelining at PP=2 (prev == next) the sends and receives then pair wrongly and results
   are silently wrong. We post send_next, recv_prev, send_prev, recv_next, which pairs correctly (rank r's
   send_next meets rank r+1's recv_prev first) and is bitwise equal to PP=1.
7. ``megatron.core.tensor_parallel.random.CheckpointFunction`` / ``CheckpointWithoutOutputFunction`` backward
   -> re-run under the mode of 5. A torch-function mode is popped while it handles a call, and
   ``torch.autograd.backward`` / ``Tensor.backward`` are such calls, so activation recompute (selective or
   full) would re-run the forward without the mode and die on megatron's ``device="cuda"`` causal mask.
"""
from __future__ import annotations

import logging
import re
import warnings
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_APPLIED = False
_MODE: TorchFunctionMode | None = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_device(device: Any) -> Any:
    """Map a CUDA device spec (or a bare device index, as megatron passes ``current_device()``) to CPU."""
    return torch.device("cpu") if _is_cuda_device(device) else device


_CPU_TYPE_NAME = re.compile(r"^torch\.(\w+Tensor)$")


class _CudaOnCpuMode(TorchFunctionMode):
    """Rewrites CUDA placement requests made through the Python torch API to CPU (patch 5)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CPU_TYPE_NAME.sub(r"torch.cuda.\1", name)
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.new_empty) and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], torch.device("cpu"), *args[2:])
        return func(*args, **kwargs)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse into us.
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    del args, kwargs
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    del args, kwargs
    torch.set_rng_state(new_state)


def _batched_p2p_ops_gloo_order(
    *,
    tensor_send_prev,
    tensor_recv_prev,
    tensor_send_next,
    tensor_recv_next,
    group,
    prev_pipeline_rank: int,
    next_pipeline_rank: int,
):
    """megatron's ``_batched_p2p_ops`` with the posting order that gloo pairs correctly (patch 6)."""
    dist = torch.distributed
    ops = []
    if tensor_send_next is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_next, next_pipeline_rank, group))
    if tensor_recv_prev is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_prev, prev_pipeline_rank, group))
    if tensor_send_prev is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_prev, prev_pipeline_rank, group))
    if tensor_recv_next is not None:
        ops.append(dist.P2POp(dist.irecv, tensor_recv_next, next_pipeline_rank, group))
    return dist.batch_isend_irecv(ops) if ops else []


def _backward_under_mode(backward):
    """A custom autograd Function's backward that runs with the CUDA-on-CPU mode active (patch 7)."""

    def wrapped(ctx, *grads):
        with _CudaOnCpuMode():
            return backward(ctx, *grads)

    return staticmethod(wrapped)


def apply(force: bool = False) -> bool:
    """Install the patches once per process when CUDA is absent. Returns True if they are active."""
    global _APPLIED, _MODE
    if _APPLIED:
        return True
    if torch.cuda.is_available() and not force:
        return False

    torch.cuda.current_device = lambda: torch.device("cpu")  # 1
    torch.cuda.synchronize = lambda *a, **k: None  # 2
    torch.cuda.manual_seed = _cpu_manual_seed  # 3
    torch.cuda.get_rng_state = _cpu_get_rng_state
    torch.cuda.set_rng_state = _cpu_set_rng_state

    from megatron.core.pipeline_parallel import p2p_communication
    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_get_rng_state  # 4
    mcore_random._set_cuda_rng_state = _cpu_set_rng_state
    logging.getLogger(mcore_random.__name__).setLevel(logging.ERROR)
    # tensor_parallel/layers.py asks for CUDA_DEVICE_MAX_CONNECTIONS=1 (a CUDA stream setting) on every rank: only
    # meaningful on GPU, where the launch scripts set it (docs/scale.md); on CPU it is noise
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended to set the "
                            "environment variable CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)

    p2p_communication._batched_p2p_ops = _batched_p2p_ops_gloo_order  # 6
    for fn in (mcore_random.CheckpointFunction, mcore_random.CheckpointWithoutOutputFunction):  # 7
        fn.backward = _backward_under_mode(fn.backward)

    _MODE = _CudaOnCpuMode()  # 5
    _MODE.__enter__()
    _APPLIED = True
    return True

