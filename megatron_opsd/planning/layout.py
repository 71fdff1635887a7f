"""The planner's layout check: the model's sharding (``models.layout``, the same check the trainer makes) plus what
the run and the cluster need (sequence parallelism, FP8 rows, the global batch, trainer and sidecar GPUs, the
sidecar's memory), every problem listed with its fix."""
from __future__ import annotations

from typing import Optional

from megatron_opsd.models.layout import divisors, layout_problems
from megatron_opsd.models.shape import ModelShape
from megatron_opsd.parallel.distributed import FP8_ROW_MULTIPLE
from megatron_opsd.planning.memory import push_receiver_bytes, sidecar_weight_bytes
from megatron_opsd.planning.settings import GIB, Cluster, TrainSettings, check_choices


class LayoutError(ValueError):
    """A parallel layout megatron or vLLM cannot run; the message lists every problem and its fix."""


def validate_layout(shape: ModelShape, s: TrainSettings, cluster: Optional[Cluster] = None,
                    global_batch: Optional[int] = None) -> list:
    """Raise ``LayoutError`` listing every invalid choice with its fix; return non-fatal warnings."""
    errors, warnings = [], []
    tp, pp, vpp = s.tensor_parallel, s.pipeline_parallel, s.virtual_pipeline
    for key, value in (("parallel.tensor_model_parallel_size", tp), ("parallel.pipeline_model_parallel_size", pp),
                       ("data parallel size", s.data_parallel),
                       ("optim.micro_batch_size", s.micro_batch_size)):
        if value < 1:
            errors.append(f"{key}={value} must be >= 1")
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    try:
        check_choices(s)
    except ValueError as err:
        errors.append(str(err))
    errors.extend(layout_problems(shape, tp, pp, vpp))
    if s.sequence_parallel and tp == 1:
        warnings.append("parallel.sequence_parallel has no effect at TP=1")
    if s.sequence_parallel and s.seq_length % tp:
        errors.append(f"parallel.sequence_parallel: sequence length {s.seq_length} must be a multiple of TP={tp}; "
                      "pad sequences to a multiple of TP")
    if s.fp8 and shape.hidden_size % 16:
        errors.append(f"model.fp8={s.fp8!r}: hidden size {shape.hidden_size} must be a multiple of 16 for FP8 GEMMs")
    split = tp if s.sequence_parallel else 1
    rows = s.seq_length * s.micro_batch_size / split  # a rank's GEMM input rows (TE: divisible by 8 in FP8)
    if (s.fp8 or s.teacher_fp8) and (s.seq_length % split or rows % FP8_ROW_MULTIPLE):
        errors.append(f"model.fp8 / teacher.fp8: sequence length {s.seq_length} x micro-batch {s.micro_batch_size}"
                      f"{f' / TP={tp} (sequence parallel)' if split > 1 else ''} = {rows:g} rows per rank must be a "
                      f"multiple of {FP8_ROW_MULTIPLE} for Transformer Engine's FP8 GEMMs; the trainer pads "
                      f"sequences to a multiple of {FP8_ROW_MULTIPLE * split}")
    if pp > 1 and s.num_microbatches < pp:
        warnings.append(f"{s.num_microbatches} microbatches per step < PP={pp}: stages idle in the pipeline bubble; "
                        "raise the batch or lower optim.micro_batch_size")
    if global_batch is not None and global_batch % (s.micro_batch_size * s.data_parallel):
        errors.append(f"global batch {global_batch} sequences (rollout.prompts_per_step x rollout.n) is not divisible "
                      f"by optim.micro_batch_size x DP = {s.micro_batch_size} x {s.data_parallel}")
    if cluster is not None:
        validate_cluster(shape, s, cluster, errors, warnings)
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    return warnings


def validate_cluster(shape: ModelShape, s: TrainSettings, cluster: Cluster, errors: list, warnings: list) -> None:
    """Append what the trainer and sidecar GPUs of ``cluster`` cannot run to ``errors`` (and ``warnings``)."""
    tp, stp = s.tensor_parallel, cluster.sidecar_tp
    trainer = cluster.trainer_gpus
    if trainer < 1:
        errors.append(f"the sidecars ({cluster.sidecar_replicas} x TP {stp}) take all {cluster.total_gpus} GPUs; "
                      "leave GPUs for the trainer, add nodes or put the sidecars on their own nodes")
    elif trainer != s.world_size:
        if trainer % s.model_parallel:
            errors.append(f"{trainer} trainer GPUs (nodes x gpus-per-node - shared sidecar GPUs) are not divisible by "
                          f"TP x PP = {s.model_parallel}; change the sizes or the sidecar GPU count")
        else:
            errors.append(f"{trainer} trainer GPUs give DP={trainer // s.model_parallel}, not "
                          f"DP={s.data_parallel}")
    if tp > cluster.gpus_per_node:
        warnings.append(f"TP={tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor-parallel all-reduces "
                        "over the network are slow; prefer PP across nodes")
    if cluster.sidecar_replicas:
        if stp < 1:
            errors.append(f"--sidecar-tp={stp} must be >= 1")
            return
        if stp > cluster.gpus_per_node:
            errors.append(f"--sidecar-tp={stp} exceeds {cluster.gpus_per_node} GPUs per node; vLLM tensor "
                          "parallelism must stay within a node")
        if shape.num_heads % stp:
            errors.append(f"--sidecar-tp={stp}: vLLM needs the {shape.num_heads} attention heads divisible by its "
                          f"TP ({divisors(shape.num_heads)})")
        if shape.num_kv_heads % stp and stp % shape.num_kv_heads:
            errors.append(f"--sidecar-tp={stp}: vLLM needs KV heads ({shape.num_kv_heads}) and TP to divide one "
                          "another")
        weights = sidecar_weight_bytes(shape, stp)
        room = cluster.gpu_memory * cluster.sidecar_memory_utilization
        if weights >= room:
            errors.append(f"sidecar weights {weights / GIB:.1f} GiB per GPU exceed {room / GIB:.1f} GiB "
                          f"(gpu_memory_utilization {cluster.sidecar_memory_utilization}); raise --sidecar-tp")
        push, headroom = push_receiver_bytes(shape, s, stp), cluster.gpu_memory - room
        if s.push_bucket_bytes and push > headroom / 2:  # vLLM fills its share; the receive buffers are outside
            errors.append(f"the weight push needs {push / GIB:.1f} GiB per sidecar GPU (2 x rollout.push_bucket_mb "
                          f"+ one layer) outside vLLM's gpu_memory_utilization, which leaves {headroom / GIB:.1f} "
                          "GiB (half of it for CUDA's own use); lower rollout.push_bucket_mb or the utilization")
