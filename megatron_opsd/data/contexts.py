"""Student prompts and teacher contexts as chat messages.

The student sees the problem (through ``data.prompt_template``). The teacher is the same model shown a
privileged context, selected by ``teacher.context``. Every builder inserts its privileged text *inside*
the problem slot of the same prompt template, so the final instruction line (by default "Please reason
step by step, and put your final answer within \\boxed{}.") is identical for student and teacher and the
teacher's next-token distributions are about the same answer format. Wording of the privileged blocks,
close to OPSD's public code:

- ``reference``: problem, "Here is a reference solution to this problem:" + solution, then "After
  understanding the reference solution, solve the problem yourself, reasoning from first principles."
- ``answer``: problem, "The final answer to this problem is: <answer>", then "Solve the problem yourself
  and reach this answer."
- ``concise`` (OPSDC): ``teacher.concise_instruction``, a blank line, then the problem.
- ``reference_only`` (Purified OPSD): "Here is a reference solution to a problem:" + solution, no problem.
- ``base``: the student's own prompt (problem only).
- ``rollout`` (DemoPSD): problem, "Here is a correct solution to this problem:" + a correct rollout of
  the same group, then the same "solve it yourself" line as ``reference``.
- ``per_example``: the dataset's teacher prompt (``data.teacher_prompt_field``), used verbatim.
- ``template``: ``teacher.template`` rendered with problem, reference, answer, instruction, rollout. A template
  that uses ``{{ rollout }}`` gets what ``rollout`` gets: another correct rollout of the same group
  (``needs_demonstration``), and rows without one are skipped.
"""
from __future__ import annotations

from typing import Callable, Optional

from megatron_opsd.config import DEFAULT_PROMPT_TEMPLATE, DataConfig, TeacherConfig
from megatron_opsd.data.datasets import PromptExample
# render_template, template_variables, needs_demonstration: also imported from here (their old import path)
from megatron_opsd.templates import needs_demonstration, render_template, template_variables  # noqa: F401

Messages = list[dict[str, str]]
ContextBuilder = Callable[[PromptExample, DataConfig, TeacherConfig, Optional[str]], Messages]

REFERENCE_INTRO = "Here is a reference solution to this problem:"
REFERENCE_OUTRO = "After understanding the reference solution, solve the problem yourself, reasoning from first principles."
REFERENCE_ONLY_INTRO = "Here is a reference solution to a problem:"
ANSWER_INTRO = "The final answer to this problem is:"
ANSWER_OUTRO = "Solve the problem yourself and reach this answer."
ROLLOUT_INTRO = "Here is a correct solution to this problem:"

CONTEXT_BUILDERS: dict[str, ContextBuilder] = {}


def register_context(name: str) -> Callable[[ContextBuilder], ContextBuilder]:
    def wrap(fn: ContextBuilder) -> ContextBuilder:
        CONTEXT_BUILDERS[name] = fn
        return fn
    return wrap


def render_user(problem_text: str, data_cfg: DataConfig) -> str:
    """The problem slot filled into ``data.prompt_template`` (default: problem + boxed-answer instruction)."""
    template = data_cfg.prompt_template if data_cfg.prompt_template is not None else DEFAULT_PROMPT_TEMPLATE
    return render_template(template, "data.prompt_template", problem=problem_text)


def _messages(user: str, data_cfg: DataConfig) -> Messages:
    msgs = [{"role": "system", "content": data_cfg.system_prompt}] if data_cfg.system_prompt else []
    return msgs + [{"role": "user", "content": user}]


def _require(value: Optional[str], example: PromptExample, field_cfg: str, field_name: str, context: str) -> str:
    if value is None or not str(value).strip():
        raise ValueError(f"teacher.context={context} needs the field {field_name!r} ({field_cfg}), which example "
                         f"{example.id!r} does not have; choose another teacher.context (e.g. answer or concise) or "
                         f"point {field_cfg} at a column that holds it")
    return value


def student_messages(example: PromptExample, data_cfg: DataConfig) -> Messages:
    return _messages(render_user(example.prompt, data_cfg), data_cfg)


@register_context("base")
def _base(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    return student_messages(example, data_cfg)


@register_context("reference")
def _reference(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    ref = _require(example.reference, example, "data.reference_field", data_cfg.reference_field, "reference")
    return _messages(render_user(f"{example.prompt}\n\n{REFERENCE_INTRO}\n{ref}\n\n{REFERENCE_OUTRO}", data_cfg),
                     data_cfg)


@register_context("answer")
def _answer(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    ans = _require(example.answer, example, "data.answer_field", data_cfg.answer_field, "answer")
    return _messages(render_user(f"{example.prompt}\n\n{ANSWER_INTRO} {ans}\n\n{ANSWER_OUTRO}", data_cfg), data_cfg)


@register_context("concise")
def _concise(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    return _messages(render_user(f"{teacher_cfg.concise_instruction}\n\n{example.prompt}", data_cfg), data_cfg)


@register_context("reference_only")
def _reference_only(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    ref = _require(example.reference, example, "data.reference_field", data_cfg.reference_field, "reference_only")
    return _messages(render_user(f"{REFERENCE_ONLY_INTRO}\n{ref}", data_cfg), data_cfg)


@register_context("rollout")
def _rollout(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    if rollout is None:
        raise ValueError(f"teacher.context=rollout needs a correct rollout of the same group for example "
                         f"{example.id!r}; none was passed (groups without a correct rollout must be skipped)")
    return _messages(render_user(f"{example.prompt}\n\n{ROLLOUT_INTRO}\n{rollout}\n\n{REFERENCE_OUTRO}", data_cfg),
                     data_cfg)


@register_context("per_example")
def _per_example(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    text = _require(example.teacher_prompt, example, "data.teacher_prompt_field", data_cfg.teacher_prompt_field,
                    "per_example")
    return _messages(text, data_cfg)


@register_context("template")
def _template(example, data_cfg, teacher_cfg, rollout=None) -> Messages:
    if not teacher_cfg.template:
        raise ValueError("teacher.context=template needs teacher.template (a Jinja user turn)")
    user = render_template(teacher_cfg.template, f"teacher.template (example {example.id!r})",
                           problem=example.prompt, reference=example.reference, answer=example.answer,
                           instruction=teacher_cfg.concise_instruction, rollout=rollout)
    return _messages(user, data_cfg)


def teacher_messages(example: PromptExample, data_cfg: DataConfig, teacher_cfg: TeacherConfig,
                     context: Optional[str] = None, rollout: Optional[str] = None) -> Messages:
    """The teacher's chat messages for ``context`` (default ``teacher.context``)."""
    name = context or teacher_cfg.context
    if name not in CONTEXT_BUILDERS:
        raise ValueError(f"teacher.context={name!r} is not one of {sorted(CONTEXT_BUILDERS)}")
    return CONTEXT_BUILDERS[name](example, data_cfg, teacher_cfg, rollout)


# Purified OPSD's extra teacher forwards; they always run the frozen initial model (no adapters with LoRA)
PURIFIED_BASE_CONTEXTS = ("reference_only", "base")


def teacher_context_names(teacher_cfg: TeacherConfig) -> list[str]:
    """Which teacher forwards a step needs; Purified OPSD adds reference-only and base teachers to the full one."""
    if teacher_cfg.purified:
        return [teacher_cfg.context, *PURIFIED_BASE_CONTEXTS]
    return [teacher_cfg.context]
