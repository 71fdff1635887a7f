"""Datasets, teacher contexts and the student/teacher prompt ids, checked against hand-built text."""
import json

import pytest

from megatron_opsd.config import DataConfig, RolloutConfig, TeacherConfig
from megatron_opsd.data.contexts import CONTEXT_BUILDERS, student_messages, teacher_messages
from megatron_opsd.data.datasets import PromptExample, PromptSampler, load_prompt_dataset
from megatron_opsd.data.sequences import encode_prompt, horizon_at_step, student_prompt_ids
from megatron_opsd.errors import UsageError
from megatron_opsd.evaluation.runner import packaged_data_dir
from megatron_opsd.models.tokenizer import Tokenizer

DATA = packaged_data_dir()  # the benchmarks shipped in the package
SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."
INSTRUCTION = ("Solve the following math problem concisely and correctly. Be direct \u2014 avoid unnecessary elaboration, "
               "redundant steps, or restating the problem. Focus only on the key reasoning steps needed to reach the "
               "answer.")  # OPSDC's published wording (the default teacher.concise_instruction)
SOLVE_YOURSELF = "After understanding the reference solution, solve the problem yourself, reasoning from first principles."
ROLLOUT_TEXT = "Since 2 + 2 = 4, we get \\boxed{4}."
TEMPLATE = "Hint: the answer is {{ answer }}. {{ instruction }}\nProblem: {{ problem }}"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from megatron_opsd.models.tokenizer_train import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok")
    texts = [json.loads(line)["solution"] for line in open(f"{DATA}/math500/test.jsonl")][:100]
    train_bpe_tokenizer(texts, out, vocab_size=600)
    return Tokenizer(out)


@pytest.fixture(scope="module")
def math500():
    return load_prompt_dataset(f"{DATA}/math500/test.jsonl", DataConfig(id_field="unique_id"))


def _examples(math500):
    out = []
    for ex in math500[:2]:
        out.append(PromptExample(id=ex.id, prompt=ex.prompt, reference=ex.reference, answer=ex.answer,
                                 teacher_prompt=f"Teacher-only prompt for {ex.id}: {ex.prompt}", extra=ex.extra))
    return out


def _hand_user(ctx, ex, rollout=None):
    """The teacher's user turn written out by hand from the documented wording."""
    p, r, a = ex.prompt, ex.reference, ex.answer
    return {
        "base": f"{p}\n{SUFFIX}",
        "reference": f"{p}\n\nHere is a reference solution to this problem:\n{r}\n\n{SOLVE_YOURSELF}\n{SUFFIX}",
        "answer": f"{p}\n\nThe final answer to this problem is: {a}\n\nSolve the problem yourself and reach this "
                  f"answer.\n{SUFFIX}",
        "concise": f"{INSTRUCTION}\n\n{p}\n{SUFFIX}",
        "reference_only": f"Here is a reference solution to a problem:\n{r}\n{SUFFIX}",
        "rollout": f"{p}\n\nHere is a correct solution to this problem:\n{rollout}\n\n{SOLVE_YOURSELF}\n{SUFFIX}",
        "per_example": f"Teacher-only prompt for {ex.id}: {p}",
        "template": f"Hint: the answer is {a}. {INSTRUCTION}\nProblem: {p}",
    }[ctx]


def _hand_chat(user, system=None):
    sys_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{sys_turn}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_context_registry_is_complete():
    assert sorted(CONTEXT_BUILDERS) == sorted(["reference", "answer", "concise", "reference_only", "base", "rollout",
                                               "per_example", "template"])


@pytest.mark.parametrize("system", [None, "You are a careful mathematician."])
@pytest.mark.parametrize("ctx", ["reference", "answer", "concise", "reference_only", "base", "rollout",
                                 "per_example", "template"])
def test_prompt_ids_match_hand_built_chats(tok, math500, ctx, system):
    """The student's and each teacher context's prompt ids (what the trainer encodes: encode_prompt over
    student_messages / teacher_messages) equal the chat written out by hand from the documented wording."""
    data_cfg = DataConfig(system_prompt=system, max_prompt_tokens=4096)
    teacher_cfg = TeacherConfig(context=ctx, template=TEMPLATE)
    for ex in _examples(math500):
        student = student_prompt_ids(tok, ex, data_cfg, enable_thinking=False)
        teacher = encode_prompt(tok, teacher_messages(ex, data_cfg, teacher_cfg, ctx, ROLLOUT_TEXT), 4096, ex.id,
                                f"teacher ({ctx})", enable_thinking=False)
        assert student == tok.encode(_hand_chat(_hand_user("base", ex), system))
        assert teacher == tok.encode(_hand_chat(_hand_user(ctx, ex, ROLLOUT_TEXT), system))
        assert (teacher == student) == (ctx == "base")


