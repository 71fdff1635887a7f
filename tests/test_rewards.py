"""Verifiers on the real benchmarks: each reference grades correct against its own answer, shuffled pairs do not."""
import json
import random
import threading

import pytest

from megatron_opsd.config import RewardConfig
from megatron_opsd.data.datasets import PromptExample
from megatron_opsd.evaluation.runner import packaged_data_dir
from megatron_opsd.rewards import build_reward, extract_boxed_answer
from megatron_opsd.rewards.exact import ExactVerifier, normalize_answer
from megatron_opsd.rewards.filters import correct_demonstrations, group_filter
from megatron_opsd.rewards.math import MathVerifier

DATA = packaged_data_dir()  # the benchmarks shipped in the package

# AIME 2024 reference solutions that math-verify cannot grade from their last \boxed{} (checked by hand):
AIME_UNGRADABLE_SOLUTIONS = {
    "204": "the solution has no \\boxed{} at all",
    "073": "boxed as \\textbf{(073)}; math-verify rejects \\textbf around a parenthesised zero-padded integer",
}


def _rows(name):
    return [json.loads(line) for line in open(f"{DATA}/{name}/test.jsonl")]


def _derangement(n, seed=0):
    rng = random.Random(seed)
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != i for i, p in enumerate(perm)):
            return perm


@pytest.fixture(scope="module")
def verifier():
    return MathVerifier(boxed_only=True)


