"""LoRA adapters on megatron-core's tensor-parallel linear layers, sharded like the layer they adapt.

megatron-core 0.16 ships no LoRA (only MLA's ``q_lora_rank``, which is unrelated) and Megatron-Bridge, which
has one (``LoRALinear`` / ``ParallelLinearAdapter``), cannot be installed next to transformers 5 on Python 3.11
(see docs/lora.md), so the adapter is written here with the same sharding rules:

  column-parallel base (linear_qkv, linear_fc1): y_r = W_r x + s * B_r (A x)
      A [r, in] replicated over TP, B [out/TP, r] sharded on dim 0 exactly like the base weight's rows
      (so fused QKV / gate-up rows keep megatron's layouts); ``A x`` passes through
      ``copy_to_tensor_model_parallel_region`` so A's gradient (and x's) is summed over the TP ranks.
  row-parallel base (linear_proj, linear_fc2):    y = sum_r W_r x_r + s * B (sum_r A_r x_r)
      A [r, in/TP] sharded on dim 1 like the base weight's columns, B [out, r] replicated; the rank-r
      partial ``A_r x_r`` is all-reduced (r numbers per token, not ``out``), so B's gradient is complete on every
      rank without a custom gradient reduction.

The adapter hangs off the base layer's parent module (``self_attention.linear_qkv_lora``), not off the layer
itself, so the base layer's state-dict and checkpoint keys do not change and the adapter gives megatron's
``dist_checkpointing`` its own correctly sharded tensors. It is applied by a forward hook on the base layer.
Each adapter holds the trained set (``lora_A``/``lora_B``) and, for EMA / refreshed teachers, a frozen
second set (``teacher_A``/``teacher_B``); ``use_adapters(chunks, mode)`` picks which set (or none) a forward
uses: the frozen teacher is the base model with the adapters off, no second replica.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from megatron_opsd.models.weights import Recipe, unwrap

LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention", "linear_fc1": "mlp",
           "linear_fc2": "mlp"}
# target -> (HF parent, HF module names, sharding of the sharded factor in weights.py's recipe terms)
_HF_MODULES = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj"), "qkv"),
               "linear_proj": ("self_attn", ("o_proj",), "row"),
               "linear_fc1": ("mlp", ("gate_proj", "up_proj"), "fc1"),
               "linear_fc2": ("mlp", ("down_proj",), "row")}
ADAPTER_MODES = ("student", "teacher", "off")


@dataclass
class LoRASettings:
    """``model.lora`` of the config; ``rank: 0`` means no adapters (full fine-tuning)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(LORA_TARGETS))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora_cfg) -> "LoRASettings":
        return cls(rank=lora_cfg.rank, alpha=lora_cfg.alpha, dropout=lora_cfg.dropout, targets=list(lora_cfg.targets))


