"""Per-GPU memory model for OPSD training on megatron-core, and the parallel-layout checks.

Why: an OPSD step holds the student's training state, a teacher copy, the student's activations and two sets
of full-vocabulary logits at once; a wrong TP/PP/micro-batch choice costs a queue wait and a crash. Every term
is a closed formula (written out in docs/scale.md) so a user can check it by hand. Sizes are bytes.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Union

from megatron_opsd.parallel.distributed import FP8_ROW_MULTIPLE
from megatron_opsd.planning.lora import lora_stage_components

GIB = 1 << 30
RECOMPUTE = (None, "selective", "full")
TEACHER_WEIGHTS = ("live", "frozen", "ema", "refresh")
IMPLEMENTATIONS = ("te", "local")
TEACHER_LOGITS_HELD = ("step", "microbatch")
# fp32 [chunk, vocab/TP] tensors alive at once in the divergence's chunk loop: three reused buffers, plus one
# temporary when the gradient is cast into bf16 logits' dtype.
DIVERGENCE_CHUNK_BUFFERS = 4
# Transformer Engine's FP8 weight caches per GEMM weight: a trained weight keeps its FP8 cast and the cast of its
# transpose (the backward's dgrad GEMM); a no-grad teacher only the forward cast.
FP8_CACHE_BYTES_TRAINED = 2
FP8_CACHE_BYTES_FROZEN = 1


@dataclass(frozen=True)
class ModelShape:
    """The numbers of an HF ``config.json`` that size a decoder-only transformer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_layernorm: bool = False  # Qwen3
    qkv_bias: bool = False  # Qwen2
    gated_mlp: bool = True  # SwiGLU (all supported families); False = GPT-3 style 2-matrix MLP
    rope: bool = True  # RoPE makes new Q, K tensors that attention saves besides the QKV output
    name: str = ""

    @classmethod
    def from_hf_config(cls, config: Union[dict, str, Path], name: Optional[str] = None) -> "ModelShape":
        """From a config dict, a ``config.json`` path or a model directory (plain JSON: no transformers import)."""
        if not isinstance(config, dict):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            if not path.exists():
                raise FileNotFoundError(f"model.path: {path} not found; point it at an HF model directory "
                                        "(or one of examples/model_configs/*)")
            name = name or path.parent.name
            config = json.loads(path.read_text())
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                               "vocab_size") if k not in config]
        if missing:
            raise ValueError(f"model config {name or ''} lacks {missing}; is it a decoder-only HF config.json?")
        heads = config["num_attention_heads"]
        model_type = config.get("model_type", "")
        archs = config.get("architectures") or []
        return cls(
            hidden_size=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate_size=config["intermediate_size"],
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_layernorm=model_type == "qwen3" or "Qwen3ForCausalLM" in archs,
            qkv_bias=model_type == "qwen2" or "Qwen2ForCausalLM" in archs or bool(config.get("attention_bias")),
            name=name or model_type,
        )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def padded_vocab(self, tp: int, divisible_by: int = 128) -> int:
        """Megatron pads the vocabulary to a multiple of ``divisible_by * TP`` (same as models.gpt)."""
        multiple = divisible_by * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    def layer_gemm_params(self, tp: int = 1) -> int:
        """Weights of one layer's GEMMs (QKV, projection, MLP) held by one TP rank: what FP8 casts."""
        h, f = self.hidden_size, self.intermediate_size
        return (h * (self.q_width + 2 * self.kv_width) + self.q_width * h + h * f * (2 if self.gated_mlp else 1)
                + f * h) // tp

    def layer_params(self, tp: int = 1) -> int:
        """Parameters of one transformer layer held by one TP rank (norm weights are replicated)."""
        bias = (self.q_width + 2 * self.kv_width) // tp if self.qkv_bias else 0
        replicated = 2 * self.hidden_size + (2 * self.head_dim if self.qk_layernorm else 0)
        return self.layer_gemm_params(tp) + bias + replicated

    def total_params(self) -> int:
        """Unpadded parameter count (what the model card quotes)."""
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params(1) + embeddings + self.hidden_size


