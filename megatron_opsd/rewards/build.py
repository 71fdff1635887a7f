"""``build_reward(reward_cfg)``: one callable ``(responses, examples) -> list[float]`` for every reward kind."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from megatron_opsd.config import RewardConfig


def load_callable(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (reward.callable)."""
    if ":" not in spec:
        raise ValueError(f"reward.callable={spec!r} must look like 'package.module:function'")
    module_name, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward.callable={spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward.callable={spec!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward.callable={spec!r} is not callable")
    return fn


class VerifierReward:
    """Scores 1.0/0.0 by grading each response against its example's gold answer."""

    def __init__(self, verifier: Any):
        self.verifier = verifier

    def __call__(self, responses: Sequence[str], examples: Sequence[Any]) -> list[float]:
        golds = []
        for ex in examples:
            if ex.answer is None:
                raise ValueError(f"example {ex.id!r} has no gold answer (data.answer_field); the math and exact rewards "
                                 "need one, or use reward.kind=callable")
            golds.append(ex.answer)
        return [float(ok) for ok in self.verifier.grade_batch(list(responses), golds)]


class CallableReward:
    """A user function ``fn(response_text, example) -> bool | float`` applied per response."""

    def __init__(self, fn: Callable, name: str = "callable"):
        self.fn, self.name = fn, name

    def __call__(self, responses: Sequence[str], examples: Sequence[Any]) -> list[float]:
        out = []
        for r, ex in zip(responses, examples):
            value = self.fn(r, ex)
            try:
                out.append(float(value))
            except (TypeError, ValueError) as err:
                raise ValueError(f"reward.callable={self.name!r} returned {value!r}; it must return a bool or a number") from err
        return out


def build_reward(reward_cfg: RewardConfig, num_workers: int = 0) -> Callable[[Sequence[str], Sequence[Any]], list[float]]:
    if reward_cfg.kind == "math":
        from megatron_opsd.rewards.math import MathVerifier

        return VerifierReward(MathVerifier(boxed_only=reward_cfg.boxed_only, num_workers=num_workers))
    if reward_cfg.kind == "exact":
        from megatron_opsd.rewards.exact import ExactVerifier

        return VerifierReward(ExactVerifier(boxed_only=reward_cfg.boxed_only))
    if reward_cfg.kind == "callable":
        if not reward_cfg.callable:
            raise ValueError("reward.kind=callable needs reward.callable='module:function'")
        return CallableReward(load_callable(reward_cfg.callable), reward_cfg.callable)
    raise ValueError(f"reward.kind={reward_cfg.kind!r} is not one of ['math', 'exact', 'callable']")
