"""Per-GPU memory model for OPSD training on megatron-core.

Why: an OPSD step holds the student's training state, a teacher copy, the student's activations and two sets
of full-vocabulary logits at once; a wrong TP/PP/micro-batch choice costs a queue wait and a crash. Every term
is a closed formula (written out in docs/scale.md) so a user can check it by hand. Sizes are bytes. The model's
shape is read by ``models.shape.ModelShape``; the layout checks are ``planning/layout.py``, the advice
``planning/advice.py``, the table ``planning/table.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron_opsd.models.shape import ModelShape
from megatron_opsd.planning.lora import lora_stage_components
from megatron_opsd.planning.settings import Cluster, TrainSettings, check_choices

# fp32 [chunk, vocab/TP] tensors alive at once in the divergence's chunk loop: three reused buffers, plus one
# temporary when the gradient is cast into bf16 logits' dtype.
DIVERGENCE_CHUNK_BUFFERS = 4
# Transformer Engine's FP8 weight caches per GEMM weight: a trained weight keeps its FP8 cast and the cast of its
# transpose (the backward's dgrad GEMM); a no-grad teacher only the forward cast.
FP8_CACHE_BYTES_TRAINED = 2
FP8_CACHE_BYTES_FROZEN = 1


# ----------------------------------------------------------------------------------------------- activations
def teacher_weight_bytes(s: TrainSettings, params: int) -> float:
    """The teacher replica (frozen/ema/refresh), the fp32 EMA average of a 16-bit EMA teacher
    (``schedule.FP32EMA``), and Purified OPSD's frozen initial model when the teacher is not already frozen."""
    total = 0 if s.teacher_weights == "live" else params * s.param_bytes
    if s.teacher_weights == "ema" and s.param_bytes < 4:
        total += params * 4
    if s.teacher_forwards == 3 and s.teacher_weights != "frozen":
        total += params * s.param_bytes
    return total


def activation_bytes_per_token_per_layer(shape: ModelShape, s: TrainSettings, recompute: Optional[str] = "auto"
                                         ) -> float:
    """Bytes one layer keeps for backward per token on one TP rank (Korthikanti et al. 2022, generalised).

    ``te`` (GPU, Transformer Engine spec, fused attention): for GPT-3 (MHA, 4h GELU MLP, no RoPE, dropout) this
    is exactly Korthikanti's 34*h bytes per token (their selective-recompute figure: fused attention never
    stores the s x s scores). ``local`` (megatron's local spec, as on CPU): torch RMSNorm keeps fp32 copies,
    core attention is unfused (fp32 softmax + 16-bit probabilities, K and V expanded to all heads).
    """
    recompute = s.recompute if recompute == "auto" else recompute
    e, h, f, q, kv = s.activation_bytes, shape.hidden_size, shape.intermediate_size, shape.q_width, shape.kv_width
    tp = s.tensor_parallel
    sp = tp if s.sequence_parallel else 1
    if recompute == "full":  # only the layer input survives; the layer is re-run in backward
        return e * h / sp
    local = s.implementation == "local"
    # Replicated across TP ranks (split by sequence parallel): two norms' saved tensors, QKV and fc1 inputs.
    norm = _norm_bytes(s, h)
    replicated = 2 * norm + 2 * e * h + (2 * h if s.hidden_dropout else 0)  # + two 1-byte dropout masks
    # RoPE's cos and sin for Q and K: per position, shared by the micro-batch (unfused RoPE).
    rope = 4 * shape.head_dim * e / s.micro_batch_size if shape.rope else 0
    # TP-split: attention tensors and the MLP.
    if local:
        attn = 3 * e * q + e * q  # Q, K and V expanded to all heads, attention output (proj input)
        if shape.qk_layernorm:
            attn += 8 * (q + kv) + 4 * (shape.num_heads + shape.num_kv_heads)
        if recompute != "selective":  # fp32 softmax output + 16-bit probabilities (+ dropout mask and output)
            attn += shape.num_heads * s.seq_length * (4 + e + ((1 + e) if s.attention_dropout else 0))
    else:
        attn = e * (q + 2 * kv) + e * q  # QKV output (Q, K, V), attention output; fused attention: no s x s
        if shape.rope:
            attn += e * (q + kv)  # RoPE'd Q and K are new tensors
    mlp = 5 * e * f if shape.gated_mlp else 2 * e * f  # gated: fc1 out (2f), silu out, x_linear + 0, fc2 in
    return replicated / sp + rope + (attn + mlp) / tp


