"""Our megatron GPTModel vs transformers: logits parity across TP/PP, export round-trip, bad input."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import DistributedError, run_distributed
from tests._workers_models import build_only, export_round_trip, load_only, our_logits

TOL = 1e-4  # fp32, max abs logit difference


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits.detach()


def run_logits(hf_dir, tokens, tp, pp):
    results = run_distributed(our_logits, tp * pp, ParallelConfig(tensor_model_parallel_size=tp,
                                                                  pipeline_model_parallel_size=pp), hf_dir, tokens)
    return [r for r in results if r is not None][0]


GRID = [("qwen3", 1, 1), ("qwen3", 2, 1), ("qwen3", 1, 2), ("qwen3_tied", 1, 2), ("qwen2", 2, 1),
        ("llama", 2, 1), ("llama", 1, 1)]


@pytest.mark.parametrize("name,tp,pp", GRID)
def test_logits_match_transformers(tiny_checkpoints, name, tp, pp):
    torch.manual_seed(0)
    tokens = torch.randint(0, 379, (2, 12))
    ref = hf_logits(tiny_checkpoints[name], tokens)
    ours = run_logits(tiny_checkpoints[name], tokens, tp, pp)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3", "qwen2", "llama"])
def test_logits_match_transformers_tp2_pp2(tiny_checkpoints, name):
    torch.manual_seed(1)
    tokens = torch.randint(0, 379, (2, 10))
    ours = run_logits(tiny_checkpoints[name], tokens, 2, 2)
    assert (ours - hf_logits(tiny_checkpoints[name], tokens)).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["qwen3", "qwen3_tied", "qwen2"])
def test_export_round_trip_is_bitwise(tiny_checkpoints, tmp_path, name):
    src = tiny_checkpoints[name]
    out = tmp_path / "exported"
    run_distributed(export_round_trip, 4, ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2),
                    src, str(out))
    before, after = load_file(f"{src}/model.safetensors"), load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 379
    assert (out / "tokenizer.json").exists()


def test_heads_not_divisible_by_tp(tiny_checkpoints, tmp_path):
    cfg = json.loads(Path(tiny_checkpoints["qwen3"], "config.json").read_text())
    cfg["num_key_value_heads"] = 1
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistributedError, match="num_key_value_heads .* tensor_model_parallel_size"):
        run_distributed(build_only, 2, ParallelConfig(tensor_model_parallel_size=2), str(bad))


def test_missing_tensor(tiny_checkpoints, tmp_path):
    src = Path(tiny_checkpoints["qwen3"])
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(DistributedError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        run_distributed(load_only, 1, ParallelConfig(), str(bad))


def test_unknown_architecture():
    from types import SimpleNamespace

    from megatron_opsd.models.families import detect_family

    with pytest.raises(ValueError, match="architectures=.*GPTNeoXForCausalLM.*supported architectures"):
        detect_family(SimpleNamespace(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"))


def test_fp8_without_transformer_engine_is_refused(tiny_checkpoints):
    with pytest.raises(DistributedError, match="model.fp8='hybrid' needs Transformer Engine"):
        run_distributed(_build_fp8, 1, ParallelConfig(), tiny_checkpoints["qwen3"])


def _build_fp8(hf_dir):
    from megatron_opsd.models.gpt import build_model

    build_model(hf_dir, fp8="hybrid")
