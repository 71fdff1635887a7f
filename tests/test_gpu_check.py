"""``torchrun --nproc-per-node 2 tools/gpu_check.py --device cpu``: the preflight (docs/gpu.md) at N=2 over gloo,
everything the CPU can run, so the script a cluster user runs first keeps working; here it also checks the
numbers its probes assert."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("dp2", "tp2", "tp2_sp", "pp2", "pp2_vpp2")


def _gpu_check():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    return gpu_check


@pytest.mark.slow
@pytest.mark.vllm
def test_preflight_two_ranks_on_cpu(tmp_path):
    """The script a cluster user runs first, run as they run it (torchrun, N=2): the only test of its driver, the
    layout-vs-single-rank comparisons over one world, and its table. Replaces the one-process check (2.5-3.5 min).
    232 s and 330 s measured on the shared 2-core machine while other jobs ran, 160 s alone once init_distributed
    created each layout's groups once (300 s alone before: every layout switch added ~54 gloo threads per rank): two gloo ranks
    run 15 single-layout probes, 5 layout steps against a single-rank step, the TP=2 divergence, a checkpoint
    resume at PP=2 x VPP=2, and one TP=2 vLLM sidecar receiving the trainer's push through the collective transport
    (its start overlaps the rest)."""
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
    report = json.loads(out.read_text())
    probes = report["probes"]
    expected = {"logits_fp32", "logits_bf16", "teacher_per_microbatch", "divergence", "opsd_throughput", "fp8",
                "step_sft", "step_grpo", *(f"step_opsd_{k}" for k in
                                           ("reverse_kl", "forward_kl", "jsd", "topk", "k1", "k3", "pg")),
                "layout_single_rank", *(f"layout_{name}" for name in LAYOUTS), "divergence_tp2",
                "checkpoint_resume_pp2_vpp2", "fp8_teacher_update", "sidecar_push_tp2"}
    assert set(probes) == expected and report["failed"] == [], report["failed"]
    assert report["world_size"] == 2 and report["backend"] == "gloo"
    # the table: one row per probe with its status, and the summary line
    for name in expected:
        assert any(line.startswith(name + " ") and probes[name]["status"] in line for line in proc.stdout.splitlines())
    assert f"{len(expected)}/{len(expected)} passed or skipped; failed: none" in proc.stdout
    # no Transformer Engine on CPU: both FP8 probes are skipped, saying so
    assert probes["fp8"]["status"] == "skip"
    assert probes["fp8_teacher_update"]["status"] == "skip" and "TE absent" in probes["fp8_teacher_update"]["reason"]
    assert probes["logits_fp32"]["max_abs_diff"] < 1e-5
    pm = probes["teacher_per_microbatch"]
    for target in ("teacher", "pmi", "demopsd"):
        assert pm[f"{target}_loss_microbatch"] == pytest.approx(pm[f"{target}_loss_step"], rel=1e-6)
        assert pm[f"{target}_grad_norm_microbatch"] == pytest.approx(pm[f"{target}_grad_norm_step"], rel=1e-6)
        assert pm[f"{target}_grad_norm_step"] > 0
    for name in ("divergence", "divergence_tp2"):
        div = probes[name]
        assert div["ours_loss"] == pytest.approx(div["naive_loss"], rel=1e-5) and div["grad_max_abs_diff"] < 1e-6
        assert 0 < div["fraction_of_copy_bandwidth"] and div["copy_kind"].startswith("host memcpy")
    assert probes["divergence_tp2"]["tp"] == 2
    for name, result in probes.items():
        if name.startswith("step_"):
            assert result["grad_norm"] > 0 and abs(result["loss"]) < 100, (name, result)
    # every layout's step equals the single-rank step (tools/gpu_check.py LAYOUT_REL_TOL["cpu"] = 1e-4)
    for name in LAYOUTS:
        layout = probes[f"layout_{name}"]
        assert layout["tensors"] > 0 and layout["grad_norm"] > 0, name
        assert max(layout[k] for k in ("loss_rel", "grad_norm_rel", "params_rel", "teacher_rel")) < 1e-4, name
    resume = probes["checkpoint_resume_pp2_vpp2"]
    assert resume["layout"] == {"tp": 1, "pp": 2, "vpp": 2}
    assert max(resume[k] for k in ("loss_rel", "grad_norm_rel", "params_rel", "teacher_rel")) < 1e-6
    push = probes["sidecar_push_tp2"]
    assert push["weight_version"] == 1 and push["greedy_changed_by_push"]
    assert push["agree"] == push["positions"] - push["near_ties"] > 0 and push["layout"] == {"tp": 2, "pp": 1}


def test_layouts_for_each_world_size():
    """The layouts N allows: none at N=1; TP, TP+SP, PP, PP+VPP and DP at N=2; TP=8 and TP x PP x DP at N=8."""
    layouts_for = _gpu_check().layouts_for
    assert layouts_for(1) == {}
    assert set(layouts_for(2)) == set(LAYOUTS)
    assert set(layouts_for(8)) == {"dp8", "tp8", "tp8_sp", "pp2_dp4", "pp2_vpp2_dp4", "tp2_pp2_sp_dp2"}
    assert layouts_for(8)["tp2_pp2_sp_dp2"] == {"tp": 2, "pp": 2, "sp": True}


def test_a_failing_probe_does_not_hide_the_others(tmp_path):
    """An unknown probe name is refused up front; a probe that raises is recorded and the next one runs."""
    gpu_check = _gpu_check()
    record = {}
    gpu_check.run_probe("broken", lambda: 1 / 0, record)
    gpu_check.run_probe("fine", lambda: {"value": 1.0}, record)
    assert record["broken"]["status"] == "fail" and "ZeroDivisionError" in record["broken"]["error"]
    assert record["fine"]["status"] == "pass"
    step = {"step_sft": {"status": "pass", "loss": 1.0, "grad_norm": 2.0}}
    gpu_check.compare_with_cpu(step, {"step_sft": {"status": "pass", "loss": 1.0, "grad_norm": 2.5}})
    assert step["step_sft"]["status"] == "fail" and "grad_norm" in step["step_sft"]["error"]
    assert gpu_check.main(["--device", "cpu", "--only", "nonsense", "--out", str(tmp_path / "x.json")]) == 2
    bad = gpu_check.compare_steps({"loss": 1.0, "grad_norm": 2.0, "params": {"w": _t([1.0, 2.0])}, "teacher": {}},
                                  {"loss": 1.0, "grad_norm": 2.0, "params": {"w": _t([1.0, 2.1])}, "teacher": {}},
                                  1e-4, "single-rank")
    assert bad["status"] == "fail" and "params_rel" in bad["error"]


# the world's collective timeout in the test below: a rank left waiting would fail after it, not after 10 minutes
FAILED_REFERENCE_TIMEOUT_MINUTES = 2.0


def failed_reference_rank(root: str) -> dict:
    """One rank of a two-rank world: the single-rank reference and one layout probe as gpu_check's driver runs them
    (``run_probe``, then the collective ``agree``), the reference's model path missing, so its one-process world
    (spawned by rank 0) fails."""
    sys.path.insert(0, str(ROOT / "tools"))  # kept: rank 0's one-process world unpickles gpu_check's worker
    import gpu_check

    ctx = {"root": Path(root), "cuda": False, "model": str(Path(root) / "no-such-model"),
           "opsd_data": Path(root) / "opsd.jsonl", "step_prompts": 0}
    probes = gpu_check.multi_rank_probes(ctx, {"tp": 0, "why": "not selected"})
    record = {}
    start = time.perf_counter()
    for name in ("layout_single_rank", "layout_dp2"):
        gpu_check.run_probe(name, probes[name], record)
        gpu_check.agree(name, record)
    return {"record": record, "seconds": time.perf_counter() - start}


def test_a_failed_single_rank_reference_ends_every_rank_promptly(tmp_path):
    """Issue 31 / e84c4c8: when rank 0's single-rank reference fails, the other ranks learn it from rank 0's
    broadcast and every rank fails the reference and each layout probe with the one-line reason, instead of waiting
    in a collective until the world's timeout (10 minutes by default; 2 here, so a regression fails at 2 minutes).
    Two gloo ranks plus the one-process world rank 0 spawns for the reference."""
    from megatron_opsd.parallel import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed

    ranks = run_distributed(failed_reference_rank, 2, ParallelConfig(timeout_minutes=FAILED_REFERENCE_TIMEOUT_MINUTES),
                            str(tmp_path))
    reason = f"FileNotFoundError: tokenizer path '{tmp_path / 'no-such-model'}' is neither an HF directory"
    for rank in ranks:
        single, layout = rank["record"]["layout_single_rank"], rank["record"]["layout_dp2"]
        # the reference's failure, as one line naming its cause, on every rank (rank 1's own probe returned; the
        # collective agreement marks it failed with rank 0's reason)
        assert single["status"] == "fail" and "\n" not in single["error"], single
        assert single["error"].startswith("rank 0: RuntimeError: the single-rank reference failed: "), single
        assert reason in single["error"] and "rank 1:" not in single["error"], single["error"]
        # every rank skips the layout's collectives alike, saying why
        assert layout["status"] == "fail", layout
        assert layout["error"] == "; ".join(f"rank {r}: RuntimeError: no single-rank reference (see "
                                            "layout_single_rank)" for r in range(2)), layout["error"]
        assert rank["seconds"] < 0.75 * FAILED_REFERENCE_TIMEOUT_MINUTES * 60, rank["seconds"]


def _t(values):
    import torch

    return torch.tensor(values)