def _norm_bytes(s: TrainSettings, width: int) -> float:
    """Saved by one RMSNorm per token: local torch norm keeps fp32 input + fp32 normalised + rstd; TE the input."""
    return 2 * 4 * width + 4 if s.implementation == "local" else s.activation_bytes * width


def in_flight_microbatches(s: TrainSettings, stage: int) -> float:
    """Microbatches whose activations a pipeline stage holds at its peak under 1F1B (interleaved: Megatron-LM's factor)."""
    pp = s.pipeline_parallel
    if pp == 1:
        return 1.0
    n = float(min(pp - stage, s.num_microbatches))
    if s.virtual_pipeline:
        n *= 1 + (pp - 1) / (pp * s.virtual_pipeline)
    return n


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class StagePlan:
    stage: int
    params: int  # parameters held by one rank of this stage
    components: dict = field(default_factory=dict)  # name -> bytes

    @property
    def total(self) -> int:
        return int(sum(self.components.values()))


@dataclass
class MemoryPlan:
    shape: ModelShape
    settings: TrainSettings
    stages: list

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda st: st.total)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total


def stage_params(shape: ModelShape, s: TrainSettings, stage: int) -> int:
    """Parameters one rank of pipeline stage ``stage`` holds (embedding first, norm + output layer last)."""
    tp, pp = s.tensor_parallel, s.pipeline_parallel
    embedding = shape.padded_vocab(tp, s.make_vocab_size_divisible_by) * shape.hidden_size // tp
    params = shape.num_layers // pp * shape.layer_params(tp)
    if stage == 0:
        params += embedding
    if stage == pp - 1:
        params += shape.hidden_size
        # untied: the output layer; tied at PP>1: megatron keeps a copy of the embedding on the last stage
        if not shape.tie_word_embeddings or pp > 1:
            params += embedding
    return params