@dataclass
class TrainSettings:
    """Everything besides the model shape that sizes a trainer rank."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline: Optional[int] = None  # no context parallelism: the trainer refuses it (ParallelConfig)
    data_parallel: int = 1
    sequence_parallel: bool = False
    micro_batch_size: int = 1
    seq_length: int = 4096  # longest packed sequence: prompt (student or teacher context) + response
    response_tokens: Optional[int] = None  # tokens per sequence whose teacher logits are kept; None = seq_length
    num_microbatches: int = 1  # per optimizer step on one DP rank
    recompute: Optional[str] = None  # None | selective | full (megatron recompute_granularity)
    teacher_weights: str = "frozen"  # live: the student itself; frozen/ema/refresh: a second copy of the weights
    teacher_forwards: int = 1  # teacher logit sets per sequence (3 for Purified OPSD: T, reference-only, base)
    # step: teacher logits of all microbatches kept (the trainer at PP > 1); microbatch: one at a time (PP = 1)
    teacher_logits_held: str = "step"
    use_distributed_optimizer: bool = True
    grad_reduce_in_fp32: bool = True
    param_bytes: int = 2  # bf16
    activation_bytes: int = 2
    logits_bytes: int = 4  # the loss works on fp32 logits
    implementation: str = "te"  # te: Transformer Engine spec (GPU); local: megatron's local spec (as on CPU)
    hidden_dropout: bool = False
    attention_dropout: bool = False
    chunk_tokens: int = 1024
    make_vocab_size_divisible_by: int = 128
    fp8: Optional[str] = None
    teacher_fp8: Optional[str] = None  # the teacher replica's (teacher.fp8 resolved); ignored for a live teacher
    lora_rank: int = 0  # model.lora.rank: base frozen, adapters trained (planning/lora.py)
    push_bucket_bytes: int = 0  # collective weight push (rollout.push_bucket_mb); 0: a staged transport

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def world_size(self) -> int:
        return self.model_parallel * self.data_parallel


@dataclass
class Cluster:
    """Where the job runs: the trainer's GPUs, and the rollout sidecars' (on the same nodes or their own)."""

    gpus_per_node: int = 8
    num_nodes: int = 1
    gpu_memory: int = 80 * GIB
    sidecar_replicas: int = 0
    sidecar_tp: int = 1
    sidecar_shares_nodes: bool = True  # False: sidecars run on extra nodes, all num_nodes GPUs train
    sidecar_memory_utilization: float = 0.9  # vLLM gpu_memory_utilization
    usable_fraction: float = 0.9  # CUDA context, NCCL buffers, allocator fragmentation take the rest

    @property
    def total_gpus(self) -> int:
        return self.gpus_per_node * self.num_nodes

    @property
    def sidecar_gpus(self) -> int:
        return self.sidecar_replicas * self.sidecar_tp

    @property
    def trainer_gpus(self) -> int:
        return self.total_gpus - (self.sidecar_gpus if self.sidecar_shares_nodes else 0)

    @property
    def budget(self) -> int:
        return int(self.gpu_memory * self.usable_fraction)


class LayoutError(ValueError):
    """A parallel layout megatron or vLLM cannot run; the message lists every problem and its fix."""


def parse_memory_size(text: Union[str, int, float]) -> int:
    """'80GB', '80G', '80GiB', '141gb', '24576MiB' -> bytes (GB is read as GiB, as GPU memory is quoted)."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"--gpu-memory {text!r}: write a size such as 80GB, 141GB or 24576MiB")
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}[match.group(2)]
    return int(float(match.group(1)) * scale)


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
    _check_choices(s)
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
    """Trainer rank 0 during a collective push (``rollout/collective.broadcast_update``): one bucket on the wire,
    the next bucket's tensors and their packed copy, plus the gather of the largest tensor (its TP shards and
    their concatenation)."""
    return 3 * s.push_bucket_bytes + 2 * largest_tensor_bytes(shape, s)


def push_receiver_bytes(shape: ModelShape, s: TrainSettings, sidecar_tp: int) -> int:
    """One vLLM worker during a push: two receive buffers, and one layer's shard re-processed by the reload."""
    return 2 * s.push_bucket_bytes + shape.layer_params(1) * 2 // sidecar_tp


