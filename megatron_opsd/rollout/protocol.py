"""The sidecar's HTTP API, shared by the trainer-side client and the sidecar: request bodies (unknown fields are
rejected so a typo never goes unnoticed), headers, and the names of the files either side leaves in host memory."""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

BUCKET_INDEX_HEADER = "X-Bucket-Index"
UPDATE_ID_HEADER = "X-Update-Id"
SHM_PATH_HEADER = "X-Shm-Path"
ADAPTER_ROUTE = "/adapter/update"  # one PEFT adapter (client/lora.py -> sidecar/lora.py)
ADAPTER_VERSION_HEADER = "X-OPSD-Adapter-Version"
ADAPTER_CONFIG_HEADER = "X-OPSD-Adapter-Config"
ADAPTER_RESTORE_HEADER = "X-OPSD-Adapter-Restore"  # "1": a resumed trainer's adapter, any version >= 0 (SidecarClient)
# host-memory files either side names with its pid, so the next sidecar can remove a dead run's (sidecar/leftovers.py)
STAGING_DIR_PREFIX = "opsd-update-p"  # + "<pid>-<update id>-<random>": the sidecar's staged updates
SHM_BUCKET_PREFIX = "opsd-weights-"  # + "<pid>-<random>-<bucket>.safetensors": the client's shm transport buckets


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GenerateRequest(_Strict):
    """``/generate``'s body. Its sampling fields are ``config.SamplingConfig``'s (``SidecarClient.generate`` fills
    them from one, ``request_fields``); the defaults here serve a raw HTTP caller."""

    prompts: Union[list[list[int]], list[str]] = Field(description="token ids (preferred) or raw text per prompt")
    n: int = Field(1, description="samples per prompt")
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Optional[int] = Field(None, description="None or 0: no top-k filtering")
    max_tokens: int = 16
    stop: Optional[list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = Field(None, description="prompt i samples with seed + i")
    ignore_eos: bool = False


class WeightsBeginRequest(_Strict):
    version: int
    num_tensors: Optional[int] = None
    restore: bool = Field(False, description="a resumed trainer's checkpoint weights: any version >= 0 is taken "
                                              "(an ordinary push must be newer than the served one)")


class WeightsUpdateRef(_Strict):
    update_id: str


class WeightTransferInitBody(_Strict):
    init_info: dict = Field(description="CollectiveInitInfo fields: master_address, master_port, world_size, ...")


class WeightTransferStartBody(_Strict):
    weight_version: int
    update_info: dict = Field(description="CollectiveUpdateInfo fields: round_id, names, dtype_names, shapes, ...")
    restore: bool = Field(False, description="a resumed trainer's checkpoint weights: any version >= 0 is taken "
                                              "(an ordinary push must be newer than the served one)")


class WeightTransferUpdateBody(_Strict):
    update_info: dict


class WeightTransferFinishBody(_Strict):
    weight_version: int
