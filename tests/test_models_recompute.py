"""Activation recompute (selective, full) gives the same gradients as none, through megatron's schedule.

On CPU this exercises cpu_compat patch 7 (recompute re-runs megatron's forward inside backward)."""
import torch

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from tests._workers_models import grads_with_recompute


def test_recompute_gradients_equal_no_recompute(tiny_checkpoints):
    torch.manual_seed(0)
    tokens = torch.randint(0, 379, (2, 10))
    (grads,) = run_distributed(grads_with_recompute, 1, ParallelConfig(), tiny_checkpoints["qwen3"], tokens,
                               (None, "selective", "full"))
    reference = grads[None]
    assert len(reference) > 10 and all(g.abs().sum() > 0 for g in reference.values())
    for granularity in ("selective", "full"):
        for name, grad in grads[granularity].items():
            diff = (grad - reference[name]).abs().max().item()
            assert diff <= 1e-6, f"{granularity} recompute: {name} grad differs by {diff:.2e}"
