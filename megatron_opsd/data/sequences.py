"""Prompt token ids for rollouts and teachers, and the truncated-OPD horizon per step.

``encode_prompt`` applies the chat template and refuses prompts over ``data.max_prompt_tokens`` (naming the
example); the trainer packs student and teacher rows around the same response tokens itself
(``training.batches.response_microbatches``).

Truncated OPD: with a horizon h only response tokens t < h enter the loss, and the sequences are cut at
prompt + h tokens. That is exact, not an approximation: attention is causal, so logits before the cut do
not depend on tokens after it.
"""
from __future__ import annotations

from typing import Optional, Protocol

from megatron_opsd.config import DataConfig, RolloutConfig
from megatron_opsd.data.contexts import student_messages
from megatron_opsd.data.datasets import PromptExample
from megatron_opsd.errors import UsageError


class ChatTokenizer(Protocol):
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: Optional[bool] = None) -> list[int]: ...


def horizon_at_step(step: int, rollout_cfg: RolloutConfig) -> Optional[int]:
    """Response tokens that enter the loss at ``step``: None (all), a fixed horizon, or linear growth."""
    if rollout_cfg.horizon_growth is None:
        return rollout_cfg.horizon
    start, end, steps = rollout_cfg.horizon_start, rollout_cfg.horizon_end, rollout_cfg.horizon_steps
    if None in (start, end, steps):
        raise ValueError("rollout.horizon_growth=linear needs rollout.horizon_start, horizon_end and horizon_steps")
    frac = min(max(step, 0), steps) / steps
    return int(round(start + (end - start) * frac))


def encode_prompt(tokenizer: ChatTokenizer, messages: list[dict], max_prompt_tokens: int, example_id: str,
                  what: str, enable_thinking: Optional[bool] = None) -> list[int]:
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking))
    if len(ids) > max_prompt_tokens:
        raise UsageError(f"the {what} prompt of example {example_id!r} has {len(ids)} tokens, more than "
                         f"data.max_prompt_tokens={max_prompt_tokens}; raise data.max_prompt_tokens or drop the example")
    return ids


def student_prompt_ids(tokenizer: ChatTokenizer, example: PromptExample, data_cfg: DataConfig,
                       enable_thinking: Optional[bool] = None) -> list[int]:
    """Token ids the rollout engine generates from."""
    return encode_prompt(tokenizer, student_messages(example, data_cfg), data_cfg.max_prompt_tokens, example.id,
                         "student", enable_thinking)
