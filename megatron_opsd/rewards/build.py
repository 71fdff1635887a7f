"""``build_reward(reward_cfg)``: one callable ``(responses, examples) -> list[float]`` for every reward kind."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Callable

from megatron_opsd.rewards.exact import ExactVerifier
from megatron_opsd.rewards.math import MathVerifier

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


class _Reward:
    """``reward(responses, examples) -> list[float]``; also ``reward(text, example) -> float`` for one response.

    Prefer the batch form: a MathVerifier with a process pool grades a whole step's rollouts at once.
    """

    def __call__(self, responses, examples):
        if isinstance(responses, str):
            return self.score([responses], [examples])[0]
        return self.score(list(responses), list(examples))

    def score(self, responses: list[str], examples: list[Any]) -> list[float]:
        raise NotImplementedError


class VerifierReward(_Reward):
    """Scores 1.0/0.0 by grading each response against its example's gold answer."""

    def __init__(self, verifier: Any):
        self.verifier = verifier

    def score(self, responses: list[str], examples: list[Any]) -> list[float]:
        if len(responses) != len(examples):
            raise ValueError(f"{len(responses)} responses but {len(examples)} examples")
        golds = []
        for ex in examples:
            if ex.answer is None:
                raise ValueError(f"example {ex.id!r} has no gold answer (data.answer_field); the math and exact rewards "
                                 "need one, or use reward.kind=callable")
            golds.append(ex.answer)
        return [float(ok) for ok in self.verifier.grade_batch(responses, golds)]


class CallableReward(_Reward):
    """A user function ``fn(response_text, example) -> bool | float`` applied per response."""

    def __init__(self, fn: Callable, name: str = "callable"):
        self.fn, self.name = fn, name

    def score(self, responses: list[str], examples: list[Any]) -> list[float]:
        out = []
        for r, ex in zip(responses, examples):
            value = self.fn(r, ex)
            try:
                out.append(float(value))
            except (TypeError, ValueError) as err:
                raise ValueError(f"reward.callable={self.name!r} returned {value!r}; it must return a bool or a number") from err
        return out


def build_reward(reward_cfg: RewardConfig, num_workers: int = 0) -> _Reward:
    """The reward of ``reward.kind``; ``num_workers > 0`` grades math in a spawned process pool."""
    if reward_cfg.kind == "math":
        return VerifierReward(MathVerifier(boxed_only=reward_cfg.boxed_only, num_workers=num_workers))
    if reward_cfg.kind == "exact":
        return VerifierReward(ExactVerifier(boxed_only=reward_cfg.boxed_only))
    if reward_cfg.kind == "callable":
        if not reward_cfg.callable:
            raise ValueError("reward.kind=callable needs reward.callable='module:function'")
        return CallableReward(load_callable(reward_cfg.callable), reward_cfg.callable)
    raise ValueError(f"reward.kind={reward_cfg.kind!r} is not one of ['math', 'exact', 'callable']")