class LoRAAdapter(torch.nn.Module):
    """The low-rank update of one tensor-parallel linear layer (see the module docstring for the sharding)."""

    def __init__(self, base: torch.nn.Module, *, column: bool, glu: bool, settings: LoRASettings):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        out_local, in_local = base.weight.shape
        kw = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.column, self.glu, self.scale, self.mode = column, glu, settings.scale, "student"
        self.dropout = torch.nn.Dropout(settings.dropout) if settings.dropout > 0 else None
        self.lora_A = torch.nn.Parameter(torch.zeros(settings.rank, in_local, **kw))
        self.lora_B = torch.nn.Parameter(torch.zeros(out_local, settings.rank, **kw))
        # the sharded factor carries megatron's TP attributes (grad-norm counting, checkpoint resharding)
        sharded, dim = (self.lora_B, 0) if column else (self.lora_A, 1)
        set_tensor_model_parallel_attributes(sharded, True, dim, 1)
        self.teacher_A = self.teacher_B = None

    def add_teacher_set(self) -> None:
        """A frozen copy of the adapters for an EMA / refreshed teacher (no gradient, no optimizer state), kept in
        fp32 whatever the adapters' dtype: a bf16 EMA at decay 0.999 rounds almost every update away (the stall
        ``schedule.FP32EMA`` fixes for full replicas); the forward casts it to the input's dtype."""
        self.teacher_A = torch.nn.Parameter(self.lora_A.detach().float().clone(), requires_grad=False)
        self.teacher_B = torch.nn.Parameter(self.lora_B.detach().float().clone(), requires_grad=False)

    def factors(self, mode: Optional[str] = None) -> tuple:
        mode = mode or self.mode
        return (self.teacher_A, self.teacher_B) if mode == "teacher" else (self.lora_A, self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B A x`` for this rank's shard of the base layer's output (before or after its reduction)."""
        from megatron.core.tensor_parallel import (copy_to_tensor_model_parallel_region, get_cuda_rng_tracker,
                                                   reduce_from_tensor_model_parallel_region)

        a, b = (f.to(x.dtype) for f in self.factors())  # the teacher set is fp32 (add_teacher_set)
        if self.dropout is not None and self.training:
            if self.column:  # x is replicated over TP: the default generator draws the same mask on every rank
                x = self.dropout(x)
            else:  # x is this rank's slice of the features: independent masks per TP rank
                with get_cuda_rng_tracker().fork():
                    x = self.dropout(x)
        low = torch.matmul(x, a.t())
        if self.column:  # A is replicated: sum A's (and x's) gradient over the TP ranks in backward
            low = copy_to_tensor_model_parallel_region(low)
        else:  # A is split over the input features: sum the rank-r partials now
            low = reduce_from_tensor_model_parallel_region(low)
        return torch.matmul(low, b.t()) * self.scale

    def merged_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``W + scale * B A`` (both layouts merge shard-locally)."""
        a, b = self.factors()
        return base_weight + (b.float() @ a.float() * self.scale).to(base_weight.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """dist_checkpointing tensors: the sharded factor split over TP like the base weight (fc1's B also split
        into its gate and up halves like megatron's own linear_fc1), the other one replicated."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state = self.state_dict(prefix="", keep_vars=True)
        names = ("lora_B", "teacher_B") if self.column else ("lora_A", "teacher_A")
        axis = 0 if self.column else 1
        out = make_sharded_tensors_for_checkpoint(state, prefix, {n: axis for n in names if n in state},
                                                  sharded_offsets)
        if self.glu:
            singleton = (metadata or {}).get("singleton_local_shards", False)
            for n in names:
                if f"{prefix}{n}" in out:
                    out[f"{prefix}{n}"] = apply_swiglu_sharded_factory(out[f"{prefix}{n}"], sharded_offsets, singleton)
        return out


def _lora_hook(adapter: LoRAAdapter):
    def hook(module, args, output):
        if adapter.mode == "off":
            return output
        result, bias = output
        return result + adapter(args[0]), bias

    return hook


def add_lora(model_chunks: list, settings: LoRASettings) -> list:
    """Freeze every base parameter and attach adapters to ``settings.targets`` of every local layer; returns the
    adapters. Call before ``setup_training`` (DDP and the optimizer then see only the adapters). The adapters
    start at A = B = 0; ``init_lora_`` gives them their starting values."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    adapters = []
    for chunk in model_chunks:
        model = unwrap(chunk)
        if model.config.sequence_parallel:
            raise ValueError("model.lora with parallel.sequence_parallel=true is not supported yet; "
                             "set parallel.sequence_parallel=false")
        for param in model.parameters():
            param.requires_grad_(False)
        for layer in model.decoder.layers:
            for target in settings.targets:
                parent = getattr(layer, _PARENT[target])
                base = getattr(parent, target)
                if type(base) not in (ColumnParallelLinear, RowParallelLinear):
                    raise TypeError(f"model.lora.targets: {target} is a {type(base).__name__}; LoRA adapts "
                                    "megatron's local ColumnParallelLinear / RowParallelLinear layers only")
                adapter = LoRAAdapter(base, column=isinstance(base, ColumnParallelLinear),
                                      glu=target == "linear_fc1" and model.config.gated_linear_unit, settings=settings)
                adapter.target, adapter.layer_number = target, layer.layer_number
                parent.add_module(f"{target}_lora", adapter)
                base.register_forward_hook(_lora_hook(adapter))
                base.weight.lora_adapter = adapter  # merged export (weights.iter_hf_tensors)
                adapters.append(adapter)
    return adapters


def adapters_of(model_chunks: list) -> list:
    return [m for chunk in model_chunks for m in unwrap(chunk).modules() if isinstance(m, LoRAAdapter)]


@contextlib.contextmanager
def use_adapters(model_chunks: list, mode: str) -> Iterator[None]:
    """Forwards inside use ``mode``'s adapters: ``student`` (trained), ``teacher`` (the EMA / refreshed set) or
    ``off`` (the frozen base model)."""
    if mode not in ADAPTER_MODES:
        raise ValueError(f"adapter mode {mode!r}: choose one of {ADAPTER_MODES}")
    adapters = adapters_of(model_chunks)
    previous = [a.mode for a in adapters]
    for a in adapters:
        a.mode = mode
    try:
        yield
    finally:
        for a, m in zip(adapters, previous):
            a.mode = m


@torch.no_grad()
def update_teacher_adapters_(model_chunks: list, decay: float) -> None:
    """``teacher <- decay * teacher + (1 - decay) * student`` for every adapter (decay 0: a hard refresh), in the
    teacher set's fp32."""
    for a in adapters_of(model_chunks):
        if a.teacher_A is None:
            a.add_teacher_set()
        a.teacher_A.mul_(decay).add_(a.lora_A.float(), alpha=1.0 - decay)
        a.teacher_B.mul_(decay).add_(a.lora_B.float(), alpha=1.0 - decay)


# ------------------------------------------------------------------------------------ HF / PEFT names
def lora_recipes(chunk) -> list:
    """weights.py recipes of every adapter factor of one chunk, in PEFT's names (without ``base_model.model.``):
    the replicated A of a fused column layer is shared by its HF projections (sharding ``shared``)."""
    out = []
    for a in adapters_of([chunk]):
        hf_parent, modules, sharding = _HF_MODULES[a.target]
        prefix = f"model.layers.{a.layer_number - 1}.{hf_parent}."
        for factor in ("A", "B"):
            names = tuple(f"{prefix}{m}.lora_{factor}.weight" for m in modules)
            sharded = (factor == "B") == a.column
            factor_sharding = sharding if sharded else ("shared" if len(modules) > 1 else "copy")
            out.append(Recipe(f"{a.target}_lora.lora_{factor}", getattr(a, f"lora_{factor}"), factor_sharding, names))
    return out


def peft_target_modules(settings: LoRASettings) -> list:
    return [m for t in settings.targets for m in _HF_MODULES[t][1]]
