"""`megatron-opsd plan`: per-GPU memory and layout check of a training config before launch.

Exit status: 0 the plan fits, 1 it does not fit (changes that would fit are printed), 2 the layout is invalid.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from megatron_opsd.models.shape import ModelShape
from megatron_opsd.planning.advice import combined_fix, suggest_changes
from megatron_opsd.planning.layout import LayoutError, validate_layout
from megatron_opsd.planning.lora import sync_bytes
from megatron_opsd.planning.memory import estimate_memory, sidecar_kv_tokens, sidecar_weight_bytes
from megatron_opsd.planning.settings import GIB, Cluster, TrainSettings, parse_memory_size
from megatron_opsd.planning.table import format_plan

# examples/model_configs/ of the checkout (not package data): named in the error for a config whose model.path
# is not on this machine
SHIPPED_MODEL_CONFIGS = ("qwen3-8b", "qwen3-14b", "qwen3-32b", "llama-3.1-70b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from megatron_opsd.config import add_config_arguments

    add_config_arguments(parser)
    parser.add_argument("--model-config", default=None,
                        help="HF config.json or model directory to size (default: model.path of the config), "
                             "e.g. examples/model_configs/qwen3-8b")
    parser.add_argument("--nodes", type=int, default=1, help="trainer nodes (plus sidecar nodes when shared)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB")
    parser.add_argument("--usable-fraction", type=float, default=0.9,
                        help="fraction of GPU memory the plan may use (CUDA context, NCCL, fragmentation)")
    parser.add_argument("--sidecar-replicas", type=int, default=0, help="vLLM sidecar replicas")
    parser.add_argument("--sidecar-tp", type=int, default=1, help="tensor-parallel size of each sidecar")
    parser.add_argument("--sidecar-nodes", choices=("shared", "separate"), default="separate",
                        help="shared: sidecar GPUs come out of --nodes x --gpus-per-node; separate: own nodes")
    parser.add_argument("--implementation", choices=("te", "local"), default="te",
                        help="te: Transformer Engine spec on GPU; local: megatron's local spec (as on CPU)")
    parser.add_argument("--teacher-logits", choices=("step", "microbatch"), default=None,
                        help="teacher logits held for the whole step or one microbatch (default: what the trainer "
                             "does: one microbatch at PP=1, the whole step at PP>1)")
    parser.add_argument("--logits-bytes", type=int, choices=(2, 4), default=4)


def settings_from_config(cfg, data_parallel: int, *, implementation: str = "te", teacher_logits: Optional[str] = None,
                         logits_bytes: int = 4) -> tuple[TrainSettings, int]:
    """Planner settings from an ``OPSDConfig``; also returns the global batch (sequences per step).

    ``teacher_logits`` None: what the trainer holds (``training.opsd.step.teacher_signal_source``): the teacher
    runs per micro-batch inside the student's step at PP=1, and for the whole step first at PP > 1."""
    from megatron_opsd.models.gpt import sequence_multiple, teacher_fp8

    p, r = cfg.parallel, cfg.rollout
    global_batch = r.prompts_per_step * r.n
    mbs = cfg.optim.micro_batch_size
    dtype_bytes = 2 if cfg.model.params_dtype == "bfloat16" else 4
    settings = TrainSettings(
        tensor_parallel=p.tensor_model_parallel_size,
        pipeline_parallel=p.pipeline_model_parallel_size,
        virtual_pipeline=p.virtual_pipeline_model_parallel_size,
        data_parallel=data_parallel,
        sequence_parallel=p.sequence_parallel,
        micro_batch_size=mbs,
        seq_length=padded(cfg.data.max_prompt_tokens + r.max_tokens,
                          sequence_multiple(cfg, cfg.data.pad_to_multiple_of)),
        response_tokens=r.max_tokens,
        num_microbatches=max(1, math.ceil(global_batch / (mbs * max(data_parallel, 1)))),
        recompute=cfg.model.recompute_granularity,
        teacher_weights=cfg.teacher.weights,
        teacher_forwards=3 if cfg.teacher.purified else 1,
        teacher_logits_held=teacher_logits or ("microbatch" if p.pipeline_model_parallel_size == 1 else "step"),
        use_distributed_optimizer=cfg.optim.use_distributed_optimizer,
        param_bytes=dtype_bytes,
        activation_bytes=dtype_bytes,
        logits_bytes=logits_bytes,
        implementation="local" if cfg.model.lora.rank else implementation,  # LoRA builds megatron's local spec
        chunk_tokens=cfg.loss.chunk_tokens,
        make_vocab_size_divisible_by=cfg.model.make_vocab_size_divisible_by,
        fp8=cfg.model.fp8,
        teacher_fp8=teacher_fp8(cfg),
        lora_rank=cfg.model.lora.rank,
        push_bucket_bytes=r.push_bucket_mb << 20 if r.transport == "collective" else 0,
    )
    return settings, global_batch


