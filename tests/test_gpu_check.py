"""``tools/gpu_check.py --device cpu``: the device check's probes at small sizes, so the script that proves the
CUDA path (docs/gpu.md) keeps working; here it also checks the numbers its probes assert."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 2.5-3.5 min on the shared 2-core CI machine (15 probes, 12 trainers built)
def test_gpu_check_cpu_probes_pass(tmp_path):
    """tools/gpu_check.py run as users run it on a GPU, here with --device cpu: every probe passes and its numbers
    hold (logits, per-micro-batch teacher equals per-step, divergence equals the naive one); the only test that
    the device check script itself keeps working."""
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    probes = report["probes"]
    expected = {"logits_fp32", "logits_bf16", "teacher_per_microbatch", "divergence", "opsd_throughput", "fp8",
                "step_sft", "step_grpo", *(f"step_opsd_{k}" for k in
                                           ("reverse_kl", "forward_kl", "jsd", "topk", "k1", "k3", "pg"))}
    assert set(probes) == expected and report["failed"] == []
    assert probes["fp8"]["status"] == "skip"  # no Transformer Engine on CPU
    assert probes["logits_fp32"]["max_abs_diff"] < 1e-5
    pm = probes["teacher_per_microbatch"]
    for target in ("teacher", "pmi", "demopsd"):
        assert pm[f"{target}_loss_microbatch"] == pytest.approx(pm[f"{target}_loss_step"], rel=1e-6)
        assert pm[f"{target}_grad_norm_microbatch"] == pytest.approx(pm[f"{target}_grad_norm_step"], rel=1e-6)
        assert pm[f"{target}_grad_norm_step"] > 0
    assert probes["divergence"]["ours_loss"] == pytest.approx(probes["divergence"]["naive_loss"], rel=1e-5)
    for name, result in probes.items():
        if name.startswith("step_"):
            assert result["grad_norm"] > 0 and abs(result["loss"]) < 100, (name, result)


def test_a_failing_probe_does_not_hide_the_others(tmp_path):
    """An unknown probe name is refused up front; a probe that raises is recorded and the next one runs."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    record = {}
    gpu_check.run_probe("broken", lambda: 1 / 0, record)
    gpu_check.run_probe("fine", lambda: {"value": 1.0}, record)
    assert record["broken"]["status"] == "fail" and "ZeroDivisionError" in record["broken"]["error"]
    assert record["fine"]["status"] == "pass"
    step = {"step_sft": {"status": "pass", "loss": 1.0, "grad_norm": 2.0}}
    gpu_check.compare_with_cpu(step, {"step_sft": {"status": "pass", "loss": 1.0, "grad_norm": 2.5}})
    assert step["step_sft"]["status"] == "fail" and "grad_norm" in step["step_sft"]["error"]
    assert gpu_check.main(["--device", "cpu", "--only", "nonsense", "--out", str(tmp_path / "x.json")]) == 2
