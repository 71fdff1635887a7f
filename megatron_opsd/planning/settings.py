"""What the planner sizes besides the model: one trainer rank's settings (from the run's config, ``planning/cli.py``)
and the cluster the job runs on, with the allowed choices."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

GIB = 1 << 30
RECOMPUTE = (None, "selective", "full")
TEACHER_WEIGHTS = ("live", "frozen", "ema", "refresh")
IMPLEMENTATIONS = ("te", "local")
TEACHER_LOGITS_HELD = ("step", "microbatch")


@dataclass
class TrainSettings:
    """Everything besides the model shape that sizes a trainer rank."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: Optional[int] = None  # no context parallelism: the trainer refuses it (ParallelConfig)
    data_parallel: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    seq_length: int = 4096  # longest packed sequence: prompt (student or teacher context) + response
    response_tokens: Optional[int] = None  # tokens per sequence whose teacher logits are kept; None = seq_length
    num_microbatches: int = 1  # per optimizer step on one DP rank
    recompute: Optional[str] = None  # None | selective | full (megatron recompute_granularity)
    teacher_weights: str = "frozen"  # live: the student itself; frozen/ema/refresh: a second copy of the weights
    teacher_forwards: int = 1  # teacher logit sets per sequence (3 for Purified OPSD: T, reference-only, base)
    # step: teacher logits of all microbatches kept (the trainer at PP > 1); microbatch: one at a time (PP = 1)
    teacher_logits_held: str = "step"
    use_distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True
    param_bytes: int = 2  # bf16
    activation_bytes: int = 2
    logits_bytes: int = 4  # the loss works on fp32 logits
    implementation: str = "te"  # te: Transformer Engine spec (GPU); local: megatron's local spec (as on CPU)
    hidden_dropout: bool = False
    attention_dropout: bool = False
    chunk_tokens: int = 1024
    make_vocab_size_divisible_by: int = 128
    fp8: Optional[str] = None
    teacher_fp8: Optional[str] = None  # the teacher replica's (teacher.fp8 resolved); ignored for a live teacher
    lora_rank: int = 0  # model.lora.rank: base frozen, adapters trained (planning/lora.py)
    push_bucket_bytes: int = 0  # collective weight push (rollout.push_bucket_mb); 0: a staged transport

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def world_size(self) -> int:
        return self.model_parallel * self.data_parallel


@dataclass
class Cluster:
    """Where the job runs: the trainer's GPUs, and the rollout sidecars' (on the same nodes or their own)."""

    gpus_per_node: int = 8
    num_nodes: int = 1
    gpu_memory: int = 80 * GIB
    sidecar_replicas: int = 0
    sidecar_tp: int = 1
    sidecar_shares_nodes: bool = True  # False: sidecars run on extra nodes, all num_nodes GPUs train
    sidecar_memory_utilization: float = 0.9  # vLLM gpu_memory_utilization
    usable_fraction: float = 0.9  # CUDA context, NCCL buffers, allocator fragmentation take the rest

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def sidecar_gpus(self) -> int:
        return self.sidecar_replicas * self.sidecar_tp

    @property
    def trainer_gpus(self) -> int:
        return self.total_gpus - (self.sidecar_gpus if self.sidecar_shares_nodes else 0)

    @property
    def budget(self) -> int:
        return int(self.gpu_memory * self.usable_fraction)


def parse_memory_size(text: Union[str, int, float]) -> int:
    """'80GB', '80G', '80GiB', '141gb', '24576MiB' -> bytes (GB is read as GiB, as GPU memory is quoted)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: write a size such as 80GB, 141GB or 24576MiB")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


def check_choices(s: TrainSettings) -> None:
    """A ``ValueError`` naming the key for a choice outside its allowed values."""
    for value, allowed, key in ((s.recompute, RECOMPUTE, "model.recompute_granularity"),
                                (s.teacher_weights, TEACHER_WEIGHTS, "teacher.weights"),
                                (s.implementation, IMPLEMENTATIONS, "implementation"),
                                (s.teacher_logits_held, TEACHER_LOGITS_HELD, "teacher_logits_held")):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: choose one of {allowed}")
