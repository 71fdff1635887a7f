"""The trainer side of the rollout sidecar: ``SidecarClient`` (generation, weight pushes, on-policy checks) and
starting a local sidecar process. Imports nothing of the sidecar server or the vLLM worker extension
(tests/test_architecture.py)."""
from megatron_opsd.rollout.client.process import SidecarProcess, start_sidecar_process
from megatron_opsd.rollout.client.sidecar_client import (Sample, SidecarClient, SidecarError, SidecarRequestError,
                                                         StaleRolloutError, check_on_policy)

__all__ = ["Sample", "SidecarClient", "SidecarError", "SidecarRequestError", "StaleRolloutError", "check_on_policy",
           "SidecarProcess", "start_sidecar_process"]
