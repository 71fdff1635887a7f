"""The CUDA path checked on CPU (docs/gpu.md): the device rule (micro-batches reach the current device through
``parallel.device``; metric sums are device tensors), the refusal of a local sidecar on CUDA, vLLM's environment
defaults, and what counts as a usable Transformer Engine. CUDA is simulated by monkeypatching, never run."""
from __future__ import annotations

import sys
import types

import pytest
import torch

from megatron_opsd.parallel import ParallelConfig, device
from megatron_opsd.parallel.launch import run_distributed

SENTINEL = torch.device("meta")  # a device no CPU code path lands on by accident


@pytest.fixture
def sentinel_device(monkeypatch):
    """Make ``current_device()`` answer a sentinel, as it answers cuda:N on a GPU."""
    monkeypatch.setattr(device, "current_device", lambda: SENTINEL)


def test_opsd_microbatches_reach_the_current_device(sentinel_device):
    from megatron_opsd.losses import token_weights
    from megatron_opsd.training.batches import response_microbatches

    responses = [[5, 6, 7], [8, 9]]
    mbs = response_microbatches([[1, 2], [3]], responses, token_weights([3, 2], "token_mean"), micro_batch_size=1,
                             pad_id=0)
    assert len(mbs) == 2
    for index, mb in enumerate(mbs):
        tensors = {k: v for k, v in mb.items() if k != "index"}  # the micro-batch's position: a plain int
        assert {k: v.device for k, v in tensors.items()} == {k: SENTINEL for k in tensors}
        assert mb["index"] == index and type(mb["index"]) is int


@pytest.mark.parametrize("pack_to", [None, 16])
def test_sft_microbatches_reach_the_current_device(sentinel_device, pack_to):
    from megatron_opsd.training.sft.data import SFTExample, build_sft_microbatches

    examples = [SFTExample("a", [1, 2, 3, 4], [0, 0, 1, 1]), SFTExample("b", [5, 6, 7], [0, 1, 1])]
    mbs = build_sft_microbatches(examples, micro_batch_size=1, pad_id=0, pack_to=pack_to)
    assert mbs and all(v.device == SENTINEL for mb in mbs for v in mb.values())
    assert ("attention_mask" in mbs[0]) == (pack_to is not None)


def test_to_device_keeps_non_tensors(sentinel_device):
    moved = device.to_device({"tokens": torch.ones(2, dtype=torch.long), "name": "x", "n": 3})
    assert moved["tokens"].device == SENTINEL and moved["name"] == "x" and moved["n"] == 3


def test_current_device_on_cpu_matches_cpu_compat():
    """On CPU the helper answers what megatron's ``torch.cuda.current_device()`` answers under cpu_compat."""
    from megatron_opsd.parallel import cpu_compat

    cpu_compat.apply()
    assert device.current_device() == torch.device("cpu") == torch.cuda.current_device()


def _reduce_worker():
    rank = torch.distributed.get_rank()
    sums = device.all_reduce_sum([rank + 1, 0.25, torch.tensor(2.0 * rank)])
    tp_group = __import__("megatron.core.parallel_state", fromlist=["x"]).get_tensor_model_parallel_group()
    return sums, device.all_reduce_sum([rank + 1.0], group=tp_group)


def test_all_reduce_sum_over_gloo_returns_floats():
    """Two ranks (TP=2): world sums and a sub-group's, as python floats (trainer/SFT/GRPO metric sums)."""
    results = run_distributed(_reduce_worker, 2, ParallelConfig(tensor_model_parallel_size=2))
    for sums, tp_sums in results:
        assert sums == [3.0, 0.5, 2.0] and tp_sums == [3.0]
        assert all(type(v) is float for v in sums)


def test_local_sidecar_refused_on_cuda(monkeypatch):
    from megatron_opsd.config import ConfigError
    from megatron_opsd.rollout.client.process import refuse_local_sidecar_on_gpu

    refuse_local_sidecar_on_gpu([])  # CPU: the local sidecar is the tiny-run convenience
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    refuse_local_sidecar_on_gpu(["http://node7:8000"])
    with pytest.raises(ConfigError, match=r"rollout.sidecar_urls is empty.*megatron-opsd sidecar.*"
                                          r"rollout.sidecar_urls=http://HOST:8000") as err:
        refuse_local_sidecar_on_gpu([])
    assert "\n" not in str(err.value)