def estimate_memory(shape: ModelShape, s: TrainSettings) -> MemoryPlan:
    """Per-GPU bytes for every pipeline stage (one TP/DP rank of each)."""
    check_choices(s)
    tp = s.tensor_parallel
    vocab_shard = shape.padded_vocab(tp, s.make_vocab_size_divisible_by) // tp
    tokens = s.micro_batch_size * s.seq_length  # tokens of one microbatch on this rank
    grad_bytes = 4 if s.grad_reduce_in_fp32 else s.param_bytes
    optim_bytes = (4 if s.param_bytes < 4 else 0) + 8  # fp32 master copy (if params are 16-bit) + Adam m, v
    optim_shards = s.data_parallel if s.use_distributed_optimizer else 1
    per_layer = activation_bytes_per_token_per_layer(shape, s)
    layers = shape.num_layers // s.pipeline_parallel
    stages = []
    for stage in range(s.pipeline_parallel):
        params = stage_params(shape, s, stage)
        c = {
            "student weights": params * s.param_bytes,
            "student grads": params * grad_bytes,
            "optimizer state": params * optim_bytes / optim_shards,
            "teacher weights": teacher_weight_bytes(s, params),
        }
        gemm = shape.num_layers // s.pipeline_parallel * shape.layer_gemm_params(tp)
        if s.fp8:  # TE keeps an FP8 copy of each GEMM weight and its transpose (backward): 2 B per weight
            c["student fp8 weight cache"] = FP8_CACHE_BYTES_TRAINED * gemm
        if s.teacher_fp8 and s.teacher_weights != "live":  # no backward: the FP8 copy only
            c["teacher fp8 weight cache"] = FP8_CACHE_BYTES_FROZEN * gemm
        if s.lora_rank:  # LoRA hook: training state for the adapters only, no teacher replica
            c = lora_stage_components(shape, s, params, c)
        act = layers * per_layer * tokens * in_flight_microbatches(s, stage)
        if stage == 0:  # token ids (int64)
            act += 8 * tokens * in_flight_microbatches(s, stage)
        if stage == s.pipeline_parallel - 1:  # final norm's saved tensors and the output layer's input
            act += (_norm_bytes(s, shape.hidden_size) + s.activation_bytes * shape.hidden_size) * tokens
        c["activations"] = act
        if s.recompute == "full":  # the layer being re-run in backward holds its full activations meanwhile
            c["recompute working set"] = activation_bytes_per_token_per_layer(shape, s, recompute=None) * tokens
        if stage == s.pipeline_parallel - 1:
            logits = tokens * vocab_shard * s.logits_bytes
            response = (s.response_tokens or s.seq_length) * s.micro_batch_size
            held = s.num_microbatches if s.teacher_logits_held == "step" else 1
            c["student logits"] = logits
            c["student logits grad"] = logits
            c["teacher logits"] = response * vocab_shard * s.logits_bytes * s.teacher_forwards * held
            c["divergence chunks"] = DIVERGENCE_CHUNK_BUFFERS * min(s.chunk_tokens, tokens) * vocab_shard * 4
        if stage == 0 and s.push_bucket_bytes:  # global rank 0 sends the push, between steps
            step_transients = sum(c.get(k, 0) for k in STEP_TRANSIENTS)
            c["weight push beyond the step's transients (rank 0)"] = max(0, push_sender_bytes(shape, s)
                                                                         - step_transients)
        stages.append(StagePlan(stage=stage, params=params, components=c))
    return MemoryPlan(shape=shape, settings=s, stages=stages)


# freed after each step, so the weight push (between steps) reuses their room
STEP_TRANSIENTS = ("activations", "recompute working set", "student logits", "student logits grad",
                   "teacher logits", "divergence chunks")


def largest_tensor_bytes(shape: ModelShape, s: TrainSettings) -> int:
    """The largest full (TP-gathered) tensor the push exports: the embedding / LM head or the fused MLP input."""
    vocab = shape.padded_vocab(1, s.make_vocab_size_divisible_by)
    return max(vocab * shape.hidden_size, 2 * shape.intermediate_size * shape.hidden_size) * s.param_bytes


def push_sender_bytes(shape: ModelShape, s: TrainSettings) -> int:
    """Trainer rank 0 during a collective push (``rollout/client/collective.broadcast_update``): one bucket on the wire,
    the next bucket's tensors and their packed copy, plus the gather of the largest tensor (its TP shards and
    their concatenation)."""
    return 3 * s.push_bucket_bytes + 2 * largest_tensor_bytes(shape, s)


def push_receiver_bytes(shape: ModelShape, s: TrainSettings, sidecar_tp: int) -> int:
    """One vLLM worker during a push: two receive buffers, and one layer's shard re-processed by the reload."""
    return 2 * s.push_bucket_bytes + shape.layer_params(1) * 2 // sidecar_tp


def sidecar_weight_bytes(shape: ModelShape, sidecar_tp: int) -> float:
    """bf16 weights per vLLM GPU (vLLM pads nothing material; embeddings are vocab-sharded)."""
    return shape.total_params() * 2 / sidecar_tp


def sidecar_kv_tokens(shape: ModelShape, cluster: Cluster) -> int:
    """Tokens of KV cache one sidecar replica can hold after its weights."""
    stp = cluster.sidecar_tp
    kv_heads_per_gpu = max(1, shape.num_kv_heads // stp)
    per_token = 2 * shape.num_layers * kv_heads_per_gpu * shape.head_dim * 2  # K and V, bf16
    free = cluster.gpu_memory * cluster.sidecar_memory_utilization - sidecar_weight_bytes(shape, stp)
    return max(0, int(free // per_token))
