"""The run configuration: one dataclass tree, loaded from YAML, overridden from the command line, saved back.

``load_config("x.yaml", ["loss.divergence=jsd", "--set", "optim.lr=1e-6"])`` returns an ``OPSDConfig``. Types are
taken from the dataclass annotations and enforced when loading, so a typo or a bad value fails before any
process group exists, with the full dotted key and the allowed values in the message. ``save_config``
writes the resolved tree, which ``load_config`` reads back identically.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import yaml

from megatron_opsd.errors import UsageError
from megatron_opsd.parallel.distributed import ParallelConfig

DEFAULT_PROMPT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_PROMPT_TEMPLATE = "{{ problem }}\n" + DEFAULT_PROMPT_SUFFIX
# OPSDC's instruction c as published (Sang et al. 2603.05433: the paper's teacher prompt box, em-dash included).
# The teacher prompt is c, a blank line, then the student's own prompt (data.prompt_template: the problem and its
# answer-format line), the paper's Figure 2 layout; docs/losses.md says where the published DAPO prompt differs.
DEFAULT_CONCISE_INSTRUCTION = (
    "Solve the following math problem concisely and correctly. Be direct \u2014 avoid unnecessary elaboration, "
    "redundant steps, or restating the problem. Focus only on the key reasoning steps needed to reach the answer."
)
# DemoPSD's sigmoid sharpness: the per-token JSD is at most ln 2, so alpha_t = (sigmoid(beta d) - 0.5) 2 alpha_max
# can only reach alpha_max if beta ln 2 saturates the sigmoid. beta = 8: 99.2% of alpha_max at d = ln 2, half of it
# at d = ln(3) / 8 = 0.137 nats (beta = 1 caps alpha_t at 0.33 alpha_max: a target that is nearly the teacher).
DEFAULT_DEMOPSD_BETA = 8.0


@dataclass
class LoRAConfig:
    """LoRA adapters on megatron's linear layers (docs/lora.md); rank 0 = full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0  # scale = alpha / rank (PEFT's lora_alpha)
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"])
    sync: Literal["adapter", "merged"] = "adapter"  # what each step pushes to the sidecar (rollout/client/lora.py)

    def adapter_sync(self) -> bool:
        """The sidecar serves base + adapter and each step pushes the adapter only (rank 0 is full fine-tuning:
        merged weights whatever ``sync`` says)."""
        return self.rank > 0 and self.sync == "adapter"


@dataclass
class ModelConfig:
    path: str = ""  # HF model directory (config.json + safetensors + tokenizer)
    tokenizer: Optional[str] = None  # default: model.path
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    fp8: Optional[Literal["hybrid", "e4m3"]] = None  # needs Transformer Engine on GPU; refused loudly without it
    fp8_recipe: Literal["delayed", "current"] = "current"  # current (tensorwise) scaling: no amax history (docs/gpu.md)
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    make_vocab_size_divisible_by: int = 128  # padded vocabulary rows are excluded from every divergence
    enable_thinking: Optional[bool] = None  # chat template switch (Qwen3); None = template default
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class DataConfig:
    train_path: str = ""  # JSONL or Parquet
    eval_path: Optional[str] = None
    format: Literal["auto", "jsonl", "parquet"] = "auto"  # auto: from the file suffix
    prompt_field: str = "problem"
    reference_field: str = "solution"  # optional per row: only the contexts that need it require it
    answer_field: str = "answer"
    teacher_prompt_field: str = "teacher_prompt"  # for teacher.context=per_example
    id_field: Optional[str] = None  # None: the row number
    system_prompt: Optional[str] = None  # a system turn for student and teacher
    prompt_template: Optional[str] = DEFAULT_PROMPT_TEMPLATE  # Jinja with {{ problem }}; null = the default
    max_prompt_tokens: int = 1024  # a longer chat-formatted prompt (student or teacher) is an error
    shuffle: bool = True
    seed: int = 0
    limit: Optional[int] = None  # keep only the first N rows of a dataset file
    pad_to_multiple_of: int = 8  # padded sequence length is a multiple of this (and of TP with sequence parallel)