def _check_choices(s: TrainSettings) -> None:
    for value, allowed, key in ((s.recompute, RECOMPUTE, "model.recompute_granularity"),
                                (s.teacher_weights, TEACHER_WEIGHTS, "teacher.weights"),
                                (s.implementation, IMPLEMENTATIONS, "implementation"),
                                (s.teacher_logits_held, TEACHER_LOGITS_HELD, "teacher_logits_held")):
        if value not in allowed:
            raise ValueError(f"{key}={value!r}: choose one of {allowed}")


# ----------------------------------------------------------------------------------------------- layout
def validate_layout(shape: ModelShape, s: TrainSettings, cluster: Optional[Cluster] = None,
                    global_batch: Optional[int] = None) -> list:
    """Raise ``LayoutError`` listing every invalid choice with its fix; return non-fatal warnings."""
    errors, warnings = [], []
    tp, pp, vpp = s.tensor_parallel, s.pipeline_parallel, s.virtual_pipeline
    for key, value in (("parallel.tensor_model_parallel_size", tp), ("parallel.pipeline_model_parallel_size", pp),
                       ("data parallel size", s.data_parallel),
                       ("optim.micro_batch_size", s.micro_batch_size)):
        if value < 1:
            errors.append(f"{key}={value} must be >= 1")
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    try:
        _check_choices(s)
    except ValueError as err:
        errors.append(str(err))
    if shape.num_heads % tp:
        errors.append(f"parallel.tensor_model_parallel_size={tp}: {shape.num_heads} attention heads cannot be split "
                      f"evenly; use a TP that divides {shape.num_heads} ({_divisors(shape.num_heads)})")
    if shape.num_kv_heads % tp:
        errors.append(f"parallel.tensor_model_parallel_size={tp}: {shape.num_kv_heads} KV heads (query groups) cannot "
                      f"be split evenly; use a TP that divides {shape.num_kv_heads} "
                      f"({_divisors(shape.num_kv_heads)})")
    if vpp is not None and pp < 2:
        errors.append("parallel.virtual_pipeline_model_parallel_size needs pipeline_model_parallel_size >= 2; "
                      "set it to null")
    stages = pp * (vpp or 1)
    if shape.num_layers % stages:
        errors.append(f"{shape.num_layers} layers cannot be split into PP x VPP = {stages} equal stages; use a "
                      f"pipeline size dividing {shape.num_layers} ({_divisors(shape.num_layers)})")
    if s.sequence_parallel and tp == 1:
        warnings.append("parallel.sequence_parallel has no effect at TP=1")
    if s.sequence_parallel and s.seq_length % tp:
        errors.append(f"parallel.sequence_parallel: sequence length {s.seq_length} must be a multiple of TP={tp}; "
                      "pad sequences to a multiple of TP")
    if s.fp8 and shape.hidden_size % 16:
        errors.append(f"model.fp8={s.fp8!r}: hidden size {shape.hidden_size} must be a multiple of 16 for FP8 GEMMs")
    split = tp if s.sequence_parallel else 1
    rows = s.seq_length * s.micro_batch_size / split  # a rank's GEMM input rows (TE: divisible by 8 in FP8)
    if (s.fp8 or s.teacher_fp8) and (s.seq_length % split or rows % FP8_ROW_MULTIPLE):
        errors.append(f"model.fp8 / teacher.fp8: sequence length {s.seq_length} x micro-batch {s.micro_batch_size}"
                      f"{f' / TP={tp} (sequence parallel)' if split > 1 else ''} = {rows:g} rows per rank must be a "
                      f"multiple of {FP8_ROW_MULTIPLE} for Transformer Engine's FP8 GEMMs; the trainer pads "
                      f"sequences to a multiple of {FP8_ROW_MULTIPLE * split}")
    if pp > 1 and s.num_microbatches < pp:
        warnings.append(f"{s.num_microbatches} microbatches per step < PP={pp}: stages idle in the pipeline bubble; "
                        "raise the batch or lower optim.micro_batch_size")
    if global_batch is not None and global_batch % (s.micro_batch_size * s.data_parallel):
        errors.append(f"global batch {global_batch} sequences (rollout.prompts_per_step x rollout.n) is not divisible "
                      f"by optim.micro_batch_size x DP = {s.micro_batch_size} x {s.data_parallel}")
    if cluster is not None:
        _validate_cluster(shape, s, cluster, errors, warnings)
    if errors:
        raise LayoutError("invalid parallel layout:\n  - " + "\n  - ".join(errors))
    return warnings