def padded(length: int, multiple: int) -> int:
    """``length`` rounded up to ``multiple``: the trainer pads every sequence so (``batches.response_microbatches``)."""
    return -(-length // multiple) * multiple


def main(args: argparse.Namespace) -> int:
    from megatron_opsd.config import ConfigError, config_from_args

    try:
        cfg = config_from_args(args)
        cfg.parallel.refuse_unsupported()  # context parallelism: not modelled, not offered
        model_path = args.model_config or cfg.model.path
        if not model_path:
            raise ConfigError("model.path is empty: set it in the config or pass --model-config")
        if not args.model_config and not Path(model_path).exists():
            raise ConfigError(f"model.path: {model_path} not found; pass --model-config with the model's HF "
                              f"directory or config.json (no weights needed), e.g. the published configs in the "
                              f"checkout's examples/model_configs/ ({', '.join(SHIPPED_MODEL_CONFIGS)})")
        shape = ModelShape.from_hf_config(model_path)
        cluster = Cluster(gpus_per_node=args.gpus_per_node, num_nodes=args.nodes,
                          gpu_memory=parse_memory_size(args.gpu_memory), sidecar_replicas=args.sidecar_replicas,
                          sidecar_tp=args.sidecar_tp, sidecar_shares_nodes=args.sidecar_nodes == "shared",
                          usable_fraction=args.usable_fraction)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"megatron-opsd plan: {err}", file=sys.stderr)
        return 2
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    dp = cluster.trainer_gpus // model_parallel if model_parallel > 0 else 0
    settings, global_batch = settings_from_config(cfg, dp, implementation=args.implementation,
                                                  teacher_logits=args.teacher_logits, logits_bytes=args.logits_bytes)
    try:
        warnings = validate_layout(shape, settings, cluster, global_batch=global_batch)
    except LayoutError as err:
        print(f"megatron-opsd plan: {err}", file=sys.stderr)
        return 2
    plan = estimate_memory(shape, settings)
    print(format_plan(plan, cluster))
    if cluster.sidecar_replicas:
        print(f"sidecars: {cluster.sidecar_replicas} x vLLM TP={cluster.sidecar_tp} "
              f"({'on the trainer nodes' if cluster.sidecar_shares_nodes else 'on their own nodes'}): weights "
              f"{sidecar_weight_bytes(shape, cluster.sidecar_tp) / GIB:.1f} GiB per GPU, KV cache for about "
              f"{sidecar_kv_tokens(shape, cluster):,} tokens per replica")
    sync = sync_bytes(shape, settings)
    print(f"weight sync per step: merged {sync['merged'] / GIB:.2f} GiB"
          + (f", adapter only {sync['adapter'] / GIB:.3f} GiB (LoRA r={settings.lora_rank})" if sync["adapter"] else ""))
    for warning in warnings:
        print(f"warning: {warning}")
    if plan.peak_bytes <= cluster.budget:
        return 0
    print(f"DOES NOT FIT: stage {plan.peak.stage} needs {plan.peak_bytes / GIB:.1f} GiB of "
          f"{cluster.budget / GIB:.1f} GiB. Single changes, lowest peak first:")
    for text, peak, fits in suggest_changes(shape, settings, cluster):
        print(f"  {text:<62} peak {peak / GIB:7.1f} GiB  {'fits' if fits else 'still too big'}")
    steps, peak = combined_fix(shape, settings, cluster)
    if len(steps) > 1:
        print(f"Together: {' + '.join(steps)} -> peak {peak / GIB:.1f} GiB (fits)")
    elif not steps:
        print("No combination of these changes fits: add GPUs (more TP/PP/DP) or shorten rollout.max_tokens.")
    return 1
