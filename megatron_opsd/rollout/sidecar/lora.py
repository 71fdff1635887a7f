"""Adapter-only weight sync: the sidecar serves base + the current LoRA adapter, and each step pushes only it.

vLLM serves LoRA adapters (``--enable-lora --max-lora-rank r``, ``LoRARequest``); the sidecar started
with ``--max-lora-rank r`` accepts ``POST /adapter/update`` with one PEFT adapter (``adapter_model.safetensors``
bytes as the body, ``adapter_config.json`` and the new weight version in headers). Like merged pushes, the update
is all-or-nothing and versioned: the version must be newer than the served one (a restore, header
``X-OPSD-Adapter-Restore: 1``, a resumed trainer's, may repeat or lower it), every tensor is checked against
the served checkpoint (names of targeted projections, [r, in] / [out, r] shapes, r <= --max-lora-rank, nothing
missing) before vLLM sees it, and vLLM loads the adapter (``add_lora``) before the sidecar switches generation to
it; any failure leaves the previous adapter and version served. Our route rather than vLLM's
``/v1/load_lora_adapter``, which has neither the version nor the checks against the served checkpoint. The trainer's
side (gather and push) is ``client/lora.py``.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from fastapi import Request  # module level: FastAPI resolves the handler's string annotation here

from megatron_opsd.models.lora_peft import PEFT_PREFIX
from megatron_opsd.rollout.protocol import (ADAPTER_CONFIG_HEADER, ADAPTER_RESTORE_HEADER, ADAPTER_ROUTE,
                                            ADAPTER_VERSION_HEADER)
from megatron_opsd.rollout.sidecar.staging import WeightUpdateError, check_version


def expected_adapter_shapes(tensor_specs: dict, config: dict) -> dict:
    """PEFT name -> shape of every factor an adapter with ``config`` (r, target_modules) must hold for the
    served checkpoint (``engine.tensor_specs``: HF name -> (shape, dtype))."""
    rank, targets = int(config["r"]), set(config["target_modules"])
    out = {}
    for name, (shape, _) in tensor_specs.items():
        parts = name.split(".")
        if not name.endswith(".weight") or len(parts) < 3 or parts[-2] not in targets or len(shape) != 2:
            continue
        stem = PEFT_PREFIX + name[: -len(".weight")]
        out[f"{stem}.lora_A.weight"] = (rank, shape[1])
        out[f"{stem}.lora_B.weight"] = (shape[0], rank)
    return out


def validate_adapter(tensors: dict, config: dict, tensor_specs: dict, max_rank: Optional[int]) -> None:
    """ValueError naming the first problem: LoRA not enabled, rank too large, missing / unexpected / misshapen."""
    if not max_rank:
        raise ValueError("this sidecar serves no LoRA adapters: start it with --max-lora-rank R")
    if config.get("peft_type", "LORA") != "LORA" or "r" not in config or "target_modules" not in config:
        raise ValueError(f"header {ADAPTER_CONFIG_HEADER}: a PEFT LoRA adapter_config with r and target_modules is "
                         "required")
    if int(config["r"]) > max_rank:
        raise ValueError(f"adapter r={config['r']} exceeds the sidecar's --max-lora-rank {max_rank}")
    expected = expected_adapter_shapes(tensor_specs, config)
    if not expected:
        raise ValueError(f"target_modules {config['target_modules']} match no projection of the served model")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"adapter tensors: missing {missing[:3]}, unexpected {unexpected[:3]} "
                         f"({len(missing)} and {len(unexpected)} in all)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensors[name].shape)}, the served model needs {shape}")
        if not torch.isfinite(tensors[name]).all():
            raise ValueError(f"{name}: non-finite values")


async def load_adapter(state, tensors: dict, config: dict, version: int) -> None:
    """Write the adapter to a fresh directory, have vLLM load it, then serve it (and drop the previous one)."""
    from safetensors.torch import save_file
    from vllm.lora.request import LoRARequest

    if state.adapter_root is None:
        state.adapter_root = Path(tempfile.mkdtemp(prefix="opsd-adapters-"))
    root = state.adapter_root
    # vLLM's id of the adapter: one more than the served one's, never the version, which a restore may repeat
    lora_id = state.lora_request.lora_int_id + 1 if state.lora_request is not None else 1
    path = root / f"{lora_id}-v{version}"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    request = LoRARequest(lora_name=f"opsd-{lora_id}-v{version}", lora_int_id=lora_id, lora_path=str(path))
    try:
        await state.engine.add_lora(request)  # loads now: a bad adapter fails before it is served
    except Exception:
        shutil.rmtree(path, ignore_errors=True)
        raise
    previous, state.lora_request = state.lora_request, request
    if previous is not None:
        await state.engine.remove_lora(previous.lora_int_id)
        shutil.rmtree(previous.lora_path, ignore_errors=True)


def add_adapter_route(router, state, error_cls) -> None:
    """``POST /adapter/update`` on the sidecar's router (``state``: its ``SidecarState``; ``error_cls``: its 4xx)."""
    from safetensors.torch import load as load_safetensors

    async def adapter_update(request: Request):
        try:
            version = int(request.headers.get(ADAPTER_VERSION_HEADER, ""))
            config = json.loads(request.headers.get(ADAPTER_CONFIG_HEADER, ""))
        except ValueError:
            raise error_cls(f"headers {ADAPTER_VERSION_HEADER} (an integer) and {ADAPTER_CONFIG_HEADER} "
                            "(adapter_config.json) are required") from None
        restore = request.headers.get(ADAPTER_RESTORE_HEADER) == "1"
        try:
            check_version(version, state.version, restore)
        except WeightUpdateError as err:
            raise error_cls(str(err), status=409) from None
        try:
            raw = await asyncio.to_thread(load_safetensors, await request.body())
            tensors = {k: v.float() for k, v in raw.items()}
            validate_adapter(tensors, config, state.tensor_specs, state.max_lora_rank)
        except Exception as err:  # noqa: BLE001 - the client's bad adapter: nothing was applied
            raise error_cls(f"adapter v{version} rejected, nothing applied: {err}") from None

        async with state.exclusive():
            start = time.perf_counter()
            if version <= state.version and not restore:
                raise error_cls(f"version: {version} is not newer than {state.version} (a concurrent update)",
                                status=409)
            try:
                await load_adapter(state, tensors, config, version)
            except Exception as err:  # noqa: BLE001 - vLLM refused it: the previous adapter is still served
                raise error_cls(f"adapter v{version} rejected by vLLM, nothing applied: {err}") from None
            state.version = version
            apply_s = time.perf_counter() - start
        state.record_update(apply_s, apply_s)
        nbytes = sum(t.numel() * t.element_size() for t in raw.values())
        return {"weight_version": state.version, "num_tensors": len(tensors), "bytes": nbytes, "apply_s": apply_s}

    router.post(ADAPTER_ROUTE)(adapter_update)