def _validate_cluster(shape: ModelShape, s: TrainSettings, cluster: Cluster, errors: list, warnings: list) -> None:
    tp, stp = s.tensor_parallel, cluster.sidecar_tp
    trainer = cluster.trainer_gpus
    if trainer < 1:
        errors.append(f"the sidecars ({cluster.sidecar_replicas} x TP {stp}) take all {cluster.total_gpus} GPUs; "
                      "leave GPUs for the trainer, add nodes or put the sidecars on their own nodes")
    elif trainer != s.world_size:
        if trainer % s.model_parallel:
            errors.append(f"{trainer} trainer GPUs (nodes x gpus-per-node - shared sidecar GPUs) are not divisible by "
                          f"TP x PP = {s.model_parallel}; change the sizes or the sidecar GPU count")
        else:
            errors.append(f"{trainer} trainer GPUs give DP={trainer // s.model_parallel}, not "
                          f"DP={s.data_parallel}")
    if tp > cluster.gpus_per_node:
        warnings.append(f"TP={tp} spans nodes ({cluster.gpus_per_node} GPUs per node): tensor-parallel all-reduces "
                        "over the network are slow; prefer PP across nodes")
    if cluster.sidecar_replicas:
        if stp < 1:
            errors.append(f"--sidecar-tp={stp} must be >= 1")
            return
        if stp > cluster.gpus_per_node:
            errors.append(f"--sidecar-tp={stp} exceeds {cluster.gpus_per_node} GPUs per node; vLLM tensor "
                          "parallelism must stay within a node")
        if shape.num_heads % stp:
            errors.append(f"--sidecar-tp={stp}: vLLM needs the {shape.num_heads} attention heads divisible by its "
                          f"TP ({_divisors(shape.num_heads)})")
        if shape.num_kv_heads % stp and stp % shape.num_kv_heads:
            errors.append(f"--sidecar-tp={stp}: vLLM needs KV heads ({shape.num_kv_heads}) and TP to divide one "
                          "another")
        weights = sidecar_weight_bytes(shape, stp)
        room = cluster.gpu_memory * cluster.sidecar_memory_utilization
        if weights >= room:
            errors.append(f"sidecar weights {weights / GIB:.1f} GiB per GPU exceed {room / GIB:.1f} GiB "
                          f"(gpu_memory_utilization {cluster.sidecar_memory_utilization}); raise --sidecar-tp")
        push, headroom = push_receiver_bytes(shape, s, stp), cluster.gpu_memory - room
        if s.push_bucket_bytes and push > headroom / 2:  # vLLM fills its share; the receive buffers are outside
            errors.append(f"the weight push needs {push / GIB:.1f} GiB per sidecar GPU (2 x rollout.push_bucket_mb "
                          f"+ one layer) outside vLLM's gpu_memory_utilization, which leaves {headroom / GIB:.1f} "
                          "GiB (half of it for CUDA's own use); lower rollout.push_bucket_mb or the utilization")


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


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0 and d <= 64)


# ----------------------------------------------------------------------------------------------- advice
def suggest_changes(shape: ModelShape, s: TrainSettings, cluster: Cluster) -> list:
    """Single changes that lower the peak, best first: ``[(description, peak_bytes, fits)]``."""
    current = estimate_memory(shape, s).peak_bytes
    return [(text, peak, fits) for text, peak, fits, _ in _candidates(shape, s, cluster) if peak < current]


def combined_fix(shape: ModelShape, s: TrainSettings, cluster: Cluster, max_changes: int = 4) -> tuple:
    """Greedy: apply the single best change until the plan fits; ``(descriptions, peak_bytes)`` or ``([], peak)``."""
    steps, peak = [], estimate_memory(shape, s).peak_bytes
    while peak > cluster.budget and len(steps) < max_changes:
        options = [c for c in _candidates(shape, s, cluster) if c[1] < peak]
        if not options:
            return [], peak
        text, peak, _, s = options[0]
        steps.append(text)
    return (steps, peak) if peak <= cluster.budget else ([], peak)


