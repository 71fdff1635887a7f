"""Process-group set-up: torch.distributed from torchrun/slurm variables, then megatron's model parallel state."""
from __future__ import annotations

import datetime
import math
import os
import re
import socket
from dataclasses import dataclass
from typing import Optional

import psutil
import torch

from megatron_opsd.errors import UsageError
from megatron_opsd.parallel import control, cpu_compat


# TE 2.10 transformer_engine/pytorch/utils.py assert_dim_for_fp8_exec: "FP8 execution requires the product of all
# dimensions except the last to be divisible by 8 and the last dimension to be divisible by 16".
FP8_ROW_MULTIPLE = 8
CONTEXT_PARALLEL_UNSUPPORTED = (
    "parallel.context_parallel_size={cp}: context parallelism is not supported yet; set it to 1 and fit long "
    "sequences with model.recompute_granularity=selective|full, parallel.tensor_model_parallel_size > 1 with "
    "parallel.sequence_parallel=true, or a shorter rollout.max_tokens")


@dataclass
class ParallelConfig:
    """How the world is split. Data parallel size is derived: world / (TP * PP * CP)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    seed: int = 1234
    backend: Optional[str] = None  # None: nccl with CUDA, gloo without
    # the tensor groups' timeout (the world group and megatron's TP/PP/DP groups): NCCL's watchdog aborts the job
    # when a collective has not completed after it. 30 = megatron's default (torch's NCCL default: 10)
    timeout_minutes: float = 30.0
    # the control group's (gloo) timeout: the other ranks wait there while rank 0 alone samples, grades,
    # evaluates or starts a sidecar (parallel/control.py); long, as an evaluation may take hours
    control_timeout_minutes: float = 1440.0

    def validate_sizes(self) -> None:
        """The sizes and timeouts on their own (at config load, before any process starts)."""
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp < 1:
            raise UsageError(f"parallel.virtual_pipeline_model_parallel_size must be null or >= 1, got {vpp}")
        for name in ("timeout_minutes", "control_timeout_minutes"):
            if not 0 < getattr(self, name) < math.inf:
                raise UsageError(f"parallel.{name} must be a finite number > 0, got {getattr(self, name)}")

    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size * self.context_parallel_size

    def sequence_multiple(self, pad_to_multiple_of: int, fp8: bool = False) -> int:
        """What padded sequence lengths must be a multiple of: ``data.pad_to_multiple_of``; with sequence
        parallelism also TP (megatron splits the sequence into TP equal parts: embedding reduce-scatter); with FP8
        GEMMs (``fp8``: any model of the run) ``FP8_ROW_MULTIPLE`` rows per rank: TE asserts the product of an
        input's leading dimensions divisible by 8, and under sequence parallelism a rank's GEMM input has s/TP x b
        rows, so s must be a multiple of 8 x TP for every micro-batch size (docs/gpu.md)."""
        split = self.tensor_model_parallel_size if self.sequence_parallel else 1
        return math.lcm(pad_to_multiple_of, split, FP8_ROW_MULTIPLE * split if fp8 else 1)

    def microbatch_multiple(self) -> int:
        """What the number of micro-batches per step and DP rank must be a multiple of: PP with an interleaved
        (virtual) pipeline, whose megatron schedule raises unless M % PP == 0 (docs/gpu.md); else 1."""
        return self.pipeline_model_parallel_size if self.virtual_pipeline_model_parallel_size else 1

    def data_parallel_size(self, world_size: int) -> int:
        self.validate_world(world_size)
        return world_size // self.model_parallel_size()

    def refuse_unsupported(self) -> None:
        """Layouts megatron could build but this trainer does not implement: context parallelism (nothing shards a
        micro-batch's tokens per CP rank, as Megatron-LM's ``get_batch_on_this_cp_rank`` does, and the loss
        scaling counts DP only), on every device."""
        if self.context_parallel_size > 1:
            raise UsageError(CONTEXT_PARALLEL_UNSUPPORTED.format(cp=self.context_parallel_size))

    def validate_world(self, world_size: int) -> None:
        self.validate_sizes()
        self.refuse_unsupported()
        mp = self.model_parallel_size()
        if world_size % mp != 0:
            raise UsageError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size "
                f"({self.tensor_model_parallel_size}) x parallel.pipeline_model_parallel_size "
                f"({self.pipeline_model_parallel_size}) x parallel.context_parallel_size "
                f"({self.context_parallel_size}) = {mp}; change the sizes or launch {mp}*k processes"
            )


def route_source_address(peer: str) -> str:
    """This host's address on its route to ``peer`` (a name or an address): where ``peer`` can reach this host back.
    A UDP ``connect`` only looks the route up; no packet is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((socket.gethostbyname(peer), 9))
        return sock.getsockname()[0]


