"""Hugging Face config -> megatron-core ``TransformerConfig`` for the supported families, and which kernels run.

The config's shape and family (qk-norm, qkv bias) are read by ``shape.ModelShape``, the layout is checked by
``layout.validate_layout``; here the options megatron cannot reproduce are refused (RoPE scaling, biases, sliding
windows) and the layer spec's Transformer Engine is detected. The weight mapping (fusions, TP slicing) is in
``weights.py``.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Optional

import torch

from megatron_opsd.models.layout import validate_layout
from megatron_opsd.models.shape import ModelShape, detect_family


FP8_FORMATS = (None, "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "current")


def rope_parameters(hf_config) -> dict:
    """RoPE settings across transformers versions (``rope_parameters`` in v5, ``rope_theta``/``rope_scaling`` before)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params.update({k: v for k, v in scaling.items() if k not in params})
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


TE_REQUIREMENT = "transformer-engine[pytorch]>=2.9,<2.12"  # megatron-core 0.16.1's range (setup.py extra `te`)
MEGATRON_TE_MODULE = "megatron.core.extensions.transformer_engine"


def have_transformer_engine() -> bool:
    """True when the TE layer spec will be built: a GPU is present and megatron-core can use Transformer Engine.

    What counts is what megatron itself imports (``megatron.core.extensions.transformer_engine``), not a bare
    ``import transformer_engine``: a TE that is installed but does not load (a wheel for another torch or CUDA,
    a version outside megatron's range) is an error here, never a silent fall-back to the local spec. TE absent
    on a GPU: False, with one loud warning (``warn_local_spec_on_gpu``).
    """
    if not torch.cuda.is_available():
        return False
    if importlib.util.find_spec("transformer_engine") is None:
        warn_local_spec_on_gpu()
        return False
    try:  # megatron catches TE's ImportError itself and records HAVE_TE = False
        usable, err = importlib.import_module(MEGATRON_TE_MODULE).HAVE_TE, None
    except Exception as caught:  # noqa: BLE001 - any failure to load TE is the same user problem
        usable, err = False, caught
    if not usable:
        reason = f"{type(err).__name__}: {err}" if err else "its import fails inside megatron"
        raise RuntimeError(f"Transformer Engine is installed but megatron-core cannot load it ({reason}); reinstall "
                           f"pip install '{TE_REQUIREMENT}' built for this torch/CUDA, or uninstall transformer-engine "
                           "to use megatron's local spec") from err
    return True


def kernel_report() -> dict:
    """Which fused kernels megatron-core 0.16.1 uses in this environment (``megatron-opsd version``).

    megatron picks at import time, TE first, then apex, then torch: ``megatron.core.optimizer.Adam`` (TE's or
    apex's FusedAdam, else ``torch.optim.AdamW``, also under the distributed optimizer) and the optimizer's and
    grad clipping's ``multi_tensor_applier`` (TE, apex's ``amp_C``, else a per-tensor loop). Norms and attention
    come from the layer spec: TE's fused RMSNorm and fused attention with TE on a GPU, else torch's norm and
    megatron's unfused attention (apex's fused norms serve LayerNorm only, which no supported family uses).
    """
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import optimizer as mcore_optimizer_impl

    def origin(obj) -> str:
        return getattr(obj, "__module__", "?").split(".")[0]

    try:
        spec = "transformer_engine" if have_transformer_engine() else "local"
    except RuntimeError as err:
        spec = f"broken ({err})"
    return {"adam": f"{origin(mcore_optimizer.Adam)}.{mcore_optimizer.Adam.__name__}",
            "multi_tensor_applier": origin(mcore_optimizer_impl.multi_tensor_applier),
            "layer_spec (norm, attention)": spec}


WARNED_LOCAL_SPEC = False  # public: a test resets it to see the warning again