@dataclass
class TeacherConfig:
    context: Literal["reference", "answer", "concise", "reference_only", "base", "rollout", "per_example",
                     "template"] = "reference"
    template: Optional[str] = None  # Jinja user turn (context=template): problem, reference, answer, instruction,
    # rollout (another correct rollout of the group, as for context=rollout; rows without one are skipped)
    concise_instruction: str = DEFAULT_CONCISE_INSTRUCTION  # OPSDC's conciseness instruction
    weights: Literal["live", "frozen", "ema", "refresh"] = "frozen"
    ema_decay: float = 0.999
    refresh_every: int = 50  # OPSDC's M: hard copy student -> teacher every M steps (weights=refresh)
    purified: bool = False  # Purified OPSD: full, reference-only and base teacher forwards (with loss.target=pmi)
    fp8: Optional[Literal["student", "hybrid", "e4m3"]] = "student"  # teacher replica's FP8; null: BF16 teacher


@dataclass
class SamplingConfig:
    """How the sidecar samples responses (vLLM ``SamplingParams``), defined once: the rollouts (``rollout``),
    evaluation (``evaluation.runner.EvalSettings``) and the pipeline's ``eval`` section inherit these fields, so
    their YAML keys stay flat (``rollout.temperature``); ``SidecarClient.generate`` takes one and builds the wire
    request (``rollout/protocol.py``) from ``request_fields``. Ranges: ``SAMPLING_RANGES``, checked per section."""

    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: Optional[int] = -1  # -1, 0 or null: off
    max_tokens: int = 1024  # tokens generated per sample at most

    def request_fields(self) -> dict:
        """The generate request's sampling fields (top-k off as None)."""
        return dict(n=self.n, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k if self.top_k is not None and self.top_k > 0 else None, max_tokens=self.max_tokens)


@dataclass
class RolloutConfig(SamplingConfig):
    """The training rollouts: the sampling (``SamplingConfig``'s fields: ``rollout.n``, ``rollout.temperature``,
    ...), the sidecar and its weight push, overlap, and which rollouts are distilled on."""

    sidecar_urls: list[str] = field(default_factory=list)  # empty: start a local sidecar on model.path
    local_sidecar_port: Optional[int] = None  # None: a free port
    local_sidecar_dtype: str = "float32"
    kv_cache_memory_bytes: Optional[int] = None  # vLLM KV cache size; needed on CPU (e.g. 268435456)
    local_sidecar_tensor_parallel_size: int = 1  # TP of the local sidecar (CPU: set VLLM_CPU_OMP_THREADS_BIND)
    transport: Literal["http", "shm", "collective"] = "http"  # weight push; collective: any sidecar TP
    # trainer rank 0's address for the sidecars' workers; None: its address on the route to the first remote sidecar
    collective_host: Optional[str] = None
    # collective push: fixed part of every wait (+ one bucket at a quarter of the measured rate, >= 50 MB/s);
    # keep sync_timeout_s + push_bucket_mb / 50 MB/s well below the trainer's NCCL timeout
    sync_timeout_s: float = 60.0
    push_retries: int = 2  # collective: re-pushes on a fresh transfer group after a failed push, then stop
    push_bucket_mb: int = 1024  # collective: bucket size (two in flight on trainer rank 0 and on each worker)
    # the secret every call to the sidecars carries (rollout/secret.py, docs/sidecar.md "Access"): $OPSD_SIDECAR_SECRET,
    # else the file $OPSD_SIDECAR_SECRET_FILE names, else (local sidecar) a new one for this run; or name your own:
    secret_env: Optional[str] = None  # an environment variable holding it
    secret_file: Optional[str] = None  # a file holding it, readable only by you (mode 600)
    # overlapped rollouts (training/rollout_queue.py): 0 = synchronous (each step generates its own rollouts);
    # s >= 1: the sidecar generates step k + s's rollouts while step k trains, so step k trains on rollouts of
    # weights version max(0, k - s); a batch older than the bound is never trained on
    max_staleness: int = 0
    # per-token correction of stale samples (docs/losses.md, "Stale samples"): none = the divergence at the
    # visited prefixes under the current student; truncated = min(pi_theta(y_t) / pi_behaviour(y_t), clip) on
    # the sampled-token losses (loss.coverage=sampled) and GRPO
    importance_ratio: Literal["none", "truncated"] = "none"
    importance_ratio_clip: float = 2.0
    prompts_per_step: int = 8
    filter: Literal["all", "correct", "incorrect"] = "all"  # which rollouts are distilled on (by reward)
    # at most this many of the filter's rollouts per step (a seeded uniform subset): filter arms with equal budgets
    # (oversample prompts_per_step for the rarer kind; docs/ablation2.md); null: every kept rollout
    max_kept: Optional[int] = None
    horizon: Optional[int] = None  # truncated OPD: distil on the first `horizon` response tokens
    horizon_growth: Optional[Literal["linear"]] = None  # progressive OPD: horizon_start -> horizon_end
    horizon_start: Optional[int] = None
    horizon_end: Optional[int] = None
    horizon_steps: Optional[int] = None  # steps over which the horizon grows linearly
    seed: int = 0


