"""The second compression ablation's task (issue 28, docs/ablation2.md): errors whose cause is an early choice.

Problems are the demo's chains (``demo/task.py``), 5 steps, with at least one subtraction before an addition.
A long trace first chooses one of two valid paths: ``Left to right.`` or ``Additions first: 7 + 5 + 8 - 3 - 6.``
(the additions moved before the subtractions, which passes through larger values), then computes that
expression with the first protocol's carried-value long trace (``carry_task.long_trace``: slips caught by
detours, re-checks, a final re-check). The reference shown to the teacher gives the method and the answer only
(:func:`reference_solution`): no intermediate value, no path. The SFT mixture answers the student prompt and the
reference prompt with traces from the *same* generator, so the reference-conditioned model is not taught to be
concise: whatever OPSD compresses has to come from hindsight.

The analysis side (:func:`token_types`, :func:`first_wrong_char`) reads a response's text back: which characters
are verification detours, step values or the boxed answer, and where the value that carried an error to the end
was first written; the mechanism check (``demo/hindsight_check.py``) maps them onto tokens.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Optional

from megatron_opsd.demo import carry_task, task

PATH_A = "Left to right."
PATH_B = "Additions first:"
REFERENCE_TEMPLATE = "Add and subtract step by step, carrying the running value. The result is {answer}."
TOKEN_TYPES = ("detour", "value", "answer", "other")

_STEP_RE = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)(?:, so ([\d +-]+))?\.$")
_RESTATE_RE = re.compile(r"^(?:So we have|Additions first:) ([\d +-]+)\.$")
_SENTENCE_RE = re.compile(r"[^ ].*?\.(?= |$)")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_DETOUR_RE = re.compile(r"^(?:Wait|Hmm|Let me)\b")  # the openers of demo/task.py's verification detours


@dataclass
class PathTraceConfig:
    """The long traces' detours (the first protocol's settings) and how often the riskier path is chosen."""

    carry: carry_task.CarryTraceConfig = field(default_factory=carry_task.CarryTraceConfig)
    additions_first_prob: float = 0.5


def reordered(problem: str) -> str:
    """``Compute 7 - 3 + 5.`` -> ``Compute 7 + 5 - 3.``: the additions before the subtractions (same value)."""
    start, ops = task.parse_problem(problem)
    ops = [o for o in ops if o[0] == "+"] + [o for o in ops if o[0] == "-"]
    return "Compute " + " ".join([str(start)] + [f"{op} {operand}" for op, operand in ops]) + "."


def reference_solution(answer: str) -> str:
    """What the teacher is shown: the method and the answer, not the intermediate values nor the path."""
    return REFERENCE_TEMPLATE.format(answer=answer)


def generate_splits(cfg: task.TaskConfig) -> tuple[list[dict], list[dict]]:
    """Train/test problems of ``cfg`` whose two paths differ (a subtraction before an addition), with
    :func:`reference_solution` as the ``solution`` field; disjoint, seeded."""
    want = cfg.n_train + cfg.n_test
    pool_train, pool_test = task.generate_splits(
        task.TaskConfig(n_train=4 * want, n_test=1, min_steps=cfg.min_steps, max_steps=cfg.max_steps,
                        max_operand=cfg.max_operand, max_value=cfg.max_value, seed=cfg.seed))
    chosen = [ex for ex in pool_train + pool_test if reordered(ex["problem"]) != ex["problem"]][:want]
    if len(chosen) < want:
        raise ValueError(f"only {len(chosen)} problems with two different paths for n_train + n_test = {want}")
    out = [{"id": f"{'train' if i < cfg.n_train else 'test'}-{i if i < cfg.n_train else i - cfg.n_train}",
            "problem": ex["problem"], "answer": ex["answer"], "solution": reference_solution(ex["answer"])}
           for i, ex in enumerate(chosen)]
    return out[:cfg.n_train], out[cfg.n_train:]


def long_trace(example: dict, rng: random.Random, cfg: PathTraceConfig = PathTraceConfig()) -> str:
    """The path sentence, then the carried-value long trace of that path's expression."""
    if rng.random() < cfg.additions_first_prob:
        problem = reordered(example["problem"])
        head = f"{PATH_B} {problem[len('Compute '):]}"
    else:
        problem, head = example["problem"], PATH_A
    return f"{head} {carry_task.long_trace({'problem': problem}, rng, cfg.carry)}"


