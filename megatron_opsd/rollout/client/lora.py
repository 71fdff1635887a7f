"""Trainer side of adapter-only weight sync (``sidecar/lora.py`` has the route): gather the trainer's LoRA adapters
and push them, as one PEFT adapter, to every replica's ``POST /adapter/update``."""
from __future__ import annotations

import json

import torch

from megatron_opsd.models.lora_peft import PEFT_PREFIX, gather_lora_tensors, peft_adapter_config
from megatron_opsd.parallel import control
from megatron_opsd.rollout.protocol import (ADAPTER_CONFIG_HEADER, ADAPTER_RESTORE_HEADER, ADAPTER_ROUTE,
                                            ADAPTER_VERSION_HEADER)

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that serves adapters of ``rank``."""
    for allowed in VLLM_MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"model.lora.rank={rank}: vLLM serves ranks up to {VLLM_MAX_LORA_RANKS[-1]}")


def push_adapter(client, tensors: dict, config: dict, version: int, restore: bool = False) -> list:
    """Client side: send one PEFT adapter (PEFT-named tensors) to every replica as weight ``version``
    (``restore``: a resumed trainer's, taken whatever version is served; ``SidecarClient.push_weights``)."""
    from safetensors.torch import save as save_safetensors

    body = save_safetensors({k: v.contiguous() for k, v in tensors.items()})
    headers = {ADAPTER_VERSION_HEADER: str(version), ADAPTER_CONFIG_HEADER: json.dumps(config)}
    if restore:
        headers[ADAPTER_RESTORE_HEADER] = "1"
    return [client.request("POST", ADAPTER_ROUTE, i, idempotent=False, content=body, headers=headers)
            for i in range(len(client.urls))]


def push_adapter_from_model(client, model_chunks: list, settings, version: int, base_model: str = "",
                            restore: bool = False) -> None:
    """COLLECTIVE: gather the trainer's adapters (models/lora_peft.py) and push them from global rank 0."""
    tensors = gather_lora_tensors(model_chunks)
    if tensors is not None and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        push_adapter(client, {PEFT_PREFIX + k: v for k, v in tensors.items()},
                     peft_adapter_config(settings, base_model), version, restore)
    control.barrier()  # the others wait (gloo, long timeout) while rank 0 posts the adapter