def gloo_interface_towards(peer: str) -> Optional[str]:
    """The network interface holding this host's address on its route to ``peer``; None for loopback or when none
    holds it. Gloo binds to what the host's *name* resolves to (torch's ``ProcessGroupGloo::createDefaultDevice``),
    falling back to loopback: on a host whose name resolves to 127.x (common in containers) ranks on other hosts
    would be told to connect to 127.0.0.1."""
    try:
        address = route_source_address(peer)
    except OSError:  # unresolvable or unroutable: the rendezvous itself reports it
        return None
    if address.startswith("127."):
        return None
    return next((name for name, addrs in psutil.net_if_addrs().items()
                 if any(a.family == socket.AF_INET and a.address == address for a in addrs)), None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (rendezvous, sidecars and weight transports pick theirs here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM_NODELIST such as ``node[01-04,07],gpu3``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def rendezvous_env(environ: Optional[dict] = None) -> dict:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from torchrun, falling back to slurm's variables."""
    env = dict(os.environ if environ is None else environ)
    out = {}
    if "RANK" in env and "WORLD_SIZE" in env:
        out["RANK"] = int(env["RANK"])
        out["WORLD_SIZE"] = int(env["WORLD_SIZE"])
        out["LOCAL_RANK"] = int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        out["RANK"] = int(env["SLURM_PROCID"])
        out["WORLD_SIZE"] = int(env["SLURM_NTASKS"])
        out["LOCAL_RANK"] = int(env.get("SLURM_LOCALID", 0))
    else:
        out.update(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0)
    if "MASTER_ADDR" in env:
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    elif "SLURM_NODELIST" in env or "SLURM_JOB_NODELIST" in env:
        out["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_NODELIST") or env["SLURM_JOB_NODELIST"])
    else:
        out["MASTER_ADDR"] = "127.0.0.1"
    if "MASTER_PORT" in env:
        out["MASTER_PORT"] = int(env["MASTER_PORT"])
    elif "SLURM_JOB_ID" in env:
        out["MASTER_PORT"] = 20000 + int(env["SLURM_JOB_ID"]) % 20000
    elif "RANK" in env or "SLURM_PROCID" in env:
        out["MASTER_PORT"] = 29500  # torchrun's default
    else:  # a lone process (no launcher): any free port, so two single-process runs never collide
        out["MASTER_PORT"] = free_port()
    return out


# Megatron's parallel state per layout this process has set up, and as it was before any (see _set_up_layout).
_LAYOUTS: dict = {}
_PRISTINE: dict = {}


def _megatron_state() -> dict:
    """megatron.core.parallel_state's module-level state: its ``_UPPER_CASE`` globals (groups, ranks, sizes)."""
    from megatron.core import parallel_state

    return {k: v for k, v in vars(parallel_state).items() if re.fullmatch(r"_[A-Z][A-Z0-9_]*", k)}


def _set_up_layout(cfg: ParallelConfig) -> None:
    """COLLECTIVE: megatron's parallel state (and the control group) for ``cfg``'s layout, each layout's groups
    created once per process and reused when a layout comes back.

    A process that switches layouts (tools/gpu_check.py; ``launch.run_layouts``) used to re-create every group
    per switch: megatron's ``destroy_model_parallel`` only forgets its groups ("Set the groups to none.",
    parallel_state.py), and the previous layout's models, DDP and optimizers still reference them (megatron DDP's
    gradient hooks keep a finished run's models alive through the autograd graph), so each gloo group's worker
    and TCP-loop threads lived on: ~18 groups and ~54 threads per rank per switch, over 2,000 threads per rank
    in the N=2 preflight. Now a layout seen before gets back the state ``initialize_model_parallel`` left (the
    module's globals as they were right after it); a new one starts from the state before any layout."""
    from megatron.core import parallel_state

    key = (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size, cfg.virtual_pipeline_model_parallel_size,
           cfg.context_parallel_size, cfg.timeout_minutes, cfg.control_timeout_minutes)
    if not _PRISTINE:
        if parallel_state.model_parallel_is_initialized():  # (by someone else, e.g. a test harness)
            parallel_state.destroy_model_parallel()
        _PRISTINE.update(_megatron_state())
    if key in _LAYOUTS:
        state, group = _LAYOUTS[key]
        vars(parallel_state).update(state)
        control.use_control_group(group)
        return
    vars(parallel_state).update(_PRISTINE)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=cfg.tensor_model_parallel_size,
        pipeline_model_parallel_size=cfg.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=cfg.virtual_pipeline_model_parallel_size,
        context_parallel_size=cfg.context_parallel_size,
        distributed_timeout_minutes=cfg.timeout_minutes,  # megatron's own default (30) otherwise
    )
    control.init_control_group(cfg.control_timeout_minutes)
    _LAYOUTS[key] = (_megatron_state(), control.control_group())


def init_distributed(cfg: ParallelConfig, environ: Optional[dict] = None) -> dict:
    """Initialise torch.distributed and megatron's parallel state; returns the rendezvous info.

    Safe to call when torch.distributed is already initialised (for example by a test harness): only the
    megatron part then runs. Called again in the same process it switches to ``cfg``'s layout, reusing that
    layout's groups when the process had it before (``_set_up_layout``).
    """
    from megatron.core import tensor_parallel

    cpu_compat.apply()
    info = rendezvous_env(environ)
    if not torch.distributed.is_initialized():
        cfg.validate_world(info["WORLD_SIZE"])
        backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(info["LOCAL_RANK"] % torch.cuda.device_count())
        # gloo groups (the world group on CPU, the control group and megatron's gloo groups everywhere) bind to the
        # interface that reaches the master unless GLOO_SOCKET_IFNAME says otherwise (gloo_interface_towards)
        if "GLOO_SOCKET_IFNAME" not in os.environ and (interface := gloo_interface_towards(info["MASTER_ADDR"])):
            os.environ["GLOO_SOCKET_IFNAME"] = interface
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{info['MASTER_ADDR']}:{info['MASTER_PORT']}",
            rank=info["RANK"],
            world_size=info["WORLD_SIZE"],
            timeout=datetime.timedelta(minutes=cfg.timeout_minutes),
        )
    world = torch.distributed.get_world_size()
    cfg.validate_world(world)
    _set_up_layout(cfg)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
    info["DATA_PARALLEL_SIZE"] = world // cfg.model_parallel_size()
    return info


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    control.destroy_control_group()
    _LAYOUTS.clear()  # destroying the default group frees every group
    _PRISTINE.clear()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