def build_sft_mixture(examples: list[dict], seed: int = 0, cfg: PathTraceConfig = PathTraceConfig()) -> list[dict]:
    """SFT records ``{"id", "kind", "messages"}``: the reference prompt (kind ``reference``, probability
    ``carry.reference_fraction``) or the student prompt (kind ``student``), both answered by :func:`long_trace`."""
    rng = random.Random(seed)
    records = []
    for ex in examples:
        if rng.random() < cfg.carry.reference_fraction:
            kind, prompt = "reference", carry_task.reference_messages(ex)
        else:
            kind, prompt = "student", task.student_messages(ex["problem"])
        trace = long_trace(ex, rng, cfg)
        records.append({"id": ex["id"], "kind": kind, "messages": prompt + [{"role": "assistant", "content": trace}]})
    return records


def tokenizer_corpus(examples: list[dict], seed: int = 0, cfg: PathTraceConfig = PathTraceConfig()) -> list[str]:
    """Texts for the BPE tokenizer: whole reference prompts and long traces on both paths."""
    rng = random.Random(seed)
    return [text for ex in examples for text in (carry_task.reference_messages(ex)[-1]["content"],
                                                 long_trace(ex, rng, cfg))]


# ------------------------------------------------------------------------------------------- analysis

def _value(expr: str) -> Optional[int]:
    """The value of ``7 + 5 - 3`` (or of a bare ``12``) left to right; None when it is not such an expression."""
    if expr.strip().isdigit():
        return int(expr)
    try:
        start, ops = task.parse_problem(f"Compute {expr.strip()}.")
    except ValueError:
        return None
    for op, operand in ops:
        start = start + operand if op == "+" else start - operand
    return start


def _walk(text: str):
    """``(start, end, sentence, in_detour)`` per sentence: a detour runs from an opener through the
    ``So we have ...`` sentence that closes it (a step's check), or up to the answer (the final re-check)."""
    detour = False
    for m in _SENTENCE_RE.finditer(text):
        sentence = m.group(0)
        detour = (detour or bool(_DETOUR_RE.match(sentence))) and not sentence.startswith("The answer")
        yield m.start(), m.end(), sentence, detour
        if sentence.startswith("So we have"):
            detour = False


def token_types(text: str) -> list[tuple[int, int, str]]:
    """Character spans ``(start, end, type)`` of a response: ``detour`` (a verification detour or re-check, from
    its opener through the ``So we have ...`` sentence that closes it, or up to the answer), ``value`` (a step's
    written result), ``answer`` (inside ``\\boxed{}``); characters in no span are ``other``."""
    spans = []
    for start, end, sentence, detour in _walk(text):
        step, boxed = _STEP_RE.match(sentence), _BOXED_RE.search(sentence)
        if detour:
            spans.append((start, end, "detour"))
        elif boxed:
            spans.append((start + boxed.start(1), start + boxed.end(1), "answer"))
        elif step:
            spans.append((start + step.start(4), start + step.end(4), "value"))
    return spans


def first_wrong_char(text: str, answer: str) -> Optional[int]:
    """The character where the value that carried the error to the end was first written: the start of the
    final run of statements (the path's expression, a step's result with what is left after it, a ``So we have``
    restatement, the boxed answer) whose value differs from ``answer``. None when the last statement is right or
    none is read."""
    statements: list[tuple[int, Optional[int]]] = []  # (char position, the value the statement implies)
    for start, _, sentence, detour in _walk(text):
        step, restate = _STEP_RE.match(sentence), _RESTATE_RE.match(sentence)
        if step and not detour:
            result = int(step.group(4))
            left = _value(step.group(5)) if step.group(5) else result
            statements.append((start + step.start(4), result if left is None else left))
        elif restate:
            statements.append((start + restate.start(1), _value(restate.group(1))))
        elif boxed := _BOXED_RE.search(sentence) if sentence.startswith("The answer") else None:
            statements.append((start + boxed.start(1), _value(boxed.group(1))))
    gold = int(answer) if answer.lstrip("-").isdigit() else None
    if gold is None or not statements or statements[-1][1] == gold:
        return None
    first = len(statements) - 1
    while first > 0 and statements[first - 1][1] != gold:
        first -= 1
    return statements[first][0]
