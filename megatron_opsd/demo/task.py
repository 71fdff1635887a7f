"""The CPU demo's synthetic, verifiable reasoning task and the SFT traces that make a tiny model compressible.

Problems are chains of single-digit additions and subtractions evaluated left to right ("Compute 7 + 5 - 3 +
8."), with every intermediate value in ``[0, max_value]``; the answer is an integer checked from
``\\boxed{...}``. Two trace styles teach the tiny model the behaviour the OPSDC paper starts from:

- verbose (answer to the student prompt, problem only): every step may be followed by ``Wait, let me
  verify ...`` loops of random length and the whole chain may be re-checked at the end; with probability
  ``error_prob`` a re-check talks itself into a wrong value that it then carries to the end, so verbose
  traces are a little less accurate, as the paper observes of long reasoning;
- concise (answer to the concise-instruction prompt): the steps once, then the boxed answer.

Each step states what is left of the problem (``8 + 7 = 15, so 15 + 3 - 2.``) and every verification loop
ends by restating it (``So we have 15 + 3 - 2.``), so the next step only copies from the sentence just before
it: with bare steps ("8 + 7 = 15. 15 + 3 = 18.") a 2-layer model lost track of the next operand after a
loop, and with a rewrite chain ("8 + 7 + 3 = 15 + 3 = 18") it had to add before writing the operands.

OPSDC then uses :data:`CONCISE_INSTRUCTION` as the teacher's privileged context: the teacher assigns low
probability to "Wait" where the student would emit it. The prompts are built by the trainer's own context
builders (``data.contexts``) with default ``DataConfig`` and ``TeacherConfig(context="concise",
concise_instruction=CONCISE_INSTRUCTION)``, so SFT, rollouts and teacher see exactly the same text.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from megatron_opsd.config import DataConfig, TeacherConfig
from megatron_opsd.data import contexts
from megatron_opsd.data.datasets import PromptExample
from megatron_opsd.models.tokenizer_train import train_bpe_tokenizer

CONCISE_INSTRUCTION = "Solve the following problem concisely. Do not re-check your steps."

Messages = list[dict[str, str]]

_PROBLEM_RE = re.compile(r"^Compute (\d+)((?: [+-] \d+)+)\.$")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
VERIFY_OPENERS = ("Wait, let me verify:", "Wait, let me double-check:", "Hmm, let me check that again:")
CONFIRMS = ("Yes.", "Correct.", "That is right.")
FINAL_OPENERS = ("Wait, let me verify the whole computation again:", "Let me double-check everything from the start:")


@dataclass
class TaskConfig:
    """Difficulty and size of the synthetic task (the splits are disjoint sets of distinct problems)."""

    n_train: int = 2000
    n_test: int = 200
    min_steps: int = 3  # operations per problem
    max_steps: int = 4
    max_operand: int = 9
    max_value: int = 20  # every intermediate value stays in [0, max_value]
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"TaskConfig needs 1 <= min_steps <= max_steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 1 or self.max_value < self.max_operand:
            raise ValueError(f"TaskConfig needs 1 <= max_operand <= max_value, got max_operand={self.max_operand}, "
                             f"max_value={self.max_value}")
        if self.n_train < 1 or self.n_test < 1:
            raise ValueError(f"TaskConfig needs n_train >= 1 and n_test >= 1, got {self.n_train}, {self.n_test}")


@dataclass
class TraceConfig:
    """How verbose the verbose traces are, how often they go wrong, and the SFT mixture's composition."""

    check_prob: float = 0.6  # a step is followed by a Wait-loop with this probability (> 0.5: greedy checks too)
    repeat_prob: float = 0.25  # each loop repeats once more with this probability (geometric length) ...
    max_loops: int = 3  # ... up to this many loops per step
    final_check_prob: float = 0.6  # re-check the whole chain before answering
    error_prob: float = 0.1  # a verbose trace talks itself into a wrong intermediate value
    concise_fraction: float = 0.5  # share of SFT records that are (concise prompt, concise trace)

    def __post_init__(self):
        validate_trace_config(self, ("check_prob", "repeat_prob", "final_check_prob", "error_prob",
                                     "concise_fraction"))


def validate_trace_config(cfg, probabilities: tuple[str, ...]) -> None:
    """The named fields of a trace config are probabilities and ``max_loops`` >= 1 (errors name the field)."""
    for name in probabilities:
        value = getattr(cfg, name)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{type(cfg).__name__}.{name} must be a probability in [0, 1], got {value}")
    if cfg.max_loops < 1:
        raise ValueError(f"{type(cfg).__name__}.max_loops must be >= 1, got {cfg.max_loops}")


# ----------------------------------------------------------------------------------------------- problems

