"""The compression ablation's task variant: long traces whose verification detours matter (issue 19).

Same problems, answers and concise reference solutions as the demo task (``demo/task.py``: chains of
single-digit additions and subtractions, left to right), but the long traces behave like the long chains of
thought the compression paper studies:

- a carried intermediate value: each step writes the running value and what is left of the problem
  (``8 + 7 = 15, so 15 + 3 - 2.``), and every later step reuses it, so a wrong value written early surfaces only
  in the boxed answer many tokens later;
- verification detours that *do* something: with probability ``slip_prob`` a step first writes a wrong value
  (a slip) and the detour that follows catches it (``Wait, let me verify: 8 + 7 = 15, not 14. So we have
  15 + 3 - 2.``); correct steps are re-checked with probability ``check_prob`` (``... Correct.``). The SFT
  traces are all correct, so the model's errors are its own: a slip it does not catch (no detour, or a detour
  that confirms) is carried to the end. RLVR can then raise accuracy by catching slips, not only by dropping
  the detours (on the demo's traces, whose detours only ever *introduce* errors, GRPO simply shortened them:
  docs/demo_design.md).

The teacher is the compression paper's: the same model shown the reference solution (``teacher.context:
reference``, the trainer's own builder). A tiny random model has never seen such a prompt, so the SFT mixture
teaches it what a strong model does with a reference in context: with probability ``reference_fraction`` a
record is (reference prompt, concise trace), otherwise (student prompt, long trace).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_opsd.config import DataConfig, TeacherConfig
from megatron_opsd.data import contexts
from megatron_opsd.data.datasets import PromptExample
from megatron_opsd.demo.task import (CONFIRMS, FINAL_OPENERS, VERIFY_OPENERS, apply_op, concise_trace, expression,
                                     parse_problem, step_text, student_messages, validate_trace_config, wrong_value)


@dataclass
class CarryTraceConfig:
    """How often the long traces slip (and catch it), re-check, and the SFT mixture's composition."""

    slip_prob: float = 0.2  # a step first writes a wrong value, which the detour after it corrects
    check_prob: float = 0.6  # a correct step is re-checked (> 0.5: the greedy student re-checks too)
    repeat_prob: float = 0.25  # each re-check repeats once more with this probability ...
    max_loops: int = 2  # ... up to this many per step
    final_check_prob: float = 0.6  # re-check the whole chain before answering
    reference_fraction: float = 0.5  # share of SFT records that are (reference prompt, concise trace)

    def __post_init__(self):
        validate_trace_config(self, ("slip_prob", "check_prob", "repeat_prob", "final_check_prob",
                                     "reference_fraction"))


def long_trace(example: dict, rng: random.Random, cfg: CarryTraceConfig = CarryTraceConfig()) -> str:
    """A correct long trace: steps carrying the running value, slips caught by the detour after them,
    re-checks of correct steps, and possibly a final re-check of the whole chain."""
    start, ops = parse_problem(example["problem"])
    parts, value, done = [], start, []
    for i, (op, operand) in enumerate(ops):
        lhs, value = value, apply_op(value, op, operand)
        rest = ops[i + 1:]
        if rng.random() < cfg.slip_prob:
            wrong = wrong_value(rng, value)
            text = (step_text(lhs, op, operand, wrong, rest) + f" {rng.choice(VERIFY_OPENERS)} {lhs} {op} {operand} = "
                    f"{value}, not {wrong}.")
        else:
            text = step_text(lhs, op, operand, value, rest)
            if rng.random() >= cfg.check_prob:
                parts.append(text)
                done.append(f"{lhs} {op} {operand} = {value}.")
                continue
            for loop in range(cfg.max_loops):
                if loop and rng.random() >= cfg.repeat_prob:
                    break
                text += f" {rng.choice(VERIFY_OPENERS)} {lhs} {op} {operand} = {value}. {rng.choice(CONFIRMS)}"
        parts.append(text + f" So we have {expression(value, rest)}.")
        done.append(f"{lhs} {op} {operand} = {value}.")
    if rng.random() < cfg.final_check_prob:
        parts.append(f"{rng.choice(FINAL_OPENERS)} {' '.join(done)} {rng.choice(CONFIRMS)}")
    return " ".join(parts) + f" The answer is \\boxed{{{value}}}."


def reference_teacher_config() -> TeacherConfig:
    """The ablation's teacher: the compression paper's reference-solution context."""
    return TeacherConfig(context="reference")


def reference_messages(example: dict) -> list[dict[str, str]]:
    """The reference-solution prompt exactly as the trainer builds the teacher's context for ``example``."""
    prompt = PromptExample(id=example.get("id", "demo"), prompt=example["problem"], reference=example["solution"],
                           answer=example["answer"])
    return contexts.teacher_messages(prompt, DataConfig(), reference_teacher_config())


def build_sft_mixture(examples: list[dict], seed: int = 0, cfg: CarryTraceConfig = CarryTraceConfig()) -> list[dict]:
    """SFT records ``{"id", "kind", "messages"}``: per example, the reference prompt answered by the concise
    trace (kind ``reference``, probability ``reference_fraction``) or the student prompt answered by a long
    trace (kind ``long``)."""
    rng = random.Random(seed)
    records = []
    for ex in examples:
        if rng.random() < cfg.reference_fraction:
            kind, prompt, trace = "reference", reference_messages(ex), concise_trace(ex, rng)
        else:
            kind, prompt, trace = "long", student_messages(ex["problem"]), long_trace(ex, rng, cfg)
        records.append({"id": ex["id"], "kind": kind, "messages": prompt + [{"role": "assistant", "content": trace}]})
    return records


def tokenizer_corpus(examples: list[dict], seed: int = 0, cfg: CarryTraceConfig = CarryTraceConfig()) -> list[str]:
    """Texts for the BPE tokenizer: whole reference prompts (so the fixed lines become a few tokens), concise and
    long traces."""
    rng = random.Random(seed)
    return [text for ex in examples
            for text in (reference_messages(ex)[-1]["content"], concise_trace(ex, rng), long_trace(ex, rng, cfg))]
