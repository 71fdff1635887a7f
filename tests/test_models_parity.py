"""Our megatron GPTModel vs transformers: logits parity across TP/PP/VPP (and with sequence parallelism at TP > 1),
export round-trip, bad input."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from tests._workers_models import bad_inputs, export_many, logits_of_many

TOL = 1e-4  # fp32, max abs logit difference
SP_TOL = 1e-6  # sequence parallel on vs off at the same TP (fp32; measured 0.0)
ALL = ("qwen3", "qwen3_tied", "qwen2", "llama")  # qwen2 is tied too (and has qkv bias); llama has llama3 RoPE

# (TP, PP, VPP, checkpoints): one spawn per layout
LAYOUTS = [
    pytest.param(1, 1, None, ALL, id="tp1"),
    pytest.param(2, 1, None, ALL, id="tp2"),
    pytest.param(1, 2, None, ("qwen3", "qwen3_tied", "llama"), id="pp2"),
    pytest.param(1, 2, 2, ("qwen3_4l",), id="pp2-vpp2"),
    pytest.param(2, 2, None, ALL, id="tp2-pp2", marks=pytest.mark.slow),
]


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(hf_dir).eval()(tokens).logits


def read_checkpoint(path) -> dict:
    path = Path(path)
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("tp,pp,vpp,names", LAYOUTS)
def test_logits_match_transformers(tiny_checkpoints, tp, pp, vpp, names):
    """Our megatron GPTModel's logits equal transformers' for each family at each TP/PP/VPP layout (and with
    sequence parallelism): the reference every other numeric test builds on; the TP=2 x PP=2 case is slow."""
    torch.manual_seed(tp * 10 + pp)
    tokens = torch.randint(0, 379, (2, 12))
    cfg = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                         virtual_pipeline_model_parallel_size=vpp)
    results = run_distributed(logits_of_many, tp * pp, cfg, {n: tiny_checkpoints[n] for n in names}, tokens)
    last_stage = [r for r in results if r is not None]
    assert len(last_stage) == tp  # every TP rank of the last stage holds the gathered logits
    for name in names:
        ref = hf_logits(tiny_checkpoints[name], tokens)
        for ours in last_stage:
            assert ours[name].shape == ref.shape == (2, 12, 379), name
            diff = (ours[name] - ref).abs().max().item()
            assert diff < TOL, f"{name} at TP={tp} PP={pp} VPP={vpp}: max abs diff {diff:.2e}"
            if tp > 1:  # sequence parallelism splits the sequence, not the arithmetic: measured bitwise equal
                sp_diff = (ours[name, "sp"] - ours[name]).abs().max().item()
                assert sp_diff <= SP_TOL, f"{name} at TP={tp} PP={pp}: sequence parallel on vs off {sp_diff:.2e}"


def test_export_round_trip_is_bitwise(tiny_checkpoints, tmp_path):
    """HF -> ours at TP=2 x PP=2 -> HF equals the source tensor by tensor; iter_hf_tensors streams to rank 3."""
    pairs = {tiny_checkpoints[n]: str(tmp_path / n) for n in ALL}
    cfg = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    results = run_distributed(export_many, 4, cfg, pairs, tiny_checkpoints["qwen3_tied"], 3)
    for src, out in pairs.items():
        before, after = read_checkpoint(src), read_checkpoint(out)
        assert sorted(before) == sorted(after), src
        for key in before:
            assert torch.equal(before[key], after[key]), f"{src}: {key}"
        if src == tiny_checkpoints["qwen3_tied"]:  # re-exported over the sharded export, as a single file
            assert sorted(p.name for p in Path(out).glob("*.safetensors")) == ["model.safetensors"]
            assert not (Path(out) / "model.safetensors.index.json").exists()
        else:
            index = json.loads((Path(out) / "model.safetensors.index.json").read_text())
            assert set(index["weight_map"]) == set(before)
            assert all((Path(out) / f).exists() for f in set(index["weight_map"].values()))
        assert json.loads((Path(out) / "config.json").read_text())["vocab_size"] == 379
        assert (Path(out) / "tokenizer.json").exists() and (Path(out) / "tokenizer_config.json").exists()
        assert not list(tmp_path.glob(".*")), "temporary or replaced export directory left behind"

    # transformers loads the sharded export and computes the same logits as from the source
    tokens = torch.randint(0, 379, (1, 8))
    assert torch.equal(hf_logits(pairs[tiny_checkpoints["llama"]], tokens), hf_logits(tiny_checkpoints["llama"], tokens))

    # iter_hf_tensors: same names in the same order on every rank, tensors only on dst_rank=3, bf16 as asked
    source = read_checkpoint(tiny_checkpoints["qwen3_tied"])
    names = [[name for name, _ in r["items"]] for r in results]
    assert all(n == names[0] for n in names) and sorted(names[0]) == sorted(source)
    assert "lm_head.weight" not in names[0]  # tied: exported once, as the embedding
    for rank, r in enumerate(results):
        assert r["padded_rows_zero"], f"rank {rank}: padded vocabulary rows are not zero"
        for name, tensor in r["items"]:
            if rank == 3:
                assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, source[name].bfloat16()), name
            else:
                assert tensor is None


def _write_config(src, dst: Path, **changes) -> str:
    cfg = json.loads(Path(src, "config.json").read_text())
    cfg.update(changes)
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


def test_bad_input_errors_name_the_field(tiny_checkpoints, tmp_path):
    src = Path(tiny_checkpoints["qwen3"])
    missing = Path(_write_config(src, tmp_path / "missing"))
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    cases = {
        "kv_heads": ("build", dict(path=_write_config(src, tmp_path / "kv", num_key_value_heads=1))),
        "missing": ("load", dict(path=str(missing))),
        "fp8": ("build", dict(path=str(src), fp8="hybrid")),
        "fp8_recipe": ("build", dict(path=str(src), fp8_recipe="mxfp8")),
        "arch": ("build", dict(path=_write_config(src, tmp_path / "arch", architectures=["FooForCausalLM"],
                                                  model_type="qwen3_moe"))),
        "no_config": ("build", dict(path=str(tmp_path))),
    }
    expected = {
        "kv_heads": r"tensor_model_parallel_size=2: 1 KV heads \(query groups\) cannot be split evenly",
        "missing": r"missing tensor 'model.layers.1.mlp.up_proj.weight'",
        "fp8": r"model.fp8='hybrid' \(or teacher.fp8\) needs Transformer Engine .* set model.fp8=null",
        "fp8_recipe": r"model.fp8_recipe must be one of",
        "arch": r"architectures=\['FooForCausalLM'\].*supported architectures",
        "no_config": r"has no config.json",
    }
    results = run_distributed(bad_inputs, 2, ParallelConfig(tensor_model_parallel_size=2), cases)
    for rank_result in results:
        for name, pattern in expected.items():
            assert re.search(pattern, rank_result[name]), f"{name}: {rank_result[name]!r}"


def test_layout_validation():
    from megatron_opsd.errors import UsageError
    from megatron_opsd.models.layout import validate_layout
    from megatron_opsd.models.shape import ModelShape

    shape = ModelShape(hidden_size=192, num_layers=6, num_heads=6, num_kv_heads=2, head_dim=32, intermediate_size=384,
                       vocab_size=379)
    validate_layout(shape, tp=2, pp=3)
    with pytest.raises(UsageError, match=r"tensor_model_parallel_size=4: 6 attention heads cannot be split evenly"):
        validate_layout(shape, tp=4, pp=1)
    with pytest.raises(UsageError, match=r"6 layers cannot be split into PP x VPP = 4 equal stages"):
        validate_layout(shape, tp=1, pp=2, vpp=2)


@pytest.mark.parametrize("change,pattern", [
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(attention_bias=True), r"attention_bias=True is not supported for qwen3"),
    (dict(use_sliding_window=True, sliding_window=64, max_window_layers=0), r"sliding-window attention"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                           "original_max_position_embeddings": 128}), r"rope_scaling.rope_type='yarn' is not supp"),
])
def test_unsupported_options_are_refused(change, pattern):
    from transformers import Qwen3Config

    from megatron_opsd.models.families import check_supported

    check_supported(Qwen3Config(architectures=["Qwen3ForCausalLM"]))
    with pytest.raises(ValueError, match=pattern):
        check_supported(Qwen3Config(architectures=["Qwen3ForCausalLM"], **change))


def test_unknown_architecture():
    from megatron_opsd.models.shape import detect_family

    with pytest.raises(ValueError, match="architectures=.*GPTNeoXForCausalLM.*supported architectures"):
        detect_family(SimpleNamespace(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"))


def test_padded_vocab_size():
    from megatron_opsd.models.shape import padded_vocab_size

    assert padded_vocab_size(379, 1) == 384
    assert padded_vocab_size(379, 2) == 512
    assert padded_vocab_size(151936, 8) == 152576  # Qwen3 at TP=8: multiple of 128 * 8
    assert padded_vocab_size(384, 1, make_vocab_size_divisible_by=128) == 384


def test_llama3_rope_frequencies_match_transformers(tiny_checkpoints):
    """megatron hard-codes llama3's low/high frequency factors and original context; we use HF's inv_freq: the
    frequencies equal those of the transformers model's own rotary embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_opsd.models.gpt import hf_inv_freq

    cfg = AutoConfig.from_pretrained(tiny_checkpoints["llama"])
    ours = hf_inv_freq(cfg)
    ref = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"]).model.rotary_emb.inv_freq
    plain = 1.0 / (10000.0 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32))
    assert torch.equal(ours, ref.float())
    assert not torch.allclose(ours, plain)  # the scaling changes some frequencies: the parity test exercises it
