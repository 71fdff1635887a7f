"""The OPSD teacher with LoRA: the student's own model with its adapters switched, never a second replica.

  teacher.weights  adapters used by the teacher forward
  live             the trained adapters (the student itself)
  frozen           none: the base model (the adapters start at B = 0, so this is the initial student)
  ema / refresh    a second, frozen set of adapters inside each LoRA module (``teacher_A``/``teacher_B``),
                   updated after each optimizer step (EMA) or copied every ``refresh_every`` steps
Purified OPSD's reference-only and base forwards always use the frozen base (adapters off).
Without adapters every function here is a no-op, so the trainer calls them unconditionally.
"""
from __future__ import annotations

import contextlib

from megatron_opsd.data.contexts import PURIFIED_BASE_CONTEXTS
from megatron_opsd.models.lora import adapters_of, update_teacher_adapters_, use_adapters

TEACHER_ADAPTERS = {"live": "student", "frozen": "off", "ema": "teacher", "refresh": "teacher"}


def teacher_adapter_mode(teacher_cfg, context: str) -> str:
    """Which adapters (``models.lora.ADAPTER_MODES``) the teacher forward for ``context`` uses."""
    if teacher_cfg.purified and context in PURIFIED_BASE_CONTEXTS:
        return "off"
    return TEACHER_ADAPTERS[teacher_cfg.weights]


def add_teacher_adapters(model_chunks: list, teacher_cfg) -> None:
    """Give every adapter its teacher set (a copy of the initial adapters) when the teacher is EMA / refreshed."""
    if TEACHER_ADAPTERS[teacher_cfg.weights] == "teacher":
        for adapter in adapters_of(model_chunks):
            adapter.add_teacher_set()


def teacher_adapters(model_chunks: list, teacher_cfg, context: str):
    """Context manager for one teacher forward: the adapters ``teacher_adapter_mode`` picks."""
    if not adapters_of(model_chunks):
        return contextlib.nullcontext()
    return use_adapters(model_chunks, teacher_adapter_mode(teacher_cfg, context))


def step_teacher_adapters(model_chunks: list, teacher_cfg, step: int) -> None:
    """After optimizer step ``step`` (0-based): EMA update, or the hard refresh every ``refresh_every`` steps."""
    if not adapters_of(model_chunks):
        return
    if teacher_cfg.weights == "ema":
        update_teacher_adapters_(model_chunks, teacher_cfg.ema_decay)
    elif teacher_cfg.weights == "refresh" and (step + 1) % teacher_cfg.refresh_every == 0:
        update_teacher_adapters_(model_chunks, 0.0)
