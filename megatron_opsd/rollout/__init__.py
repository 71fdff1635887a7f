"""The vLLM rollout sidecar: engine adapter, HTTP server, client and weight transports (see docs/sidecar.md)."""
from megatron_opsd.rollout.client import (Sample, SidecarClient, SidecarError, SidecarRequestError, StaleRolloutError,
                                          check_on_policy)
from megatron_opsd.rollout.process import SidecarProcess, start_sidecar_process

__all__ = ["Sample", "SidecarClient", "SidecarError", "SidecarRequestError", "StaleRolloutError", "check_on_policy",
           "SidecarProcess", "start_sidecar_process"]
