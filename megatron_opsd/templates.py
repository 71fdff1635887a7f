"""Jinja prompt templates: strict rendering, the variables a template reads, and whether a teacher context needs a
demonstration (another correct rollout of the group).

Below ``config`` in the layers (docs/architecture.md): config validation asks ``needs_demonstration`` and
``data.contexts`` renders prompts with the same functions, so neither imports the other to do so.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jinja2
from jinja2 import meta

if TYPE_CHECKING:  # annotation only: config imports this module
    from megatron_opsd.config import TeacherConfig


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(template)


def render_template(template: str, what: str, **variables) -> str:
    """Render Jinja ``template`` with only the non-None variables; a missing one is a clear error."""
    present = {k: v for k, v in variables.items() if v is not None}
    try:
        return _compile(template).render(**present)
    except jinja2.UndefinedError as err:
        raise ValueError(f"{what}: {err.message}; available variables: {sorted(present)} (variables of value None "
                         "are left out, e.g. a dataset row without a reference solution)") from err
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"{what} is not a valid Jinja template: {err}") from err


def template_variables(template: str) -> set[str]:
    """The variables a Jinja template reads."""
    env = jinja2.Environment(autoescape=False)
    try:
        return set(meta.find_undeclared_variables(env.parse(template)))
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"teacher.template is not a valid Jinja template: {err}") from err


def needs_demonstration(context: str, teacher_cfg: TeacherConfig) -> bool:
    """Whether teacher context ``context`` shows a correct rollout of the group (DemoPSD's ``rollout``, or a
    ``template`` that reads ``{{ rollout }}``): its prompt is built per rollout, after grading."""
    if context == "rollout":
        return True
    return context == "template" and bool(teacher_cfg.template) and "rollout" in template_variables(teacher_cfg.template)
