"""The environment vLLM needs, known to the trainer side (which starts a local sidecar with it) and the sidecar."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch


def on_gpu() -> bool:
    return torch.cuda.is_available()


def prepare_vllm_env(cache_root: Optional[str] = None, environ: Optional[dict] = None) -> dict:
    """Environment vLLM must see before it is imported (``environ``, default ``os.environ``, updated and returned).

    Only defaults: a variable the user set is never overwritten. ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` because
    CUDA is already initialised in this process when vLLM starts its engine core and tensor-parallel workers
    (fork would break them); a writable cache; no hub access.
    """
    env = os.environ if environ is None else environ
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env.setdefault("VLLM_CACHE_ROOT", cache_root or str(Path.home() / ".cache" / "vllm"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env
