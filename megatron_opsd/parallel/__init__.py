"""Distributed runtime: process groups, the CPU compatibility layer, local multi-process launch."""
from megatron_opsd.parallel.distributed import ParallelConfig, destroy_distributed, init_distributed

__all__ = ["ParallelConfig", "init_distributed", "destroy_distributed"]
