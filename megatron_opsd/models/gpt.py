"""Build this rank's megatron-core ``GPTModel`` chunks from a Hugging Face config."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.models.families import (have_transformer_engine, require_te_for_fp8, rope_parameters,
                                          transformer_config_from_hf)
from megatron_opsd.models.local_spec import local_block_spec
from megatron_opsd.models.shape import padded_vocab_size
from megatron_opsd.models.lora import LoRASettings, add_lora
from megatron_opsd.models.lora_peft import init_lora_
from megatron_opsd.models.weights import unwrap  # noqa: F401 - defined with the weight recipes; its old import path


def load_hf_config(hf_config_or_dir):
    if isinstance(hf_config_or_dir, (str, Path)):
        from transformers import AutoConfig

        path = Path(hf_config_or_dir)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.path={str(path)!r} has no config.json; point it at an HF model directory")
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    return hf_config_or_dir


def layer_spec(config, fp8: Optional[str], vp_stage: Optional[int] = None, lora: bool = False):
    """Transformer Engine's layer spec on GPU (required for FP8); otherwise (CPU, LoRA, whose adapters hook
    megatron's own Column/RowParallelLinear while TE fuses the input norm into linear_qkv/fc1, and, loudly warned,
    a GPU without TE: see ``families.have_transformer_engine``) megatron's local spec with norms that support
    sequence parallelism (``local_spec.local_block_spec``), as a block spec for this pipeline stage."""
    require_te_for_fp8(fp8)
    if lora and fp8:
        raise ValueError("model.lora with model.fp8 is not supported (LoRA uses megatron's local layers, which have "
                         "no FP8); unset model.fp8 or set model.lora.rank=0")
    if have_transformer_engine() and not lora:
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    return local_block_spec(config, vp_stage)


def hf_inv_freq(hf_config) -> Optional[torch.Tensor]:
    """HF's inverse RoPE frequencies when they differ from plain theta RoPE (Llama 3 or linear scaling).

    megatron's own llama3 option hard-codes low/high frequency factors 1/4 and an 8192 original context.
    """
    params = rope_parameters(hf_config)
    if params["rope_type"] in ("default", None):
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config, torch.device("cpu"))
    return inv_freq.float()


def _rotary_base(theta: float):
    """megatron types rotary_base as int; keep a fractional theta exact instead of truncating it."""
    return int(theta) if float(theta).is_integer() else float(theta)


def build_model(hf_config_or_dir, *, params_dtype: torch.dtype = torch.float32, fp8: Optional[str] = None,
                fp8_recipe: str = "delayed", recompute_granularity: Optional[str] = None,
                make_vocab_size_divisible_by: int = 128, sequence_parallel: bool = False, lora=None,
                lora_seed: int = 0) -> list:
    """This rank's model chunks (one, or one per virtual pipeline stage), not DDP-wrapped.

    ``lora`` (a ``models.lora.LoRASettings`` with rank > 0): base weights frozen and LoRA adapters attached,
    initialised as PEFT does (from ``lora_seed``, the same at every layout).

    ``sequence_parallel`` (parallel.sequence_parallel) is handed to megatron's config; it only applies at TP > 1.

    Each chunk carries ``.hf_config`` and ``.real_vocab_size`` (the unpadded vocabulary): the padded logit
    columns must be excluded from every softmax (``vocab_range=(0, real_vocab_size)`` in the losses).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    hf_config = load_hf_config(hf_config_or_dir)
    config = transformer_config_from_hf(hf_config, params_dtype=params_dtype, fp8=fp8, fp8_recipe=fp8_recipe,
                                        recompute_granularity=recompute_granularity,
                                        sequence_parallel=sequence_parallel
                                        and ps.get_tensor_model_parallel_world_size() > 1)
    use_lora = lora is not None and lora.rank > 0
    tp = ps.get_tensor_model_parallel_world_size()
    vocab = padded_vocab_size(hf_config.vocab_size, tp, make_vocab_size_divisible_by)
    rope = rope_parameters(hf_config)
    inv_freq = hf_inv_freq(hf_config)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(config, fp8, stage, lora=use_lora),
            vocab_size=vocab,
            max_sequence_length=hf_config.max_position_embeddings,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
            position_embedding_type="rope",
            rotary_base=_rotary_base(rope["rope_theta"]),
            vp_stage=stage,
        )
        if inv_freq is not None:
            model.rotary_pos_emb.inv_freq = inv_freq.clone()
        if torch.cuda.is_available():
            model.cuda(torch.cuda.current_device())
        model.hf_config = hf_config
        model.real_vocab_size = hf_config.vocab_size
        chunks.append(model)
    if use_lora:  # LoRA hook (models/lora.py)
        add_lora(chunks, lora)
        init_lora_(chunks, seed=lora_seed)
    return chunks


PARAMS_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # ModelConfig.params_dtype


def teacher_fp8(cfg) -> Optional[str]:
    """The teacher replica's FP8 format: ``teacher.fp8`` (``student``: the same as ``model.fp8``; null: BF16)."""
    return cfg.model.fp8 if cfg.teacher.fp8 == "student" else cfg.teacher.fp8


def sequence_multiple(cfg, pad_to_multiple_of: int) -> int:
    """What a trainer config's padded sequence lengths must be a multiple of (``ParallelConfig.sequence_multiple``),
    with FP8 when any model it builds runs FP8 GEMMs: the student, or the teacher / reference replica."""
    fp8 = bool(cfg.model.fp8 or (getattr(cfg, "teacher", None) is not None and teacher_fp8(cfg)))
    return cfg.parallel.sequence_multiple(pad_to_multiple_of, fp8=fp8)


def build_model_from_config(cfg, *, teacher: bool = False) -> list:
    """``build_model`` for a trainer config: its ``model`` section (path, dtype, FP8, recompute, vocabulary
    padding) and ``parallel.sequence_parallel``, so every trainer and replica is built the same way.
    ``teacher=True``: the teacher replica, which differs only in its FP8 format (``teacher.fp8``)."""
    m = cfg.model
    fp8 = teacher_fp8(cfg) if teacher else m.fp8
    return build_model(m.path, params_dtype=PARAMS_DTYPES[m.params_dtype], fp8=fp8, fp8_recipe=m.fp8_recipe,
                       recompute_granularity=m.recompute_granularity,
                       make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
                       sequence_parallel=cfg.parallel.sequence_parallel, lora=LoRASettings.from_config(m.lora),
                       lora_seed=cfg.train.seed)