def warn_local_spec_on_gpu() -> None:
    """Once per process: the GPU run uses megatron's local spec, which has no fused attention. It stands in for
    megatron's own import-time TE/Apex notices, which ``megatron_opsd/__init__.py`` silences (on CPU they describe
    the only path), so it also names the optimizer kernels they were about."""
    global WARNED_LOCAL_SPEC
    if not WARNED_LOCAL_SPEC:
        WARNED_LOCAL_SPEC = True
        warnings.warn(f"CUDA without Transformer Engine: megatron's LOCAL layer spec is used (unfused attention "
                      "materialises [heads, seq, seq] scores, no FP8, no fused norms): long sequences will not fit "
                      f"and steps are slower; install pip install 'megatron-opsd[te]' ({TE_REQUIREMENT}), which "
                      "also gives megatron its fused Adam and multi-tensor kernels (`megatron-opsd version` lists "
                      "what runs)",
                      RuntimeWarning, stacklevel=3)


# RoPE variants reproduced exactly by replacing megatron's inverse frequencies; yarn / longrope also rescale
# cos/sin (attention_factor) and dynamic depends on the sequence length, which megatron's RotaryEmbedding lacks.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def check_supported(hf_config) -> None:
    """Refuse HF options our megatron mapping would silently ignore (wrong logits instead of an error)."""
    family = detect_family(hf_config)
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is not supported (SwiGLU with silu only)")
    if getattr(hf_config, "attention_bias", None) and family != "qwen2":
        raise ValueError(f"attention_bias=True is not supported for {family} (no mapping for q/k/v/o biases)")
    if getattr(hf_config, "mlp_bias", None):
        raise ValueError("mlp_bias=True is not supported (megatron is built with add_bias_linear=False)")
    layer_types = set(getattr(hf_config, "layer_types", None) or ["full_attention"])
    if getattr(hf_config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise ValueError(f"sliding-window attention (use_sliding_window / layer_types={sorted(layer_types)}) is not "
                         "supported; set use_sliding_window=false if the model was trained without it")
    rope_type = rope_parameters(hf_config)["rope_type"]
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


def require_te_for_fp8(fp8: Optional[str]) -> None:
    """FP8 only works through the TE layer spec; megatron's local spec silently ignores the FP8 flags."""
    if fp8 and not have_transformer_engine():
        raise RuntimeError(
            f"model.fp8={fp8!r} (or teacher.fp8) needs Transformer Engine on a GPU (pip install 'megatron-opsd[te]'); "
            "megatron's local layer spec would silently ignore FP8: set model.fp8=null to run in bf16/fp32"
        )


def transformer_config_from_hf(hf_config, *, params_dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                               fp8_recipe: str = "delayed", recompute_granularity: Optional[str] = None,
                               **overrides):
    """A megatron ``TransformerConfig`` for this HF config and the current megatron parallel state."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    shape = ModelShape.from_hf_config(hf_config)
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    validate_layout(shape, tp, pp, vpp)
    if fp8 not in FP8_FORMATS:
        raise ValueError(f"model.fp8 must be one of {FP8_FORMATS}, got {fp8!r}")
    if fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"model.fp8_recipe must be one of {FP8_RECIPES}, got {fp8_recipe!r}")
    require_te_for_fp8(fp8)
    on_gpu = torch.cuda.is_available()
    # Fused softmax / persistent layer norm exist only as TE/apex kernels: megatron's local spec (CPU, or a
    # GPU without TE) would crash on them (WrappedTorchNorm asserts, ``import scaled_masked_softmax_cuda``).
    use_te = have_transformer_engine()
    check_supported(hf_config)
    kwargs = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=getattr(hf_config, "initializer_range", 0.02),
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=ps.get_context_parallel_world_size(),
        use_cpu_initialization=not on_gpu,
        apply_rope_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=use_te,
        gradient_accumulation_fusion=False,
        persist_layer_norm=use_te,
        recompute_granularity=recompute_granularity,
    )
    if recompute_granularity == "full":
        kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if fp8:
        kwargs.update(fp8=fp8, fp8_recipe="tensorwise" if fp8_recipe == "current" else "delayed")
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
