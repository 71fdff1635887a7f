"""Exact-match grading after light normalisation (for answers that are labels, names or plain numbers)."""
from __future__ import annotations

import re
from typing import Sequence

from megatron_opsd.rewards.boxed import extract_boxed_answer

_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def normalize_answer(text: str) -> str:
    """Strip $, \\text{}, \\left/\\right, spaces, a trailing period; '27.0' -> '27'."""
    s = _TEXT.sub(r"\1", text.strip())
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("$", "")
    s = re.sub(r"\s+", "", s).rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


class ExactVerifier:
    """Normalised string equality between the (boxed) answer and the gold answer."""

    def __init__(self, boxed_only: bool = True):
        self.boxed_only = boxed_only

    def grade(self, response: str, gold: str) -> bool:
        answer = extract_boxed_answer(response) if self.boxed_only else response
        return answer is not None and normalize_answer(answer) == normalize_answer(gold)

    def grade_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        return [self.grade(r, g) for r, g in zip(responses, golds)]