def test_sidecar_env_defaults_never_override_the_user():
    from megatron_opsd.rollout.client.process import sidecar_env

    env = sidecar_env({"PATH": "/bin"})
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"  # CUDA is initialised before vLLM forks workers
    assert env["PATH"] == "/bin" and env["VLLM_CACHE_ROOT"]
    mine = {"VLLM_WORKER_MULTIPROC_METHOD": "forkserver", "VLLM_CACHE_ROOT": "/scratch/v"}
    assert {k: sidecar_env(mine)[k] for k in mine} == mine


# ------------------------------------------------------------------------------------------ Transformer Engine
@pytest.fixture
def fake_cuda(monkeypatch):
    from megatron_opsd.models import families

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(families, "WARNED_LOCAL_SPEC", False)
    return families


def _fake_te_package(tmp_path, monkeypatch, body: str) -> None:
    pkg = tmp_path / "transformer_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)


def test_have_te_false_on_cpu():
    from megatron_opsd.models.families import have_transformer_engine

    assert torch.cuda.is_available() or not have_transformer_engine()


def test_cuda_without_te_warns_loudly_once(fake_cuda):
    with pytest.warns(RuntimeWarning, match="LOCAL layer spec.*megatron-opsd\\[te\\]"):
        assert not fake_cuda.have_transformer_engine()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fake_cuda.have_transformer_engine()  # once per process


def test_broken_te_is_an_error_not_a_fallback(fake_cuda, tmp_path, monkeypatch):
    """TE installed but not loadable (wrong torch/CUDA build): megatron records HAVE_TE = False; we raise."""
    _fake_te_package(tmp_path, monkeypatch, "raise ImportError('libtransformer_engine.so: undefined symbol')\n")
    saved = sys.modules.pop(fake_cuda.MEGATRON_TE_MODULE, None)
    try:
        with pytest.raises(RuntimeError, match=r"installed but megatron-core cannot load it.*"
                                               r"transformer-engine\[pytorch\]>=2.9,<2.12"):
            fake_cuda.have_transformer_engine()
    finally:
        sys.modules.pop(fake_cuda.MEGATRON_TE_MODULE, None)
        if saved is not None:
            sys.modules[fake_cuda.MEGATRON_TE_MODULE] = saved


def test_usable_te_is_what_megatron_imports(fake_cuda, tmp_path, monkeypatch):
    _fake_te_package(tmp_path, monkeypatch, "")
    monkeypatch.setitem(sys.modules, fake_cuda.MEGATRON_TE_MODULE, types.SimpleNamespace(HAVE_TE=True))
    assert fake_cuda.have_transformer_engine()


def test_fp8_without_te_is_one_line_error():
    from megatron_opsd.models.families import require_te_for_fp8

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(RuntimeError, match="model.fp8='hybrid'.*Transformer Engine") as err:
        require_te_for_fp8("hybrid")
    assert "\n" not in str(err.value)


def test_te_extra_pinned_to_megatron_range():
    from pathlib import Path

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"te": ["transformer-engine[pytorch]>=2.9,<2.12"]' in setup
    assert '"apex"' not in setup  # PyPI's apex is an unrelated project (docs/gpu.md)


def test_teacher_fp8_config(tmp_path):
    from megatron_opsd.config import ConfigError, load_config
    from megatron_opsd.models.gpt import teacher_fp8

    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: x\n")
    cfg = load_config(str(path), ["model.fp8=hybrid"])
    assert cfg.teacher.fp8 == "student" and teacher_fp8(cfg) == "hybrid" and cfg.model.fp8_recipe == "current"
    assert teacher_fp8(load_config(str(path), ["model.fp8=hybrid", "teacher.fp8=null"])) is None
    with pytest.raises(ConfigError, match="teacher.fp8=e4m3: teacher.weights=live"):
        load_config(str(path), ["teacher.weights=live", "teacher.fp8=e4m3"])


def test_kernel_report_names_what_megatron_picked(monkeypatch, capsys):
    """`megatron-opsd version` reports megatron's own choice (TE > apex > torch), read from megatron's modules."""
    from megatron.core import optimizer as mcore_optimizer

    from megatron_opsd.cli import main
    from megatron_opsd.models.families import kernel_report

    assert kernel_report() == {"adam": "torch.AdamW", "multi_tensor_applier": "megatron",
                               "layer_spec (norm, attention)": "local"}
    fused = type("FusedAdam", (), {"__module__": "apex.optimizers.fused_adam"})
    monkeypatch.setattr(mcore_optimizer, "Adam", fused)
    assert kernel_report()["adam"] == "apex.FusedAdam"
    assert main(["version"]) == 0
    assert "adam: apex.FusedAdam" in capsys.readouterr().out
