"""The CPU demo's synthetic task: seeded generation, correct answers, disjoint splits, traces, prompts, tokenizer."""
import json
import math
import random
import statistics

import pytest

from megatron_opsd.config import DataConfig
from megatron_opsd.data.datasets import load_prompt_dataset
from megatron_opsd.demo import task

CFG = task.TaskConfig(n_train=600, n_test=100, seed=3)


@pytest.fixture(scope="module")
def splits():
    return task.generate_splits(CFG)


@pytest.fixture(scope="module")
def tokenizer(splits, tmp_path_factory):
    return task.train_demo_tokenizer(tmp_path_factory.mktemp("demo_tok"), splits[0][:400])


def _left_to_right(problem: str) -> list[int]:
    """Independent evaluation: every running value of 'Compute a op b op c ...'."""
    tokens = problem.removeprefix("Compute ").removesuffix(".").split()
    values = [int(tokens[0])]
    for op, num in zip(tokens[1::2], tokens[2::2]):
        values.append(values[-1] + int(num) if op == "+" else values[-1] - int(num))
    return values


def test_generation_is_deterministic_for_a_seed(splits):
    assert task.generate_splits(CFG) == splits
    other = task.generate_splits(task.TaskConfig(n_train=600, n_test=100, seed=4))
    assert other != splits
    train = splits[0][:50]
    assert task.build_sft_mixture(train, seed=1) == task.build_sft_mixture(train, seed=1)
    assert task.build_sft_mixture(train, seed=1) != task.build_sft_mixture(train, seed=2)
    assert ([task.verbose_trace(ex, random.Random(7)) for ex in train]
            == [task.verbose_trace(ex, random.Random(7)) for ex in train])


def test_answers_are_correct_and_in_range(splits):
    for ex in splits[0] + splits[1]:
        values = _left_to_right(ex["problem"])
        assert ex["answer"] == str(values[-1]), ex
        assert all(0 <= v <= CFG.max_value for v in values), ex
        assert CFG.min_steps <= len(values) - 1 <= CFG.max_steps, ex
        assert set(ex) == {"id", "problem", "answer", "solution"}


def test_splits_are_disjoint_and_sized(splits):
    train, test = splits
    assert (len(train), len(test)) == (CFG.n_train, CFG.n_test)
    assert not {ex["problem"] for ex in train} & {ex["problem"] for ex in test}
    assert len({ex["problem"] for ex in train}) == len(train)
    assert len({ex["id"] for ex in train + test}) == len(train) + len(test)


def test_concise_traces_end_with_the_right_boxed_answer(splits):
    from math_verify import parse, verify

    rng = random.Random(0)
    for i, ex in enumerate(splits[1]):
        trace = task.concise_trace(ex, rng)
        assert trace.endswith(f"\\boxed{{{ex['answer']}}}."), trace
        assert trace == ex["solution"]
        assert "Wait" not in trace
        if i < 20:  # the checker the trainer uses agrees with our extraction
            assert verify(parse(f"\\boxed{{{ex['answer']}}}"), parse(trace))
            assert not verify(parse(f"\\boxed{{{int(ex['answer']) + 1}}}"), parse(trace))


def test_verbose_traces_are_longer_and_sometimes_talk_themselves_into_errors(splits, tokenizer):
    rng = random.Random(0)
    train = splits[0]
    verbose = [task.verbose_trace(ex, rng) for ex in train]
    concise = [task.concise_trace(ex, rng) for ex in train]
    ratio = (statistics.mean(len(tokenizer.encode(v)) for v in verbose)
             / statistics.mean(len(tokenizer.encode(c)) for c in concise))
    assert 2.0 <= ratio <= 5.0, ratio
    assert statistics.mean(v.count("Wait") for v in verbose) >= 1.0
    wrong = sum(task.boxed_answer(v) != ex["answer"] for v, ex in zip(verbose, train))
    p, n = task.TraceConfig().error_prob, len(train)
    assert abs(wrong - p * n) <= 4 * math.sqrt(n * p * (1 - p)), (wrong, p * n)
    # without injected errors every verbose trace is right and every equation it states is true; a trace that
    # talks itself into an error states exactly one false equation
    for ex in train[:200]:
        trace = task.verbose_trace(ex, rng, task.TraceConfig(error_prob=0.0))
        assert task.boxed_answer(trace) == ex["answer"]
        assert _false_equations(trace) == 0, trace
        assert _false_equations(task.concise_trace(ex, rng)) == 0
        wrong_trace = task.verbose_trace(ex, rng, task.TraceConfig(error_prob=1.0))
        assert _false_equations(wrong_trace) == 1 and task.boxed_answer(wrong_trace) != ex["answer"], wrong_trace