def _candidates(shape: ModelShape, s: TrainSettings, cluster: Cluster) -> list:
    candidates = []
    if s.recompute is None:
        candidates.append(("model.recompute_granularity=selective", replace(s, recompute="selective")))
    if s.recompute != "full":
        candidates.append(("model.recompute_granularity=full", replace(s, recompute="full")))
    world = s.world_size
    for name, key, attr in (("TP", "parallel.tensor_model_parallel_size", "tensor_parallel"),
                            ("PP", "parallel.pipeline_model_parallel_size", "pipeline_parallel")):
        bigger = replace(s, **{attr: getattr(s, attr) * 2})
        if world % bigger.model_parallel == 0:
            bigger.data_parallel = world // bigger.model_parallel
            bigger.num_microbatches = s.num_microbatches * s.data_parallel // bigger.data_parallel
            candidates.append((f"{key}={getattr(bigger, attr)} (DP={bigger.data_parallel})", bigger))
    if s.micro_batch_size > 1:
        candidates.append((f"optim.micro_batch_size={s.micro_batch_size // 2}",
                           replace(s, micro_batch_size=s.micro_batch_size // 2,
                                   num_microbatches=s.num_microbatches * 2)))
    if s.tensor_parallel > 1 and not s.sequence_parallel:
        candidates.append(("parallel.sequence_parallel=true", replace(s, sequence_parallel=True)))
    if s.teacher_weights != "live":
        candidates.append(("teacher.weights=live (no teacher copy)", replace(s, teacher_weights="live")))
    if s.teacher_logits_held == "step" and s.num_microbatches > 1:
        candidates.append(("--teacher-logits microbatch (teacher forward per microbatch)",
                           replace(s, teacher_logits_held="microbatch")))
    if s.logits_bytes > 2:
        candidates.append(("--logits-bytes 2 (bf16 logits)", replace(s, logits_bytes=2)))
    out = []
    for text, candidate in candidates:
        try:
            validate_layout(shape, candidate)
        except LayoutError:
            continue
        peak = estimate_memory(shape, candidate).peak_bytes
        out.append((text, peak, peak <= cluster.budget, candidate))
    return sorted(out, key=lambda item: item[1])


# ----------------------------------------------------------------------------------------------- printing
def format_plan(plan: MemoryPlan, cluster: Optional[Cluster] = None) -> str:
    """A fixed-width table: one column per distinct pipeline stage (first, middle, last), GiB."""
    s = plan.settings
    shown = sorted({0, len(plan.stages) // 2, len(plan.stages) - 1})
    stages = [plan.stages[i] for i in shown]
    names = list(dict.fromkeys(name for st in plan.stages for name in st.components))
    head = f"{'per GPU (GiB)':<22}" + "".join(f"{'stage ' + str(st.stage):>12}" for st in stages)
    lines = [
        f"model {plan.shape.name or '?'}: {plan.shape.total_params() / 1e9:.2f} B params; "
        f"TP={s.tensor_parallel} PP={s.pipeline_parallel}"
        + (f" VPP={s.virtual_pipeline}" if s.virtual_pipeline else "")
        + f" DP={s.data_parallel} SP={'on' if s.sequence_parallel else 'off'}; "
        f"micro-batch {s.micro_batch_size} x {s.seq_length} tokens, {s.num_microbatches} microbatches/step; "
        f"recompute={s.recompute or 'none'}; teacher={s.teacher_weights}; implementation={s.implementation}"
        + (f"; fp8={s.fp8}" if s.fp8 else "") + (f"; lora r={s.lora_rank}" if s.lora_rank else ""),
        head,
        "-" * len(head),
    ]
    lines.append(f"{'params (millions)':<22}" + "".join(f"{st.params / 1e6:>12.1f}" for st in stages))
    for name in names:
        lines.append(f"{name:<22}" + "".join(f"{st.components.get(name, 0) / GIB:>12.2f}" for st in stages))
    lines.append("-" * len(head))
    lines.append(f"{'total':<22}" + "".join(f"{st.total / GIB:>12.2f}" for st in stages))
    if cluster is not None:
        lines.append(f"budget: {cluster.budget / GIB:.1f} GiB per GPU ({cluster.usable_fraction:.0%} of "
                     f"{cluster.gpu_memory / GIB:.0f} GiB); peak stage {plan.peak.stage}: "
                     f"{plan.peak_bytes / GIB:.2f} GiB -> {'FITS' if plan.peak_bytes <= cluster.budget else 'DOES NOT FIT'}")
    return "\n".join(lines)
