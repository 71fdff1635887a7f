"""Per-rank workers for the process-group tests (top-level so run_distributed can pickle them)."""
import datetime
import time

import torch


def rank0_phase_longer_than_tensor_timeout(tensor_timeout_s: float, phase_s: float) -> dict:
    """The world group (NCCL's place on a GPU) gets a short timeout; rank 0 then works alone for longer than it
    while the others wait, through the trainer's own waits: ``training.run.broadcast_object`` (rollouts, sidecar
    URLs) and the checkpoint barrier. Last, as a control, the same wait on the world group must time out."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    from megatron_opsd.parallel.control import barrier, broadcast_object, control_group

    rank = torch.distributed.get_rank()
    _set_pg_timeout(datetime.timedelta(seconds=tensor_timeout_s))
    out = {"control_backend": torch.distributed.get_backend(control_group())}
    if rank == 0:
        time.sleep(phase_s)  # "rollouts and an evaluation"
    start = time.monotonic()
    out["received"] = broadcast_object({"from": rank} if rank == 0 else None)
    out["waited_s"] = time.monotonic() - start
    if rank == 0:
        time.sleep(phase_s)  # "rank 0 renames the checkpoint"
    barrier()  # the checkpoint's barrier (training/checkpoint.py waits on this one)
    if rank == 0:
        time.sleep(phase_s)
    try:  # the control: the same wait on the world group
        box = [rank]
        torch.distributed.broadcast_object_list(box, src=0)
        out["world_wait"] = "completed"
    except Exception as err:  # noqa: BLE001 - the timeout is what this control expects
        out["world_wait"] = f"{type(err).__name__}: {err}"
    return out


def smoke_checksums_with_gpu_initialisation() -> dict:
    """The launcher smoke job's checksum with megatron configured as on a GPU (``use_cpu_initialization=False``:
    each TP shard drawn from the TP rank's RNG stream), with the smoke's seeded HF weights and without them."""
    from megatron_opsd.models import gpt, smoke

    real = gpt.transformer_config_from_hf
    gpt.transformer_config_from_hf = lambda *a, **kw: real(*a, **kw, use_cpu_initialization=False)
    try:
        return {"seeded": smoke.logits_checksum(0), "megatron_init": smoke.logits_checksum(0, seeded_weights=False)}
    finally:
        gpt.transformer_config_from_hf = real


def group_census() -> dict:
    """After init_distributed at the current layout: the process groups torch.distributed holds, this process's
    threads (a gloo group keeps worker and TCP-loop threads), and whether megatron's TP group works."""
    import os

    from megatron.core import parallel_state as ps
    from torch.distributed.distributed_c10d import _world

    ones = torch.ones(1)
    torch.distributed.all_reduce(ones, group=ps.get_tensor_model_parallel_group())
    return {"groups": len(_world.pg_map), "threads": len(os.listdir("/proc/self/task")),
            "tp_sum": ones.item(), "tp": ps.get_tensor_model_parallel_world_size()}
