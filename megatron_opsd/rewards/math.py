"""Grading with math-verify, safely.

math-verify bounds parse/verify time with ``signal.alarm``, which only works in a process's main thread
(and raises from any other thread). Choice made here: grade in the calling process's main thread with
math-verify's own timeouts on, or, with ``num_workers > 0``, in a spawned process pool whose workers grade
in their main threads, again with timeouts on. We never disable the timeouts (a pathological expression
could hang a training step) and never call math-verify from a thread: from a non-main thread with
``num_workers=0`` grading raises a clear error instead.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Sequence

from megatron_opsd.lifecycle import bind_to_parent, parent_binding
from megatron_opsd.rewards.boxed import extract_boxed_answer


def _boxed(expr: str) -> str:
    return "\\boxed{" + expr + "}"


def grade_one(response: str, gold: str, boxed_only: bool = True, timeout_seconds: int = 5) -> bool:
    """True when ``response``'s answer equals ``gold`` (a bare answer such as '\\frac{1}{2}' or '27')."""
    from math_verify import parse, verify

    gold_parsed = parse(_boxed(gold), parsing_timeout=timeout_seconds)
    if not gold_parsed:
        gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_seconds)
    if boxed_only:
        answer = extract_boxed_answer(response)
        if answer is None:
            return False
        # "\boxed{104.}": a sentence-final period inside the box is not part of the answer
        pred = parse(_boxed(answer.strip().rstrip(".").strip()), parsing_timeout=timeout_seconds)
    else:
        pred = parse(response, parsing_timeout=timeout_seconds)
    if not gold_parsed or not pred:
        return False
    return bool(verify(gold_parsed, pred, timeout_seconds=timeout_seconds))


def _grade_chunk(args: tuple) -> list[bool]:
    responses, golds, boxed_only, timeout_seconds = args
    return [grade_one(r, g, boxed_only, timeout_seconds) for r, g in zip(responses, golds)]


class MathVerifier:
    """Symbolic/numeric answer checking with math-verify (boxed fractions, radicals, intervals, sets, ...)."""

    def __init__(self, boxed_only: bool = True, timeout_seconds: int = 5, num_workers: int = 0):
        if timeout_seconds is None or timeout_seconds <= 0:
            raise ValueError("MathVerifier keeps math-verify's timeouts on: timeout_seconds must be > 0")
        self.boxed_only, self.timeout_seconds, self.num_workers = boxed_only, timeout_seconds, num_workers
        self._pool: Optional[ProcessPoolExecutor] = None

    def grade(self, response: str, gold: str) -> bool:
        return self.grade_batch([response], [gold])[0]

    def grade_batch(self, responses: Sequence[str], golds: Sequence[str]) -> list[bool]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
        if self.num_workers > 0:
            return self._grade_in_pool(list(responses), list(golds))
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("math-verify's timeouts use signal.alarm, which works only in the main thread; call "
                               "MathVerifier from the main thread or give it num_workers > 0 (a process pool)")
        return _grade_chunk((list(responses), list(golds), self.boxed_only, self.timeout_seconds))

    def _grade_in_pool(self, responses: list[str], golds: list[str]) -> list[bool]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_workers, mp_context=mp.get_context("spawn"),
                                             initializer=bind_to_parent, initargs=parent_binding())
        n = self.num_workers
        chunks = [(responses[i::n], golds[i::n], self.boxed_only, self.timeout_seconds) for i in range(n)]
        results = list(self._pool.map(_grade_chunk, chunks))
        out: list[bool] = [False] * len(responses)
        for i, res in enumerate(results):
            out[i::n] = res
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