def test_extract_boxed_answer():
    assert extract_boxed_answer("a \\boxed{1} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed_answer("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert extract_boxed_answer("\\fbox{x^{2}}") == "x^{2}"
    assert extract_boxed_answer("so $\\boxed 5$") == "5"
    assert extract_boxed_answer("\\boxed{\\{1,2\\}}") == "\\{1,2\\}"
    assert extract_boxed_answer("no box here") is None
    assert extract_boxed_answer("\\boxed{1} and a cut-off \\boxed{\\frac{2}") is None  # truncated last box
    assert extract_boxed_answer("\\boxedx{3}") is None


def test_math500_references_grade_correct_and_shuffled_do_not(verifier):
    rows = _rows("math500")
    golds = [r["answer"] for r in rows]
    own = verifier.grade_batch([r["solution"] for r in rows], golds)
    # every MATH-500 reference solution's last \boxed{} verifies against its own answer (0 exceptions needed)
    assert sum(own) == 500, [r["unique_id"] for r, ok in zip(rows, own) if not ok]
    perm = _derangement(len(rows))
    shuffled = verifier.grade_batch([rows[p]["solution"] for p in perm], golds)
    same_answer = [golds[i] == golds[p] for i, p in enumerate(perm)]
    # pairs whose answers are the same string must still pass; all other pairs must fail
    assert all(ok for ok, same in zip(shuffled, same_answer) if same)
    false_positives = [(golds[i], golds[p]) for i, p in enumerate(perm) if shuffled[i] and not same_answer[i]]
    assert len(false_positives) == 0, false_positives
    assert sum(same_answer) < 15  # the shuffle really mixes answers (about 8 coincide)


def test_full_text_mode_grades_reference_solutions(verifier):
    rows = _rows("math500")[:60]
    full = MathVerifier(boxed_only=False)
    own = full.grade_batch([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert sum(own) >= 58  # math-verify's own extraction picks the boxed answer too
    assert not verifier.grade("The answer is 7.", "7")  # boxed_only: no box, no credit
    assert full.grade("The answer is 7.", "7")


def test_aime24(verifier):
    rows = _rows("aime24")
    golds = [r["answer"] for r in rows]
    own = verifier.grade_batch([r["solution"] for r in rows], golds)
    failing = {g for g, ok in zip(golds, own) if not ok}
    assert failing == set(AIME_UNGRADABLE_SOLUTIONS)
    # answers are integers (zero-padded strings such as '025'): grade "\boxed{answer}" strings
    assert all(verifier.grade_batch([f"So the answer is \\boxed{{{g}}}." for g in golds], golds))
    assert verifier.grade("\\boxed{25}", "025") and verifier.grade("\\boxed{104.}", "104")
    perm = _derangement(len(rows))
    assert not any(verifier.grade_batch([f"\\boxed{{{golds[p]}}}" for p in perm], golds))


def test_amc23_answers_against_themselves_and_shuffled(verifier):
    rows = _rows("amc23")  # no solutions; answers stored as floats (27.0)
    golds = [str(int(r["answer"])) if float(r["answer"]).is_integer() else str(r["answer"]) for r in rows]
    assert all(verifier.grade_batch([f"\\boxed{{{g}}}" for g in golds], golds))
    assert all(verifier.grade_batch([f"\\boxed{{{r['answer']}}}" for r in rows], golds))  # "27.0" == "27"
    perm = _derangement(len(rows))
    shuffled = verifier.grade_batch([f"\\boxed{{{golds[p]}}}" for p in perm], golds)
    assert [ok for ok in shuffled] == [golds[i] == golds[p] for i, p in enumerate(perm)]


def test_math_verifier_refuses_threads_and_works_in_a_process_pool():
    errors = []

    def run():
        try:
            MathVerifier().grade("\\boxed{1}", "1")
        except RuntimeError as err:
            errors.append(str(err))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "signal.alarm" in errors[0] and "num_workers" in errors[0]
    pooled = MathVerifier(num_workers=2)
    try:
        responses = ["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{3}", "nothing", "\\boxed{[1, 2)}"]
        golds = ["0.5", "\\frac12", "4", "1", "[1,2)"]
        assert pooled.grade_batch(responses, golds) == [True, True, False, False, True]
    finally:
        pooled.close()


def test_exact_and_callable_rewards():
    assert normalize_answer(" $\\text{(B)}$. ") == "(B)" and normalize_answer("27.0") == "27"
    exact = ExactVerifier()
    assert exact.grade_batch(["\\boxed{ \\text{Evelyn} }", "\\boxed{1/2}", "Evelyn"], ["Evelyn", "0.5", "Evelyn"]) == [
        True, False, False]
    examples = [PromptExample(id="a", prompt="p", answer="3"), PromptExample(id="b", prompt="q", answer="\\frac{1}{2}")]
    assert build_reward(RewardConfig(kind="math"))(["\\boxed{3}", "\\boxed{0.25}"], examples) == [1.0, 0.0]
    assert build_reward(RewardConfig(kind="exact"))(["\\boxed{3}", "\\boxed{0.5}"], examples) == [1.0, 0.0]
    fn = build_reward(RewardConfig(kind="callable", callable="tests.test_rewards:length_reward"))
    assert fn(["abc", "de"], examples) == [3.0, 2.0]
    assert fn("abcd", examples[0]) == 4.0  # single-response form
    assert build_reward(RewardConfig())("so \\boxed{\\frac12}", examples[1]) == 1.0
    with pytest.raises(ValueError, match="has no gold answer"):
        build_reward(RewardConfig(kind="math"))(["\\boxed{1}"], [PromptExample(id="z", prompt="p")])
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        build_reward(RewardConfig(kind="callable", callable="no_such_module:f"))
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        build_reward(RewardConfig(kind="callable", callable="tests.test_rewards:nope"))
    with pytest.raises(ValueError, match="must look like 'package.module:function'"):
        build_reward(RewardConfig(kind="callable", callable="just_a_name"))


def length_reward(response, example):
    return len(response)


def test_group_filter_modes_and_stats():
    groups = [[[1] * 10, [1] * 20, [1] * 30], [[1] * 4, [1] * 6], [[1] * 5]]
    correct = [[True, False, True], [0.0, 0.0], [1.0]]
    res_all = group_filter(groups, correct, "all")
    res_c = group_filter(groups, correct, "correct")
    res_i = group_filter(groups, correct, "incorrect")
    assert res_c.kept_indices == [[0, 2], [], [0]] and res_i.kept_indices == [[1], [0, 1], []]
    assert res_all.kept == groups and res_c.kept[0] == [[1] * 10, [1] * 30]
    for res in (res_all, res_c, res_i):  # statistics do not depend on the filter
        assert res.group_accuracy == pytest.approx([2 / 3, 0.0, 1.0])
        assert res.group_mean_length == pytest.approx([20.0, 5.0, 5.0])
        assert res.stats["accuracy"] == pytest.approx(3 / 6)
        assert res.stats["mean_length"] == pytest.approx(75 / 6)
        assert res.stats["mean_length_correct"] == pytest.approx(45 / 3)
        assert res.stats["mean_length_incorrect"] == pytest.approx(30 / 3)
        assert res.stats["groups_all_correct"] == pytest.approx(1 / 3)
        assert res.stats["groups_all_incorrect"] == pytest.approx(1 / 3)
    assert res_all.stats["fraction_filtered"] == 0.0
    assert res_c.stats["fraction_filtered"] == pytest.approx(3 / 6)
    assert res_i.stats["fraction_filtered"] == pytest.approx(3 / 6)
    assert res_c.stats["groups_empty_after_filter"] == pytest.approx(1 / 3)
    assert res_c.stats["groups_mixed"] == pytest.approx(1 / 3)  # only the first group holds both kinds
    explicit = group_filter([["a", "b"]], [[True, False]], "correct", lengths=[[7, 9]])
    assert explicit.kept == [["a"]] and explicit.stats["mean_length_correct"] == 7.0
    with pytest.raises(ValueError, match="rollout.filter='best'"):
        group_filter(groups, correct, "best")
    with pytest.raises(ValueError, match="group 1: 2 rollouts but 1 correctness values"):
        group_filter(groups, [[1, 1, 1], [1], [1]], "all")
    assert correct_demonstrations([[True, False, True], [False, False], [False, True]]) == [
        [2, 2, 0], [None, None], [1, None]]  # the next *other* correct one, cyclically; never itself


def test_max_kept_caps_the_filters_rollouts_with_a_seeded_subset():
    """rollout.max_kept (docs/ablation2.md's matched budgets): at most that many of the filter's rollouts, a
    subset of them, the same for the same seed (every rank draws it), all of them when there are fewer."""
    from megatron_opsd.training.opsd.step import StepRollouts, distillation_rows

    correct = [[True, False, True, True], [False, False, True, False], [True, True, True, True]]
    rollouts = StepRollouts(student_prompts=[[1]] * 3, responses=[[[2] * (k + 1) for k in range(4)]] * 3,
                            correct=correct, teachers={"reference": [[[3]] * 4] * 3})
    eligible = {(i, j) for i, g in enumerate(correct) for j, c in enumerate(g) if c}
    keep, stats = distillation_rows(rollouts, "correct", None, max_kept=4, seed=7)
    assert len(keep) == 4 and set(keep) <= eligible and stats["rollout/num_kept"] == len(eligible) == 8
    assert stats["rollout/num_trained"] == 4 and keep == distillation_rows(rollouts, "correct", None, 4, seed=7)[0]
    assert any(distillation_rows(rollouts, "correct", None, 4, seed=s)[0] != keep for s in range(8, 12))
    keep, stats = distillation_rows(rollouts, "incorrect", None, max_kept=10, seed=7)
    assert len(keep) == stats["rollout/num_trained"] == stats["rollout/num_kept"] == 4  # fewer than the cap: all
    assert stats["rollout/groups_mixed"] == pytest.approx(2 / 3)
    assert distillation_rows(rollouts, "all", None)[1]["rollout/num_trained"] == 12