@dataclass
class RewardConfig:
    kind: Literal["math", "exact", "callable"] = "math"
    callable: Optional[str] = None  # "module:function(response_text, example) -> bool | float"
    boxed_only: bool = True  # only the last \boxed{...} of the response is graded


# The loss is three choices (docs/losses.md): what the student is pulled towards (target), over which tokens
# (coverage) and by which divergence; on the sampled token only, the divergence is a KL estimator.
FULL_DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
SAMPLED_ESTIMATORS = ("k1", "k3", "pg")


@dataclass
class LossConfig:
    target: Literal["teacher", "pmi", "demopsd"] = "teacher"  # what the student is pulled towards
    coverage: Literal["full", "topk", "sampled"] = "full"  # the vocabulary, the target's top-k, the sampled token
    divergence: Literal["reverse_kl", "forward_kl", "jsd", "k1", "k3", "pg"] = "reverse_kl"  # k1/k3/pg: sampled
    beta: float = 0.5  # JSD_beta: 0 = KL(teacher || student), 1 = KL(student || teacher)
    temperature: float = 1.0  # applied to student and teacher logits
    token_clip: Optional[float] = None  # clamp each vocabulary entry's (or top-k bucket's) term before summing
    top_k: Optional[int] = None  # coverage=topk: the teacher's (or target's) global top-k tokens
    topk_tail: bool = True  # coverage=topk: k + 1 buckets (the rest of the mass as one); false: renormalise over k
    reduction: Literal["token_mean", "sequence_mean", "sum"] = "token_mean"
    chunk_tokens: int = 1024  # tokens per fp32 chunk of the vocabulary-wide computation
    pmi_beta: float = 1.0  # target=pmi (Purified OPSD): beta in softmax(log pi_0 + Delta / beta)
    pmi_clip: float = 10.0  # target=pmi: the soft clip c in c * tanh(Delta / c)
    # target=pmi: where Delta is centred before the clip: uniform = its plain mean over the vocabulary (the paper's
    # "centre over the vocabulary"; dominated by the ~150k tail tokens), teacher = its mean under the full teacher
    # pi_T (= KL(pi_T || pi_R)), so the clip is symmetric around the tokens the teacher actually predicts
    pmi_center: Literal["uniform", "teacher"] = "uniform"
    demopsd_alpha_max: float = 0.15
    demopsd_beta: float = DEFAULT_DEMOPSD_BETA  # DemoPSD: alpha_t = (sigmoid(beta * JSD_t) - 0.5) * 2 * alpha_max
    allow_k1_loss: bool = False  # divergence=k1 has zero expected gradient on-policy: refused unless opted in
    # student and teacher entropy metrics (two full-vocabulary passes per step); null: only with coverage=full
    # (top-k and sampled coverage exist to avoid full-vocabulary passes)
    log_entropy: Optional[bool] = None


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    micro_batch_size: int = 1
    use_distributed_optimizer: bool = True


@dataclass
class TrainConfig:
    steps: int = 100
    seed: int = 1234
    eval_every: int = 0  # 0: no evaluation during training


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <logging.dir>/checkpoints
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    # True: continue from the newest checkpoint in dir when there is one (a rerun of a killed or requeued job);
    # False: start fresh, refused when dir holds a checkpoint (training/rundir.py: nothing is overwritten silently)
    resume: bool = True


