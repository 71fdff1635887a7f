"""The memory planner: published-model numbers against hand calculations, layout errors, the CLI on the
example configs, and the tiny model's estimate against a real megatron training step on CPU."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from megatron_opsd.planning import (
    Cluster,
    LayoutError,
    ModelShape,
    TrainSettings,
    activation_bytes_per_token_per_layer,
    combined_fix,
    estimate_memory,
    parse_memory_size,
    suggest_changes,
    validate_layout,
)
from megatron_opsd.planning.settings import GIB

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "model_configs"


def shape(name: str) -> ModelShape:
    return ModelShape.from_hf_config(MODELS / name)


@pytest.mark.parametrize("name,total", [
    ("qwen3-8b", 8_190_735_360),  # the published totals (model cards: 8.2B, 14.8B, 32.8B, 70.6B)
    ("qwen3-14b", 14_768_307_200),
    ("qwen3-32b", 32_762_123_264),
    ("llama-3.1-70b", 70_553_706_496),
])
def test_published_parameter_counts(name, total):
    assert shape(name).total_params() == total


def test_model_config_values():
    q8, q14, q32, llama = (shape(n) for n in ("qwen3-8b", "qwen3-14b", "qwen3-32b", "llama-3.1-70b"))
    assert (q8.hidden_size, q8.num_layers, q8.num_heads, q8.num_kv_heads, q8.head_dim, q8.intermediate_size,
            q8.vocab_size, q8.tie_word_embeddings, q8.qk_layernorm) == (4096, 36, 32, 8, 128, 12288, 151936, False, True)
    assert (q14.hidden_size, q14.num_layers, q14.num_heads, q14.num_kv_heads, q14.intermediate_size) == \
        (5120, 40, 40, 8, 17408)
    assert (q32.hidden_size, q32.num_layers, q32.num_heads, q32.num_kv_heads, q32.intermediate_size) == \
        (5120, 64, 64, 8, 25600)
    assert (llama.hidden_size, llama.num_layers, llama.num_heads, llama.num_kv_heads, llama.head_dim,
            llama.intermediate_size, llama.vocab_size, llama.qk_layernorm) == \
        (8192, 80, 64, 8, 128, 28672, 128256, False)


def test_qwen3_8b_table_by_hand():
    """TP=2 SP DP=3, full recompute, frozen teacher, 1 x (1024 + 8192) tokens, 11 microbatches per step."""
    s = TrainSettings(tensor_parallel=2, data_parallel=3, sequence_parallel=True, micro_batch_size=1,
                      seq_length=9216, response_tokens=8192, num_microbatches=11, recompute="full",
                      teacher_weights="frozen", chunk_tokens=1024)
    stage = estimate_memory(shape("qwen3-8b"), s).stages[0]
    # vocabulary 151936 padded to a multiple of 128 * 2 = 152064, 76032 rows per TP rank
    layer = (4096 * 6144 + 4096 * 4096 + 4096 * 2 * 12288 + 12288 * 4096) // 2 + 2 * 4096 + 2 * 128
    params = 36 * layer + 2 * 152064 * 4096 // 2 + 4096
    assert stage.params == params == 4_096_046_080
    c = stage.components
    assert c["student weights"] == 2 * params
    assert c["student grads"] == 4 * params  # fp32 main grads
    assert c["optimizer state"] == 12 * params / 3  # fp32 master + Adam m, v, sharded over DP=3
    assert c["teacher weights"] == 2 * params
    assert c["activations"] == 36 * (2 * 4096 / 2) * 9216 + 8 * 9216 + (2 * 4096 + 2 * 4096) * 9216
    no_recompute = (2 * 2 * 4096 + 2 * 2 * 4096) / 2 + 4 * 128 * 2 + (
        2 * (4096 + 2 * 1024) + 2 * 4096 + 2 * (4096 + 1024) + 5 * 2 * 12288) / 2
    assert no_recompute == 94208
    assert c["recompute working set"] == no_recompute * 9216
    assert c["student logits"] == c["student logits grad"] == 9216 * 76032 * 4
    assert c["teacher logits"] == 8192 * 76032 * 4 * 11
    assert c["divergence chunks"] == 4 * 1024 * 76032 * 4
    assert stage.total == pytest.approx(79.90 * GIB, rel=1e-3)


def test_llama_70b_pipeline_stages_by_hand():
    """TP=8 PP=4 (4 nodes), selective recompute, SP, live teacher, 64 microbatches of 1 x 5120 tokens."""
    s = TrainSettings(tensor_parallel=8, pipeline_parallel=4, data_parallel=1, sequence_parallel=True,
                      micro_batch_size=1, seq_length=5120, response_tokens=4096, num_microbatches=64,
                      recompute="selective", teacher_weights="live", teacher_logits_held="microbatch")
    plan = estimate_memory(shape("llama-3.1-70b"), s)
    layer = (8192 * 10240 + 8192 * 8192 + 8192 * 2 * 28672 + 28672 * 8192) // 8 + 2 * 8192
    vocab_shard = 129024 // 8  # 128256 padded to a multiple of 128 * 8
    first, last = plan.stages[0], plan.stages[3]
    assert first.params == 20 * layer + vocab_shard * 8192
    assert last.params == 20 * layer + vocab_shard * 8192 + 8192
    assert plan.stages[1].params == 20 * layer
    per_token_layer = 4 * 2 * 8192 / 8 + 4 * 128 * 2 + (2 * (8192 + 2048) + 2 * 8192 + 2 * (8192 + 1024)
                                                        + 5 * 2 * 28672) / 8
    assert per_token_layer == 51968
    assert first.components["activations"] == 20 * per_token_layer * 5120 * 4 + 8 * 5120 * 4  # 4 in flight
    assert last.components["activations"] == 20 * per_token_layer * 5120 + 2 * 2 * 8192 * 5120  # 1 in flight
    assert first.components["optimizer state"] == 12 * first.params  # DP=1: nothing to shard over
    assert "teacher logits" not in first.components and first.components["teacher weights"] == 0
    assert last.components["teacher logits"] == 4096 * vocab_shard * 4
    assert plan.peak.stage == 0


def test_fp8_weight_caches_by_hand():
    """Qwen3-8B TP=2 FP8 student (2 B per GEMM weight: the cast and its transpose) and FP8 frozen teacher (1 B);
    a BF16 teacher or a live one adds nothing."""
    base = dict(tensor_parallel=2, data_parallel=3, micro_batch_size=1, seq_length=9216, response_tokens=8192,
                num_microbatches=11, teacher_weights="frozen")
    gemm_per_rank = 36 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 4096 * 2 * 12288 + 12288 * 4096) // 2
    assert gemm_per_rank == 36 * 4096 * 47104 // 2  # 3.47 G weights per rank
    both = estimate_memory(shape("qwen3-8b"), TrainSettings(**base, fp8="hybrid", teacher_fp8="hybrid")).stages[0]
    assert both.components["student fp8 weight cache"] == 2 * gemm_per_rank
    assert both.components["teacher fp8 weight cache"] == gemm_per_rank
    bf16_teacher = estimate_memory(shape("qwen3-8b"), TrainSettings(**base, fp8="hybrid")).stages[0].components
    assert "teacher fp8 weight cache" not in bf16_teacher
    live = dict(base, teacher_weights="live")
    assert "teacher fp8 weight cache" not in estimate_memory(
        shape("qwen3-8b"), TrainSettings(**live, fp8="hybrid", teacher_fp8="hybrid")).stages[0].components
    assert "student fp8 weight cache" not in estimate_memory(shape("qwen3-8b"), TrainSettings(**base)).stages[0].components


@pytest.mark.parametrize("pp,held", [(1, "microbatch"), (2, "step")])
def test_plan_holds_what_the_trainer_holds(pp, held):
    """The trainer runs the teacher per micro-batch at PP=1 and for the whole step at PP > 1
    (training.opsd.step.teacher_signal_source); the plan derives the same from the config, and teacher.fp8 resolves."""
    from megatron_opsd.config import load_config
    from megatron_opsd.planning.cli import settings_from_config

    cfg = load_config(str(ROOT / "examples" / "configs" / "qwen3-8b_opsdc.yaml"),
                      [f"parallel.pipeline_model_parallel_size={pp}", "model.fp8=hybrid", "teacher.fp8=null"])
    settings, _ = settings_from_config(cfg, data_parallel=3)
    assert settings.teacher_logits_held == held
    assert settings.fp8 == "hybrid" and settings.teacher_fp8 is None
    cfg.teacher.fp8 = "student"
    assert settings_from_config(cfg, data_parallel=3)[0].teacher_fp8 == "hybrid"


def test_plan_pads_sequences_as_the_trainer_does():
    """The planned length is the trainer's padded one (models.gpt.sequence_multiple): with FP8 and sequence
    parallelism at TP=4 a multiple of 32 (8 rows per rank), and validate_layout refuses a length that is not."""
    from megatron_opsd.config import load_config
    from megatron_opsd.planning.cli import settings_from_config

    over = ["parallel.tensor_model_parallel_size=4", "parallel.sequence_parallel=true", "data.max_prompt_tokens=1000",
            "rollout.max_tokens=3004"]
    path = str(ROOT / "examples" / "configs" / "qwen3-8b_opsdc.yaml")
    assert settings_from_config(load_config(path, over + ["model.fp8=null"]), 2)[0].seq_length == 4008
    fp8, _ = settings_from_config(load_config(path, over + ["model.fp8=hybrid"]), 2)
    assert fp8.seq_length == 4032
    validate_layout(shape("qwen3-8b"), fp8)
    with pytest.raises(LayoutError, match=r"4004 x micro-batch 1 / TP=4 \(sequence parallel\) = 1001 rows per rank"):
        validate_layout(shape("qwen3-8b"), replace(fp8, seq_length=4004))


def test_korthikanti_formula_for_gpt3():
    """GPT-3 175B (MHA, 4h GELU MLP, no RoPE, dropout): 34 h bytes per token and layer; TP splits 24 of them."""
    gpt3 = ModelShape(hidden_size=12288, num_layers=96, num_heads=96, num_kv_heads=96, head_dim=128,
                      intermediate_size=4 * 12288, vocab_size=51200, gated_mlp=False, rope=False)
    h = 12288
    for tp, sp, expected in ((1, False, 34 * h), (8, False, h * (10 + 24 / 8)), (8, True, 34 * h / 8)):
        s = TrainSettings(tensor_parallel=tp, sequence_parallel=sp, hidden_dropout=True, attention_dropout=True)
        assert activation_bytes_per_token_per_layer(gpt3, s) == pytest.approx(expected)
    full = TrainSettings(tensor_parallel=8, recompute="full")
    assert activation_bytes_per_token_per_layer(gpt3, full) == 2 * h  # only the layer input


def test_interleaved_and_bubble_in_flight():
    q32 = shape("qwen3-32b")
    base = dict(tensor_parallel=8, pipeline_parallel=4, micro_batch_size=1, seq_length=4096, num_microbatches=16)
    plain = estimate_memory(q32, TrainSettings(**base)).stages[0].components["activations"]
    inter = estimate_memory(q32, TrainSettings(**base, virtual_pipeline=2)).stages[0].components["activations"]
    ids = 8 * 4096
    assert (inter - ids * 4 * 1.375) == pytest.approx((plain - ids * 4) * (1 + 3 / 8))  # Megatron-LM's factor
    few = estimate_memory(q32, TrainSettings(**{**base, "num_microbatches": 2})).stages[0].components["activations"]
    assert (few - ids * 2) == pytest.approx((plain - ids * 4) / 2)  # only 2 microbatches can be in flight


@pytest.mark.parametrize("kwargs,cluster,needle", [
    (dict(tensor_parallel=16), None, "40 attention heads"),
    (dict(tensor_parallel=5), None, "8 KV heads"),
    (dict(pipeline_parallel=3), None, "40 layers cannot be split"),
    (dict(pipeline_parallel=1, virtual_pipeline=2), None, "virtual_pipeline_model_parallel_size needs"),
    (dict(tensor_parallel=4, sequence_parallel=True, seq_length=4098), None, "multiple of TP=4"),
    (dict(tensor_parallel=4, data_parallel=2), Cluster(num_nodes=1, sidecar_replicas=1, sidecar_tp=4), "give DP=1"),
    (dict(tensor_parallel=4, data_parallel=2), Cluster(num_nodes=1, sidecar_replicas=1, sidecar_tp=2),
     "not divisible by TP x PP = 4"),
    (dict(tensor_parallel=8), Cluster(num_nodes=2, sidecar_replicas=1, sidecar_tp=3, sidecar_shares_nodes=False)
     , "vLLM needs the 40 attention heads"),
    (dict(tensor_parallel=8), Cluster(num_nodes=1, sidecar_replicas=1, sidecar_tp=16, sidecar_shares_nodes=False),
     "must stay within a node"),
    (dict(tensor_parallel=8), Cluster(num_nodes=1, gpu_memory=24 * GIB, sidecar_replicas=1, sidecar_tp=1,
                                      sidecar_shares_nodes=False), "raise --sidecar-tp"),
])
def test_layout_errors_name_the_field_and_fix(kwargs, cluster, needle):
    with pytest.raises(LayoutError, match=needle):
        validate_layout(shape("qwen3-14b"), TrainSettings(**kwargs), cluster)


def test_global_batch_divisibility():
    s = TrainSettings(tensor_parallel=2, data_parallel=3)
    with pytest.raises(LayoutError, match=r"global batch 32 .* not divisible by optim.micro_batch_size x DP"):
        validate_layout(shape("qwen3-8b"), s, Cluster(num_nodes=1, sidecar_replicas=1, sidecar_tp=2), global_batch=32)
    assert validate_layout(shape("qwen3-8b"), s, Cluster(num_nodes=1, sidecar_replicas=1, sidecar_tp=2),
                           global_batch=33) == []


def test_suggestions_are_sorted_lower_the_peak_and_combine():
    q8 = shape("qwen3-8b")
    cluster = Cluster(num_nodes=1)
    s = TrainSettings(tensor_parallel=2, data_parallel=4, micro_batch_size=2, seq_length=9216, num_microbatches=4)
    peak = estimate_memory(q8, s).peak_bytes
    assert peak > cluster.budget
    advice = suggest_changes(q8, s, cluster)
    peaks = [p for _, p, _ in advice]
    assert peaks == sorted(peaks) and all(p < peak for p in peaks)
    assert advice[0][0] == "model.recompute_granularity=full" and not advice[0][2]
    assert not any("selective" in text for text, _, _ in advice)  # fused attention: selective saves nothing
    assert any(text.startswith("parallel.tensor_model_parallel_size=4 (DP=2)") for text, _, _ in advice)
    steps, fixed_peak = combined_fix(q8, s, cluster)
    assert len(steps) >= 2 and steps[0] == "model.recompute_granularity=full" and fixed_peak <= cluster.budget


def test_parse_memory_size():
    assert parse_memory_size("80GB") == parse_memory_size("80GiB") == parse_memory_size("80g") == 80 * GIB
    assert parse_memory_size("24576MiB") == 24 * GIB
    with pytest.raises(ValueError, match="--gpu-memory"):
        parse_memory_size("eighty")


# --------------------------------------------------------------------------------------------- example configs
@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "examples" / "configs").glob("*.yaml")))
def test_example_configs_plan_fits(config, capsys):
    from megatron_opsd.cli import main
    from megatron_opsd.config import load_config

    path = ROOT / "examples" / "configs" / config
    command = next(line for line in path.read_text().splitlines() if line.startswith("# plan: megatron-opsd plan "))
    args = command.split()[4:]  # the `plan` arguments the config's header documents; each must fit (exit 0)
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    load_config(str(path))  # the keys are the config module's
    rc = main(["plan", *args])
    out = capsys.readouterr()
    assert rc == 0, out.out + out.err
    assert "FITS" in out.out


def test_cli_refuses_and_advises(capsys):
    from megatron_opsd.cli import main

    rc = main(["plan", "--model-config", str(MODELS / "qwen3-8b"), "--set", "parallel.tensor_model_parallel_size=2",
               "--set", "rollout.max_tokens=8192", "--set", "rollout.prompts_per_step=32",
               "--set", "model.params_dtype=bfloat16"])
    out = capsys.readouterr().out
    assert rc == 1 and "DOES NOT FIT" in out and "model.recompute_granularity=full" in out
    rc = main(["plan", "--model-config", str(MODELS / "qwen3-8b"), "--set", "parallel.tensor_model_parallel_size=3"])
    assert rc == 2 and "32 attention heads" in capsys.readouterr().err
    # context parallelism is neither modelled nor offered: refused with the trainer's one line
    rc = main(["plan", "--model-config", str(MODELS / "qwen3-8b"), "--set", "parallel.context_parallel_size=2"])
    err = capsys.readouterr().err
    assert rc == 2 and "context parallelism is not supported yet" in err and len(err.strip().splitlines()) == 1
    assert not hasattr(TrainSettings(), "context_parallel")


# --------------------------------------------------------------------------------------------- measured on CPU
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    return str(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("plan") / "tiny", family="qwen3", hidden_size=128,
                                       num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256))


def _check(measured: dict, plan_stage, tol: float = 0.20) -> None:
    c = plan_stage.components
    assert measured["param_count"] == plan_stage.params
    # exact up to megatron's buffer padding
    assert measured["weights"] == pytest.approx(c["student weights"], rel=0.01)
    assert measured["grads"] == pytest.approx(c["student grads"], rel=0.01)
    assert measured["optimizer"] == pytest.approx(c["optimizer state"], rel=0.01)
    assert measured["loss_held"] == pytest.approx(c["student logits grad"], rel=0.02)  # the divergence's gradient
    assert measured["activations"] == pytest.approx(c["activations"], rel=tol)


def test_tiny_model_measured_single_rank(tiny_dir):
    """A real bf16 megatron step (DDP, distributed Adam) on CPU: weights/grads/optimizer state from the tensors'
    nbytes, activations = storages autograd saved in the forward; estimate with implementation=local."""
    from megatron_opsd.parallel import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed
    from tests._workers_planning import measured_training_steps

    modes = [None, "selective", "full"]
    results = run_distributed(measured_training_steps, 1, ParallelConfig(), tiny_dir, 128, 2, modes)[0]
    tiny = ModelShape.from_hf_config(tiny_dir)
    for mode, measured in zip(modes, results):
        s = TrainSettings(micro_batch_size=2, seq_length=128, recompute=mode, implementation="local",
                          teacher_weights="live")
        _check(measured, estimate_memory(tiny, s).stages[0])
    assert results[0]["activations"] > 1.3 * results[1]["activations"] > 3 * results[2]["activations"]


def test_tiny_model_measured_tp2(tiny_dir):
    from megatron_opsd.parallel import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed
    from tests._workers_planning import measured_training_steps

    results = run_distributed(measured_training_steps, 2, ParallelConfig(tensor_model_parallel_size=2), tiny_dir,
                              128, 2, [None])
    s = TrainSettings(tensor_parallel=2, micro_batch_size=2, seq_length=128, implementation="local",
                      teacher_weights="live")
    stage = estimate_memory(ModelShape.from_hf_config(tiny_dir), s).stages[0]
    for rank_results in results:
        _check(rank_results[0], stage)


def test_teacher_weight_bytes_count_the_fp32_ema_and_purified_initial_copy():
    from megatron_opsd.planning.memory import teacher_weight_bytes

    p = 1000
    assert teacher_weight_bytes(TrainSettings(teacher_weights="live"), p) == 0
    assert teacher_weight_bytes(TrainSettings(teacher_weights="frozen"), p) == 2 * p
    assert teacher_weight_bytes(TrainSettings(teacher_weights="ema"), p) == 6 * p  # bf16 replica + fp32 average
    assert teacher_weight_bytes(TrainSettings(teacher_weights="ema", param_bytes=4), p) == 4 * p  # its own average
    assert teacher_weight_bytes(TrainSettings(teacher_weights="frozen", teacher_forwards=3), p) == 2 * p
    assert teacher_weight_bytes(TrainSettings(teacher_weights="live", teacher_forwards=3), p) == 2 * p  # initial copy


def test_collective_weight_push_transients_by_hand():
    """Llama-3.1-70B, 1 GiB push buckets: trainer rank 0 holds one bucket on the wire, the next one's tensors and
    packed copy, and the gather of the LM head (its TP shards + the concatenation); the step's activations and
    logits are freed by then, so only the excess counts. Each TP=8 vLLM worker needs two receive buffers and one
    layer's shard outside vLLM's share: 1 - 0.9 of 80 GiB leaves room; at 0.97 it does not (one-line fix)."""
    from megatron_opsd.planning.memory import push_receiver_bytes, push_sender_bytes

    llama = shape("llama-3.1-70b")
    s = TrainSettings(tensor_parallel=8, pipeline_parallel=4, seq_length=1024, response_tokens=512,
                      push_bucket_bytes=GIB)
    lm_head = 128256 * 8192 * 2
    assert push_sender_bytes(llama, s) == 3 * GIB + 2 * lm_head  # ~7.0 GiB
    stage0 = estimate_memory(llama, s).stages[0].components
    transients = sum(stage0.get(k, 0) for k in ("activations", "recompute working set"))
    assert stage0["weight push beyond the step's transients (rank 0)"] == max(0, 3 * GIB + 2 * lm_head - transients)
    assert "weight push beyond the step's transients (rank 0)" not in \
        estimate_memory(llama, TrainSettings(tensor_parallel=8, pipeline_parallel=4)).stages[0].components
    layer = llama.layer_params(1) * 2 // 8
    assert push_receiver_bytes(llama, s, 8) == 2 * GIB + layer
    cluster = Cluster(num_nodes=4, gpu_memory=80 * GIB, sidecar_replicas=2, sidecar_tp=8, sidecar_shares_nodes=False)
    validate_layout(llama, s, cluster)  # 2.2 GiB of 8 GiB headroom
    cluster.sidecar_memory_utilization = 0.97
    with pytest.raises(LayoutError, match="lower rollout.push_bucket_mb"):
        validate_layout(llama, s, cluster)