def test_horizon_schedule():
    assert horizon_at_step(5, RolloutConfig()) is None
    assert horizon_at_step(5, RolloutConfig(horizon=32)) == 32
    grow = RolloutConfig(horizon_growth="linear", horizon_start=16, horizon_end=116, horizon_steps=10)
    assert [horizon_at_step(s, grow) for s in (0, 1, 5, 10, 50)] == [16, 26, 66, 116, 116]


def test_prompt_too_long_names_the_field_and_example(tok, math500):
    with pytest.raises(ValueError, match=r"teacher \(reference\) prompt of example 'test/precalculus/807.json' has "
                                         r"\d+ tokens, more than data.max_prompt_tokens=200"):
        encode_prompt(tok, teacher_messages(math500[0], DataConfig(), TeacherConfig()), 200, math500[0].id,
                      "teacher (reference)")
    # a UsageError: found inside a rank (rank 0 encodes the step's prompts), it still ends the run as one line
    with pytest.raises(UsageError, match="student prompt .* data.max_prompt_tokens=5"):
        student_prompt_ids(tok, math500[0], DataConfig(max_prompt_tokens=5))


def test_real_datasets_load_unchanged(math500):
    assert len(math500) == 500 and math500[0].id == "test/precalculus/807.json"
    assert all(ex.reference and ex.answer for ex in math500)
    assert {"subject", "level"} <= set(math500[0].extra)
    aime = load_prompt_dataset(f"{DATA}/aime24/test.jsonl", DataConfig(id_field="id"))
    assert len(aime) == 30 and all(ex.answer.isdigit() for ex in aime)
    amc = load_prompt_dataset(f"{DATA}/amc23/test.jsonl", DataConfig(id_field="id"))
    assert len(amc) == 40 and all(ex.reference is None for ex in amc)
    assert amc[0].answer == "27"  # stored as the float 27.0
    assert load_prompt_dataset(f"{DATA}/amc23/test.jsonl", DataConfig(limit=5))[-1].id == "4"
    # contexts that do not need a solution work; one that does names the field
    assert teacher_messages(amc[0], DataConfig(), TeacherConfig(context="answer"))[-1]["content"].count("27") >= 1
    with pytest.raises(ValueError, match=r"teacher.context=reference needs the field 'solution' "
                                         r"\(data.reference_field\), which example '0' does not have"):
        teacher_messages(amc[0], DataConfig(), TeacherConfig(context="reference"))


def test_parquet_and_field_names(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"q": f"What is {i}+1?", "sol": f"{i}+1={i + 1}", "ans": i + 1, "key": f"k{i}", "tp": None}
            for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    cfg = DataConfig(prompt_field="q", reference_field="sol", answer_field="ans", id_field="key",
                     teacher_prompt_field="tp")
    examples = load_prompt_dataset(tmp_path / "d.parquet", cfg)
    assert [(e.id, e.prompt, e.reference, e.answer, e.teacher_prompt) for e in examples[:2]] == [
        ("k0", "What is 0+1?", "0+1=1", "1", None), ("k1", "What is 1+1?", "1+1=2", "2", None)]
    msgs = student_messages(examples[0], DataConfig(prompt_template="Q: {{ problem }} A:", system_prompt="S"))
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q: What is 0+1? A:"}]


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_prompt_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        load_prompt_dataset(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"problem": "a"}\n{"question": "b", "answer": 1}\n')
    with pytest.raises(ValueError, match=r"row 1 has no 'problem' \(data.prompt_field\); available fields: "
                                         r"\['answer', 'question'\]"):
        load_prompt_dataset(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"problem": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl:2: not valid JSON"):
        load_prompt_dataset(tmp_path / "broken.jsonl")
    (tmp_path / "x.csv").write_text("problem\n1\n")
    with pytest.raises(ValueError, match="set data.format"):
        load_prompt_dataset(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=r"teacher.template \(example '0'\): 'reference' is undefined"):
        teacher_messages(PromptExample(id="0", prompt="p"), DataConfig(),
                         TeacherConfig(context="template", template="{{ reference }}"))
    with pytest.raises(ValueError, match="teacher.context=rollout needs a correct rollout"):
        teacher_messages(PromptExample(id="0", prompt="p"), DataConfig(), TeacherConfig(context="rollout"))


def test_sampler_epochs_and_resume():
    examples = [PromptExample(id=str(i), prompt=str(i)) for i in range(5)]
    sampler = PromptSampler(examples, batch_size=3, seed=7)
    seen = [e.id for _ in range(2) for e in sampler.next_batch()][:5]
    assert sorted(seen) == [str(i) for i in range(5)]  # one epoch is a permutation
    state = sampler.state_dict()
    expected = [e.id for e in sampler.next_batch()]
    other = PromptSampler(examples, batch_size=3, seed=0)
    other.load_state_dict(state)
    assert [e.id for e in other.next_batch()] == expected