@dataclass
class LoggingConfig:
    dir: Optional[str] = None  # None: resolved to runs/<name> by load_config
    name: Optional[str] = None  # None: the trainer's kind (opsd for train and rl, sft for sft)
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "megatron-opsd"
    log_every: int = 1
    progress: bool = True


@dataclass
class ExportConfig:
    """The final model as an HF directory, written by the training processes themselves at the end of the run
    (no second job that re-initialises the cluster and reloads the checkpoint). LoRA runs export merged weights."""

    hf_dir: Optional[str] = None  # None: no export (`megatron-opsd export` still converts any checkpoint later)
    dtype: Optional[Literal["float32", "bfloat16"]] = None  # None: the training dtype


@dataclass
class RunConfig:
    """The sections every sidecar trainer's root config composes (OPSD's ``OPSDConfig``, GRPO's ``RLTrainConfig``),
    each defined here once and checked once (``validate_values``, ``validate_run_config``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class OPSDConfig(RunConfig):
    """An OPSD run (``megatron-opsd train``): the shared sections, the teacher and the loss."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class RLConfig:
    """GRPO's ``rl:`` section (its maths: ``training/grpo/algorithm.py``; checks: ``training/grpo/config.py``)."""

    clip_eps_low: float = 0.2  # ratio clipped to [1 - clip_eps_low, 1 + clip_eps_high]
    clip_eps_high: float = 0.28  # DAPO clip-higher (0.2 = symmetric PPO)
    kl_coef: float = 0.0  # > 0: KL to a frozen reference model (the initial weights)
    kl_estimator: Literal["full", "k3", "k1"] = "full"  # full: exact reverse KL over the vocabulary
    allow_k1_kl: bool = False  # kl_estimator=k1 has zero expected gradient on-policy: refused unless opted in
    std_normalize: bool = True  # False: A = r - mean (Dr. GRPO), no division by the group std
    adv_eps: float = 1e-6
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal (all correct / all wrong)
    token_level_loss: bool = True  # DAPO token mean over the step; False: GRPO per-sequence mean
    overlong_buffer: int = 0  # DAPO L_cache: soft penalty over the last L_cache tokens before max_tokens
    overlong_penalty: float = 1.0  # the penalty reached at max_tokens
    recompute_old_logprobs: bool = False  # True: behaviour log-probs from megatron, not the sidecar
    # the KL's reference model: frozen = a replica of the initial weights; auto = frozen when kl_coef > 0, else none
    reference: Literal["auto", "frozen", "none"] = "auto"
    chunk_tokens: int = 1024  # tokens per fp32 chunk of the vocabulary-wide KL and entropy


@dataclass
class RLTrainConfig(RunConfig):
    """A GRPO run (``megatron-opsd rl``, ``training/grpo/``): the shared sections and ``rl``. No
    ``teacher``/``loss``: GRPO distils nothing."""

    rl: RLConfig = field(default_factory=RLConfig)


# k1 = log p_S(y) - log p_T(y) at y ~ p_S: its value estimates KL(p_S || p_T), but its gradient is grad log p_S(y),
# whose expectation under on-policy sampling is 0 (sum_y grad p_S(y) = grad 1): as a loss it trains on noise.
K1_REFUSAL = ("{key} trains on noise: the k1 estimator's expected gradient is 0 under on-policy sampling (it is "
              "for logging the KL); use {fix}, or set {opt_in} to train with it anyway")


