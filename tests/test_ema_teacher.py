"""The EMA teacher keeps its average in fp32 (training.schedule.FP32EMA): a bf16 replica tracks an fp64 reference
EMA of the same bf16 student within bf16 rounding over many small steps (updating in bf16 rounds the increments
away), and a checkpoint round trip restores the fp32 shadows exactly."""
import pytest
import torch

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.schedule import FP32EMA

DECAY, STEPS, STEP_SIZE = 0.999, 300, 2e-5  # OPSD's published decay; steps of lr-1e-6-like size on 0.02 weights


def drifting_student(seed: int = 0):
    """A bf16 'student' whose fp32 master weights drift by small steps (as Adam at a small lr moves them)."""
    g = torch.Generator().manual_seed(seed)
    master = torch.randn(64, 64, generator=g) * 0.02
    direction = torch.randn(64, 64, generator=g).sign()
    return master, direction


@pytest.mark.parametrize("update", ["fp32_shadow", "in_bf16"])
def test_bf16_ema_tracks_fp32_reference(update):
    master, direction = drifting_student()
    student = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    teacher = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.copy_(master)
        teacher.weight.copy_(master)
    reference = student.weight.detach().double().clone()
    ema = FP32EMA([teacher])
    for step in range(STEPS):
        master += STEP_SIZE * direction
        with torch.no_grad():
            student.weight.copy_(master)  # the bf16 model weights, as the optimizer writes them back
        reference.mul_(DECAY).add_(student.weight.double(), alpha=1 - DECAY)
        if update == "fp32_shadow":
            ema.update_([student], DECAY)
        else:  # the plain update in the replica's dtype, which FP32EMA replaces
            with torch.no_grad():
                teacher.weight.mul_(DECAY).add_(student.weight, alpha=1 - DECAY)
    moved = (reference - master.double().sub(STEPS * STEP_SIZE * direction.double())).abs()
    assert moved.mean() > 5e-4  # the reference EMA moved by many bf16 ulps: the check is not vacuous
    error = (teacher.weight.double() - reference).abs()
    half_ulp = reference.abs() * 2.0 ** -8 + 1e-30  # bf16 has 8 significant bits: rounding error <= 2^-9 relative
    if update == "fp32_shadow":
        assert (error <= half_ulp).all(), f"max error / half ulp {(error / half_ulp).max():.2f}"
    else:  # the bf16 update loses the drift (this is what FP32EMA fixes)
        assert (error > half_ulp).float().mean() > 0.5


def test_fp32_replica_is_its_own_shadow():
    teacher, student = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    ema = FP32EMA([teacher])
    assert not ema.has_copies
    expected = {n: DECAY * p.detach() + (1 - DECAY) * dict(student.named_parameters())[n].detach()
                for n, p in teacher.named_parameters()}
    ema.update_([student], DECAY)
    for n, p in teacher.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-7)


def shadow_checkpoint_worker(hf_dir: str, root: str) -> dict:
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.training.checkpoint import load_latest, save_checkpoint
    from megatron_opsd.training.schedule import copy_weights_

    student = build_model(hf_dir, params_dtype=torch.bfloat16)
    load_hf_checkpoint(student, hf_dir)
    teacher = build_model(hf_dir, params_dtype=torch.bfloat16)
    copy_weights_(teacher, student)
    ema = FP32EMA(teacher)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        with torch.no_grad():
            for p in student[0].parameters():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 1e-3)
        ema.update_(student, 0.9)
    save_checkpoint(root, 5, student, extra_models={"teacher": teacher, "teacher_ema_fp32": ema.checkpoint_chunks()})
    fresh_teacher = build_model(hf_dir, params_dtype=torch.bfloat16)
    copy_weights_(fresh_teacher, student)
    fresh = FP32EMA(fresh_teacher)
    load_latest(root, student, extra_models={"teacher": fresh_teacher, "teacher_ema_fp32": fresh.checkpoint_chunks()})
    pairs = list(zip(ema.shadow_tensors(), fresh.shadow_tensors()))
    return {"max_diff": max((a - b).abs().max().item() for a, b in pairs),
            "below_bf16": max((a - a.bfloat16().float()).abs().max().item() for a, _ in pairs),
            "replica_diff": max((a - b).abs().max().item() for a, b in zip(
                (p for c in teacher for p in c.parameters()), (p for c in fresh_teacher for p in c.parameters()))),
            "dtypes": sorted({str(b.dtype) for _, b in pairs})}


def test_checkpoint_keeps_the_fp32_shadow(tiny_checkpoints, tmp_path):
    out = run_distributed(shadow_checkpoint_worker, 1, ParallelConfig(), tiny_checkpoints["qwen3"],
                          str(tmp_path / "ckpt"))[0]
    assert out["below_bf16"] > 0  # the shadows hold more than bf16 precision (the round trip is not vacuous)
    assert out["max_diff"] == 0.0 and out["replica_diff"] == 0.0 and out["dtypes"] == ["torch.float32"]