def apply_op(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand


def parse_problem(problem: str) -> tuple[int, list[tuple[str, int]]]:
    """``"Compute 7 + 5 - 3."`` -> ``(7, [("+", 5), ("-", 3)])``; traces are rebuilt from the JSONL text alone."""
    match = _PROBLEM_RE.match(problem)
    if match is None:
        raise ValueError(f"not a demo problem: {problem!r} (expected 'Compute a + b - c ...')")
    tokens = match.group(2).split()
    return int(match.group(1)), [(tokens[i], int(tokens[i + 1])) for i in range(0, len(tokens), 2)]


def solve_steps(problem: str) -> list[tuple[int, str, int, int]]:
    """The left-to-right steps ``(lhs, op, operand, result)`` of ``problem``."""
    value, ops = parse_problem(problem)
    steps = []
    for op, operand in ops:
        result = apply_op(value, op, operand)
        steps.append((value, op, operand, result))
        value = result
    return steps


def _sample_problem(rng: random.Random, cfg: TaskConfig) -> str:
    value = rng.randint(1, cfg.max_operand)
    parts = [str(value)]
    for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
        ops = [op for op in "+-" if 0 <= apply_op(value, op, 1)]
        op = rng.choice(ops)
        hi = min(cfg.max_operand, cfg.max_value - value) if op == "+" else min(cfg.max_operand, value)
        if hi < 1:  # at the edge of the range only the other operation fits
            op = "-" if op == "+" else "+"
            hi = min(cfg.max_operand, cfg.max_value - value) if op == "+" else min(cfg.max_operand, value)
        operand = rng.randint(1, hi)
        value = apply_op(value, op, operand)
        parts += [op, str(operand)]
    return "Compute " + " ".join(parts) + "."


def make_example(problem: str, example_id: str) -> dict:
    """One JSONL record: ``id``, ``problem``, ``answer`` (integer as text), ``solution`` (concise reference)."""
    example = {"id": example_id, "problem": problem, "answer": str(solve_steps(problem)[-1][3])}
    example["solution"] = concise_trace(example, random.Random(0))
    return example


def generate_splits(cfg: TaskConfig = TaskConfig()) -> tuple[list[dict], list[dict]]:
    """Seeded train and test splits of distinct problems (no problem text occurs in both)."""
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    problems: list[str] = []
    want, attempts = cfg.n_train + cfg.n_test, 0
    while len(problems) < want:
        attempts += 1
        if attempts > 50 * want:
            raise ValueError(f"TaskConfig allows too few distinct problems for n_train + n_test = {want}; raise "
                             "max_steps, max_operand or max_value, or ask for fewer examples")
        problem = _sample_problem(rng, cfg)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    train = [make_example(p, f"train-{i}") for i, p in enumerate(problems[:cfg.n_train])]
    test = [make_example(p, f"test-{i}") for i, p in enumerate(problems[cfg.n_train:])]
    return train, test


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_splits(out_dir: str | Path, cfg: TaskConfig = TaskConfig()) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` under ``out_dir``; returns their paths by split name."""
    train, test = generate_splits(cfg)
    out_dir = Path(out_dir)
    return {"train": write_jsonl(out_dir / "train.jsonl", train), "test": write_jsonl(out_dir / "test.jsonl", test)}


def boxed_answer(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text`` (None when there is none)."""
    found = _BOXED_RE.findall(text)
    return found[-1].strip() if found else None


# ------------------------------------------------------------------------------------------------- traces

def expression(value: int, ops: list[tuple[str, int]]) -> str:
    return " ".join([str(value)] + [f"{op} {operand}" for op, operand in ops])


def step_text(lhs: int, op: str, operand: int, result: int, rest: list[tuple[str, int]]) -> str:
    """``8 + 7 = 15, so 15 + 3 - 2.``: the step, then what is left of the problem (nothing after the last)."""
    return f"{lhs} {op} {operand} = {result}" + (f", so {expression(result, rest)}." if rest else ".")


def concise_trace(example: dict, rng: random.Random) -> str:
    """Each step once, then the boxed answer. ``rng`` is unused: concise traces are canonical (the SFT target the
    concise teacher should reproduce); it is accepted so both generators share one signature."""
    del rng
    start, ops = parse_problem(example["problem"])
    steps = [step_text(lhs, op, operand, res, ops[i + 1:])
             for i, (lhs, op, operand, res) in enumerate(solve_steps(example["problem"]))]
    return " ".join(steps) + f" The answer is \\boxed{{{solve_steps(example['problem'])[-1][3]}}}."


def _verify_loop(rng: random.Random, lhs: int, op: str, operand: int, result: int) -> str:
    return f" {rng.choice(VERIFY_OPENERS)} {lhs} {op} {operand} = {result}. {rng.choice(CONFIRMS)}"


def wrong_value(rng: random.Random, true_value: int) -> int:
    return rng.choice([v for v in (true_value - 2, true_value - 1, true_value + 1, true_value + 2) if v >= 0])


def verbose_trace(example: dict, rng: random.Random, cfg: TraceConfig = TraceConfig()) -> str:
    """The steps, each possibly followed by ``Wait, let me verify`` loops of random length (then ``So we have``
    and what is left of the problem), and a final re-check of every step. With probability ``error_prob`` a
    re-check talks itself into a wrong value ("..., not 15. So we have 14 ...") and carries it to the end."""
    start, ops = parse_problem(example["problem"])
    error_at = rng.randrange(len(ops)) if rng.random() < cfg.error_prob else None
    parts, value, done = [], start, []
    for i, (op, operand) in enumerate(ops):
        lhs, value = value, apply_op(value, op, operand)
        text = step_text(lhs, op, operand, value, ops[i + 1:])
        if i == error_at:
            wrong = wrong_value(rng, value)
            text += (f" {rng.choice(VERIFY_OPENERS)} {lhs} {op} {operand} = {wrong}, not {value}. "
                     f"So we have {expression(wrong, ops[i + 1:])}.")
            value = wrong
        elif rng.random() < cfg.check_prob:
            text += _verify_loop(rng, lhs, op, operand, value)
            for _ in range(cfg.max_loops - 1):
                if rng.random() >= cfg.repeat_prob:
                    break
                text += _verify_loop(rng, lhs, op, operand, value)
            text += f" So we have {expression(value, ops[i + 1:])}."
        parts.append(text)
        done.append(f"{lhs} {op} {operand} = {value}.")
    if error_at is None and rng.random() < cfg.final_check_prob:
        parts.append(f"{rng.choice(FINAL_OPENERS)} {' '.join(done)} {rng.choice(CONFIRMS)}")
    return " ".join(parts) + f" The answer is \\boxed{{{value}}}."


# ------------------------------------------------------------------------------------------------ prompts

def _example(problem: str) -> PromptExample:
    return PromptExample(id="demo", prompt=problem)


def student_messages(problem: str) -> Messages:
    """The student's prompt: what ``data.contexts.student_messages`` builds with the default ``DataConfig``."""
    return contexts.student_messages(_example(problem), DataConfig())


def concise_teacher_config() -> TeacherConfig:
    """The trainer's teacher settings for the demo: OPSDC's concise context with :data:`CONCISE_INSTRUCTION`."""
    return TeacherConfig(context="concise", concise_instruction=CONCISE_INSTRUCTION)


def concise_messages(problem: str) -> Messages:
    """The concise-instruction prompt, exactly the OPSDC teacher context the trainer builds for the demo."""
    return contexts.teacher_messages(_example(problem), DataConfig(), concise_teacher_config())


def build_sft_mixture(examples: list[dict], seed: int = 0, cfg: TraceConfig = TraceConfig()) -> list[dict]:
    """SFT records ``{"id", "kind", "messages"}``: per example, either the student prompt answered by a verbose
    trace (kind ``verbose``) or, with probability ``concise_fraction``, the concise prompt answered by a concise
    trace (kind ``concise``)."""
    rng = random.Random(seed)
    records = []
    for ex in examples:
        if rng.random() < cfg.concise_fraction:
            kind, prompt, trace = "concise", concise_messages(ex["problem"]), concise_trace(ex, rng)
        else:
            kind, prompt, trace = "verbose", student_messages(ex["problem"]), verbose_trace(ex, rng, cfg)
        records.append({"id": ex["id"], "kind": kind, "messages": prompt + [{"role": "assistant", "content": trace}]})
    return records


def tokenizer_corpus(examples: list[dict], seed: int = 0, cfg: TraceConfig = TraceConfig()) -> list[str]:
    """Texts to train the demo's BPE tokenizer on: prompts of both kinds and traces of both kinds."""
    rng = random.Random(seed)
    texts = []
    for ex in examples:  # whole prompts, so the instruction lines become a few frequent tokens
        texts += [concise_messages(ex["problem"])[-1]["content"], concise_trace(ex, rng), verbose_trace(ex, rng, cfg)]
    return texts


def train_demo_tokenizer(out_dir: str | Path, examples: list[dict], vocab_size: int = 512, seed: int = 0):
    """Train the demo's byte-level BPE tokenizer on the task text (HF tokenizer with the Qwen3-style template)."""
    return train_bpe_tokenizer(tokenizer_corpus(examples, seed), out_dir, vocab_size=vocab_size)