def _false_equations(text: str) -> int:
    """How many links 'lhs = rhs' of the equation chains stated in ``text`` are false."""
    import re

    false = 0
    for chain in re.findall(r"-?\d+(?: [+-] \d+)*(?: = -?\d+(?: [+-] \d+)*)+", text):
        values = [_left_to_right("Compute " + side + ".")[-1] for side in chain.split(" = ")]
        false += sum(a != b for a, b in zip(values, values[1:]))
    return false


def test_prompts_match_the_trainer_contexts():
    problem = "Compute 3 + 4 - 2."
    student = task.student_messages(problem)
    concise = task.concise_messages(problem)
    assert [m["role"] for m in student] == ["user"] == [m["role"] for m in concise]
    assert student[0]["content"].startswith(problem) and "\\boxed{}" in student[0]["content"]
    # OPSDC's teacher context: the instruction, a blank line, then the student's own user turn
    assert concise[0]["content"] == f"{task.CONCISE_INSTRUCTION}\n\n{student[0]['content']}"
    assert task.concise_teacher_config().concise_instruction == task.CONCISE_INSTRUCTION


def test_sft_mixture_pairs_prompts_with_the_right_traces(splits):
    train = splits[0]
    records = task.build_sft_mixture(train, seed=0)
    assert [r["id"] for r in records] == [ex["id"] for ex in train]
    kinds = [r["kind"] for r in records]
    share = kinds.count("concise") / len(kinds)
    assert abs(share - task.TraceConfig().concise_fraction) < 0.1, share
    for r, ex in zip(records, train):
        user, reply = r["messages"][-2], r["messages"][-1]
        assert reply["role"] == "assistant"
        if r["kind"] == "concise":
            assert r["messages"][:-1] == task.concise_messages(ex["problem"])
            assert reply["content"] == ex["solution"]
        else:
            assert r["messages"][:-1] == task.student_messages(ex["problem"])
            assert task.CONCISE_INSTRUCTION not in user["content"]


def test_tokenizer_round_trips_traces_and_prompts(splits, tokenizer):
    rng = random.Random(1)
    for ex in splits[1][:50]:
        for text in (task.verbose_trace(ex, rng), task.concise_trace(ex, rng),
                     tokenizer.apply_chat_template(task.concise_messages(ex["problem"]), tokenize=False,
                                                   add_generation_prompt=True)):
            assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # trained on the task text: frequent words are single tokens, so prompts and traces stay short
    assert len(tokenizer.encode(" Wait", add_special_tokens=False)) == 1
    assert len(tokenizer.encode(task.CONCISE_INSTRUCTION, add_special_tokens=False)) <= 16


def test_written_splits_load_with_the_trainer_dataset_reader(tmp_path):
    cfg = task.TaskConfig(n_train=30, n_test=10, seed=5)
    paths = task.write_splits(tmp_path, cfg)
    train, test = task.generate_splits(cfg)
    assert task.read_jsonl(paths["train"]) == train and task.read_jsonl(paths["test"]) == test
    loaded = load_prompt_dataset(paths["test"], DataConfig(id_field="id"))
    assert [(e.id, e.prompt, e.answer, e.reference) for e in loaded] == [
        (ex["id"], ex["problem"], ex["answer"], ex["solution"]) for ex in test]
    assert json.loads(paths["train"].read_text().splitlines()[0]) == train[0]


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="min_steps"):
        task.TaskConfig(min_steps=0)
    with pytest.raises(ValueError, match="error_prob"):
        task.TraceConfig(error_prob=1.5)
    with pytest.raises(ValueError, match="too few distinct problems"):
        task.generate_splits(task.TaskConfig(n_train=500, n_test=10, min_steps=1, max_steps=1, max_operand=2,
                                             max_value=3))
    with pytest.raises(ValueError, match="not a demo problem"):
        task.parse_problem("What is 2 + 2?")