class ConfigError(UsageError):
    """A bad key or value in a config file or override; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------------------
# Coercion from the annotations (YAML values, or strings from the command line)
# ----------------------------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"null", "none", "~", ""}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to annotation ``tp``; ConfigError naming ``key`` if impossible."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        nullable = type(None) in args
        if nullable and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0] + (" (or null)" if nullable else ""))
        raise ConfigError(f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        for allowed in args:
            if value == allowed or (isinstance(value, str) and str(allowed) == value):
                return allowed
        raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
    if origin is list or tp is list:
        inner = args[0] if args else str
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                text = text[1:-1]
            items = [t.strip() for t in text.split(",") if t.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{key}: expected a list of {_type_name(inner)} (YAML list or 'a,b,c'), got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(items)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value if value is not None else {}, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r} in the config dataclass")


# keys that no longer exist -> what to do instead (a one-line ConfigError instead of "unknown key"); only for the
# message: nothing reads an old key
REMOVED_KEYS = {"rollout.keep_previous_weights": "removed: a collective push that fails is torn down on both ends "
                                                 "and pushed again (rollout.push_retries), the sidecar refusing "
                                                 "/generate meanwhile; delete the key",
                "loss.kind": "replaced by loss.coverage and loss.divergence (docs/losses.md): kind=topk -> "
                             "loss.coverage=topk; kind=k1|k3|pg -> loss.coverage=sampled loss.divergence=<kind>; "
                             "kind=reverse_kl|forward_kl|jsd -> loss.coverage=full loss.divergence=<kind>",
                "loss.topk_divergence": "replaced by loss.divergence (with loss.coverage=topk)",
                **{f"teacher.{name}": f"moved: use loss.{name}" for name in ("pmi_beta", "pmi_clip", "pmi_center")}}


def _unknown_key(key: str, where: str, names: list) -> ConfigError:
    if key in REMOVED_KEYS and key.rpartition(".")[0] == where:  # its section exists here (not in an RL config)
        return ConfigError(f"config key {key!r} was {REMOVED_KEYS[key]}")
    return ConfigError(f"unknown config key {key!r}; valid keys {'of ' + where if where else 'at the top level'}: {names}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys and bad values raise ConfigError."""
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping with keys {names}, got {data!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in names:
            raise _unknown_key(key, prefix, names)
        kwargs[name] = _coerce(value, hints[name], key)
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict (YAML-safe) of a config dataclass."""
    return dataclasses.asdict(cfg)


def _override_items(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """``["a.b=1", "--set", "c.d=x", "--set=e.f=2"]`` -> [(dotted key, raw value text)]."""
    items = []
    for item in overrides:
        if item == "--set":
            continue
        if item.startswith("--set="):
            item = item[len("--set="):]
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. loss.divergence=jsd)")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("-+")
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        items.append((key, value))
    return items


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """Apply ``section.key=value`` strings to ``cfg`` in place (and return it), coerced from the annotations."""
    for key, raw in _override_items(overrides):
        parts = key.split(".")
        target = cfg
        for i, part in enumerate(parts):
            names = [f.name for f in dataclasses.fields(target)]
            where = ".".join(parts[:i])
            if part not in names:
                raise _unknown_key(key, where, names)
            tp = typing.get_type_hints(type(target))[part]
            if i < len(parts) - 1:
                target = getattr(target, part)
                if not dataclasses.is_dataclass(target):
                    raise ConfigError(f"{'.'.join(parts[:i + 1])} is a value, not a section; cannot set {key}")
                continue
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=...")
            value: Any = raw
            if raw.strip().startswith("[") and raw.strip().endswith("]"):
                try:
                    value = yaml.safe_load(raw)
                except yaml.YAMLError:
                    pass
            setattr(target, part, _coerce(value, tp, key))
    return cfg


# Ranges of single values, checked at load for every config class that has the key (OPSD, GRPO, SFT): a value
# the sidecar or a rank would refuse only after minutes of weight loading fails here, naming the key. The sampling
# ranges are vLLM 0.32's (``SamplingParams._verify_args``: "temperature must be in [0, 2]", "top_p must be in
# (0, 1]", "top_k must be 0 (disable), or at least 1" with -1 also meaning off, "max_tokens must be at least 1").
def _at_least(low: float, note: str = "") -> tuple[typing.Callable[[Any], bool], str]:
    return (lambda v: v >= low), f">= {low}{note}"


def _in(low: float, high: float, text: str, *, open_low: bool = False,
        open_high: bool = False) -> tuple[typing.Callable[[Any], bool], str]:
    """``low <= v <= high`` (an open end excludes its bound); ``text`` says so in the error."""
    return (lambda v: (v > low if open_low else v >= low) and (v < high if open_high else v <= high)), text


# Every SamplingConfig's fields, whichever section holds them (rollout, the pipeline's eval, EvalSettings).
SAMPLING_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "n": _at_least(1),
    "temperature": _in(0.0, 2.0, "in [0, 2] (vLLM's range; 0 = greedy)"),
    "top_p": _in(0.0, 1.0, "in (0, 1]", open_low=True),
    "top_k": ((lambda v: v >= -1), "-1 or 0 (off), or >= 1"),
    "max_tokens": _at_least(1),
}

VALUE_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "rollout.local_sidecar_port": _in(1, 65535, "a TCP port in [1, 65535] (or null: a free one)"),
    "optim.adam_beta1": _in(0.0, 1.0, "in [0, 1)", open_high=True),
    "optim.adam_beta2": _in(0.0, 1.0, "in [0, 1)", open_high=True),
    "optim.adam_eps": ((lambda v: v > 0), "> 0"),
    "optim.clip_grad": _at_least(0, " (0: no clipping)"),
    "train.eval_every": _at_least(0, " (0: no evaluation)"),
    "checkpoint.save_every": _at_least(0, " (0: only at the end)"),
    "data.limit": _at_least(1, " (or null: every row)"),
    "rollout.kv_cache_memory_bytes": _at_least(1, " (or null)"),
    **{key: _at_least(0) for key in ("rollout.max_staleness", "optim.lr", "optim.min_lr", "optim.weight_decay",
                                      "optim.warmup_steps", "train.steps")},
    **{key: _at_least(1) for key in ("optim.micro_batch_size", "checkpoint.keep_last", "logging.log_every",
                                      "data.max_prompt_tokens", "data.pad_to_multiple_of",
                                      "model.make_vocab_size_divisible_by")},
}


def _leaves(cfg: Any, prefix: str = ""):
    """(dotted key, value, its range or None) of every non-section field of a config dataclass tree."""
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, key + ".")
        else:
            rule = SAMPLING_RANGES.get(f.name) if isinstance(cfg, SamplingConfig) else None
            yield key, value, rule or VALUE_RANGES.get(key)


def validate_values(cfg: Any) -> Any:
    """Every number finite, every value in its range (``SAMPLING_RANGES`` for a ``SamplingConfig``'s fields,
    ``VALUE_RANGES``), and the parallel sizes >= 1: for every config class, at load, before any process group or
    sidecar exists."""
    for key, value, rule in _leaves(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
        if rule is not None and value is not None and not rule[0](value):
            raise ConfigError(f"{key} must be {rule[1]}, got {value}")
    parallel = getattr(cfg, "parallel", None)
    if isinstance(parallel, ParallelConfig):
        parallel.validate_sizes()
    return cfg


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Cross-field checks of the shared sections (reward, rollout, data, optim, model.lora), for every trainer
    that composes them."""
    need, r = _need, cfg.rollout
    need(cfg.reward.kind != "callable" or bool(cfg.reward.callable),
         "reward.callable must be set to 'module:function' when reward.kind=callable")
    need(r.local_sidecar_tensor_parallel_size >= 1,
         f"rollout.local_sidecar_tensor_parallel_size must be >= 1, got {r.local_sidecar_tensor_parallel_size}")
    need(r.sync_timeout_s > 0, f"rollout.sync_timeout_s must be > 0, got {r.sync_timeout_s}")
    need(r.push_retries >= 0, f"rollout.push_retries must be >= 0, got {r.push_retries}")
    need(r.push_bucket_mb >= 1, f"rollout.push_bucket_mb must be >= 1, got {r.push_bucket_mb}")
    need(r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}")
    need(r.max_staleness >= 0, f"rollout.max_staleness must be >= 0 (0: synchronous), got {r.max_staleness}")
    need(r.importance_ratio_clip >= 1.0,
         f"rollout.importance_ratio_clip must be >= 1 (the ratio's cap), got {r.importance_ratio_clip}")
    need(r.horizon is None or r.horizon >= 1, f"rollout.horizon must be null or >= 1, got {r.horizon}")
    need(r.max_kept is None or r.max_kept >= 1, f"rollout.max_kept must be null or >= 1, got {r.max_kept}")
    if r.horizon_growth is not None:
        need(None not in (r.horizon_start, r.horizon_end, r.horizon_steps),
             "rollout.horizon_growth=linear needs rollout.horizon_start, rollout.horizon_end and rollout.horizon_steps")
        need(1 <= r.horizon_start <= r.horizon_end and r.horizon_steps >= 1,
             "rollout.horizon_growth=linear needs 1 <= horizon_start <= horizon_end and horizon_steps >= 1")
        need(r.horizon is None, "set rollout.horizon (fixed) or rollout.horizon_growth (progressive), not both")
    need(cfg.data.max_prompt_tokens >= 1, "data.max_prompt_tokens must be >= 1")
    need(cfg.data.pad_to_multiple_of >= 1, "data.pad_to_multiple_of must be >= 1")
    need(cfg.optim.micro_batch_size >= 1, "optim.micro_batch_size must be >= 1")
    validate_lora(cfg)
    return cfg


def validate_config(cfg: OPSDConfig) -> OPSDConfig:
    """OPSD's cross-field checks that single annotations cannot express: the teacher and the loss (and what they
    need of the rollouts), then the shared sections' (``validate_run_config``)."""
    need, t, r, loss = _need, cfg.teacher, cfg.rollout, cfg.loss
    need(t.context != "template" or bool(t.template),
         "teacher.template must be set (a Jinja user turn) when teacher.context=template")
    sampled = loss.coverage == "sampled"
    need(sampled or loss.divergence in FULL_DIVERGENCES,
         f"loss.divergence={loss.divergence} is a sampled-token estimator: set loss.coverage=sampled, or use "
         f"loss.divergence={'|'.join(FULL_DIVERGENCES)} with loss.coverage={loss.coverage}")
    need(not sampled or loss.divergence in SAMPLED_ESTIMATORS,
         f"loss.coverage=sampled compares log-probs of the sampled token only: set loss.divergence=pg (reverse-KL "
         f"gradient) or k3 (forward-KL gradient), not {loss.divergence}")
    need(loss.coverage != "topk" or (loss.top_k or 0) > 0,
         "loss.top_k must be a positive integer when loss.coverage=topk")
    need(0.0 <= loss.beta <= 1.0, f"loss.beta must be in [0, 1], got {loss.beta}")
    need(loss.temperature > 0, f"loss.temperature must be > 0, got {loss.temperature}")
    need(loss.chunk_tokens >= 1, f"loss.chunk_tokens must be >= 1, got {loss.chunk_tokens}")
    need(loss.target != "pmi" or t.purified,
         "loss.target=pmi needs teacher.purified=true (the PMI target uses the reference-only and base teachers)")
    need(not t.purified or loss.target == "pmi",
         "teacher.purified=true needs loss.target=pmi (the reference-only and base forwards only feed the PMI "
         "target); set loss.target=pmi or teacher.purified=false")
    need(not t.purified or t.context not in ("reference_only", "base"),
         f"teacher.purified=true with teacher.context={t.context}: the full teacher must see the question and the "
         "privileged text (e.g. teacher.context=reference); reference_only and base are added automatically")
    need(loss.pmi_beta > 0 and loss.pmi_clip > 0,
         f"loss.pmi_beta and loss.pmi_clip must be > 0, got {loss.pmi_beta} and {loss.pmi_clip}")
    need(0.0 <= loss.demopsd_alpha_max <= 1.0, f"loss.demopsd_alpha_max must be in [0, 1], got {loss.demopsd_alpha_max}")
    need(loss.token_clip is None or not sampled,
         "loss.token_clip clamps per-vocabulary-entry terms, which loss.coverage=sampled (a sampled-token "
         "estimator) does not have; unset loss.token_clip or use loss.coverage=full|topk")
    need(loss.divergence != "k1" or loss.allow_k1_loss, K1_REFUSAL.format(key="loss.divergence=k1", fix=
         "loss.divergence=pg (reverse-KL gradient) or loss.divergence=k3 (forward-KL gradient)",
         opt_in="loss.allow_k1_loss=true"))
    from megatron_opsd.templates import needs_demonstration

    need(not needs_demonstration(t.context, t) or r.n >= 2,
         f"teacher.context={t.context} (DemoPSD{', a template using {{ rollout }}' if t.context == 'template' else ''}) "
         f"shows the teacher another correct rollout of the same group: set rollout.n >= 2 (got {r.n})")
    need(0.0 < t.ema_decay < 1.0, f"teacher.ema_decay must be in (0, 1), got {t.ema_decay}")
    need(t.refresh_every >= 1, f"teacher.refresh_every must be >= 1, got {t.refresh_every}")
    need(t.weights != "live" or t.fp8 == "student",
         f"teacher.fp8={t.fp8}: teacher.weights=live runs the teacher on the student's own weights (model.fp8); set "
         "teacher.fp8=student or teacher.weights=frozen|ema|refresh")
    return validate_run_config(cfg)


def distillation_warnings(cfg: OPSDConfig) -> list[str]:
    """Settings that are allowed but probably not meant (the trainer prints them at start)."""
    out = []
    if cfg.rollout.importance_ratio != "none" and cfg.loss.coverage != "sampled":
        out.append(f"rollout.importance_ratio={cfg.rollout.importance_ratio} has no effect with loss.coverage="
                   f"{cfg.loss.coverage}: the divergence is computed under the current student at every visited "
                   "prefix; the ratio weights sampled-token losses (loss.coverage=sampled) and GRPO (docs/losses.md)")
    if cfg.loss.coverage != "sampled" and cfg.loss.temperature != cfg.rollout.temperature:
        out.append(f"loss.temperature={cfg.loss.temperature} differs from rollout.temperature="
                   f"{cfg.rollout.temperature} with loss.coverage={cfg.loss.coverage}: the rollouts are sampled from "
                   "softmax(z / rollout.temperature) but the divergence compares softmax(z / loss.temperature), so "
                   "the distribution being matched is not the one that sampled (OPSD ties both, 1.1 in the paper); "
                   "set loss.temperature = rollout.temperature unless this is intended")
    return out


def validate_lora(cfg: RunConfig) -> None:
    """``model.lora``'s own ranges and what it cannot be combined with."""
    from megatron_opsd.models.lora import LORA_TARGETS

    lora = cfg.model.lora
    if lora.rank < 0:
        raise ConfigError(f"model.lora.rank must be >= 0 (0 = no LoRA), got {lora.rank}")
    if lora.rank == 0:
        return
    if lora.alpha <= 0:
        raise ConfigError(f"model.lora.alpha must be > 0, got {lora.alpha}")
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
    unknown = [t for t in lora.targets if t not in LORA_TARGETS]
    if unknown or not lora.targets:
        raise ConfigError(f"model.lora.targets: {unknown or 'empty'}; choose from {list(LORA_TARGETS)}")
    if cfg.model.fp8:
        raise ConfigError("model.lora with model.fp8 is not supported; unset model.fp8 or set model.lora.rank=0")
    if cfg.parallel.sequence_parallel and cfg.parallel.tensor_model_parallel_size > 1:
        raise ConfigError("model.lora with parallel.sequence_parallel=true is not supported yet; "
                          "set parallel.sequence_parallel=false")


def resolve_config(cfg: RunConfig) -> RunConfig:
    """Fill the defaults that depend on other fields (logging.dir = runs/<name>)."""
    if cfg.logging.dir is None:
        cfg.logging.dir = str(Path("runs") / (cfg.logging.name or "opsd"))
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[Sequence[str]] = None,
                cls: type = OPSDConfig) -> Any:
    """Defaults <- YAML file (if any) <- overrides; an OPSDConfig is then resolved and validated."""
    data: Any = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        data = yaml.safe_load(p.read_text()) or {}
    cfg = from_dict(cls, data)
    apply_overrides(cfg, list(overrides or []))
    validate_values(cfg)
    if isinstance(cfg, OPSDConfig):
        validate_config(resolve_config(cfg))
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``load_config(path)`` gives an equal config back."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))
    return p


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, repeatable ``--set key=value`` and Hydra-style bare ``key=value`` arguments."""
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set loss.divergence=jsd (repeatable)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra-style overrides, e.g. loss.divergence=jsd rollout.n=4")


def config_from_args(args: argparse.Namespace, cls: type = OPSDConfig) -> Any:
    """The config named by ``add_config_arguments``' arguments."""
    return load_config(args.config, list(args.set_overrides) + list(args.overrides), cls=cls)
