"""The compression ablation's second protocol (issue 28, `megatron-opsd demo --ablation hindsight`,
docs/ablation2.md): its task, the mechanism check's text analysis, the hierarchical bootstrap, the matched-budget
rule, the verdict rules on planted inputs and, slow + vllm, the --quick run end to end."""
import json
import random

import numpy as np
import pytest

from megatron_opsd.data import contexts
from megatron_opsd.demo import ablation, ablation2, cli, path_task, task
from tests.test_demo_ablation import parse, run_quick_ablation


def splits(n_train=200):
    return path_task.generate_splits(task.TaskConfig(n_train=n_train, n_test=20, min_steps=5, max_steps=5,
                                                     max_value=12))


# ------------------------------------------------------------------------------------------------- task

def test_problems_have_two_paths_and_the_reference_hides_the_values():
    train, test = splits()
    assert not {e["problem"] for e in train} & {e["problem"] for e in test}
    for ex in train + test:
        assert path_task.reordered(ex["problem"]) != ex["problem"]
        steps = task.solve_steps(ex["problem"])
        assert len(steps) == 5 and ex["answer"] == str(steps[-1][3])
        assert task.solve_steps(path_task.reordered(ex["problem"]))[-1][3] == steps[-1][3]  # same value
        # the reference: method and answer, no intermediate value of either path, no path
        assert ex["solution"] == path_task.reference_solution(ex["answer"])
        assert "=" not in ex["solution"] and path_task.PATH_B not in ex["solution"]


def test_traces_are_correct_on_both_paths_and_both_prompts_get_the_same_traces():
    train, _ = splits()
    rng, heads = random.Random(0), []
    for ex in train:
        trace = path_task.long_trace(ex, rng)
        assert task.boxed_answer(trace) == ex["answer"] and path_task.first_wrong_char(trace, ex["answer"]) is None
        heads.append(trace.startswith(path_task.PATH_B))
    assert 0.35 < np.mean(heads) < 0.65
    records = path_task.build_sft_mixture(train * 5, seed=0)
    kinds = {k: [r for r in records if r["kind"] == k] for k in ("reference", "student")}
    assert 0.4 < len(kinds["reference"]) / len(records) < 0.6
    for r in kinds["reference"]:
        assert contexts.REFERENCE_INTRO in r["messages"][0]["content"]
    # not taught to be concise: the reference prompt's traces are as long and as full of detours as the student's
    length = {k: np.mean([len(r["messages"][-1]["content"]) for r in v]) for k, v in kinds.items()}
    waits = {k: np.mean([r["messages"][-1]["content"].count("let me") for r in v]) for k, v in kinds.items()}
    assert abs(length["reference"] / length["student"] - 1) < 0.05
    assert abs(waits["reference"] / waits["student"] - 1) < 0.1


def test_token_types_and_first_wrong_value():
    ex = {"problem": "Compute 7 - 3 + 5 + 1 - 6.", "answer": "4"}
    good = ("Left to right. 7 - 3 = 4, so 4 + 5 + 1 - 6. Wait, let me verify: 7 - 3 = 4. Correct. So we have "
            "4 + 5 + 1 - 6. 4 + 5 = 9, so 9 + 1 - 6. 9 + 1 = 10, so 10 - 6. 10 - 6 = 4. Let me double-check "
            "everything from the start: 7 - 3 = 4. 4 + 5 = 9. Correct. The answer is \\boxed{4}.")
    spans = {(good[a:b], kind) for a, b, kind in path_task.token_types(good)}
    assert ("Wait, let me verify: 7 - 3 = 4.", "detour") in spans and ("So we have 4 + 5 + 1 - 6.", "detour") in spans
    assert ("4 + 5 = 9.", "detour") in spans  # inside the final re-check
    assert {s for s, k in spans if k == "value"} == {"4", "9", "10"} and ("4", "answer") in spans
    assert path_task.first_wrong_char(good, ex["answer"]) is None
    # a slip caught by its detour is not the error; the uncaught one at "9 + 1 = 11" is, carried to the end
    bad = ("Left to right. 7 - 3 = 5, so 5 + 5 + 1 - 6. Wait, let me verify: 7 - 3 = 4, not 5. So we have "
           "4 + 5 + 1 - 6. 4 + 5 = 9, so 9 + 1 - 6. 9 + 1 = 11, so 11 - 6. 11 - 6 = 5. The answer is \\boxed{5}.")
    assert bad[path_task.first_wrong_char(bad, ex["answer"]):].startswith("11, so 11 - 6.")
    # the riskier path's expression, and a copy error only in the boxed answer
    path = "Additions first: 7 + 5 + 1 - 3 - 5. 7 + 5 = 12, so 12 + 1 - 3 - 5. The answer is \\boxed{5}."
    assert path_task.first_wrong_char(path, ex["answer"]) == path.index("7 + 5 + 1")
    assert good.replace("{4}", "{5}")[path_task.first_wrong_char(good.replace("{4}", "{5}"), "4"):] == "5}."


def test_response_tokens_map_types_and_the_first_wrong_token(tmp_path):
    from megatron_opsd.demo import hindsight_check
    from megatron_opsd.models.tokenizer_train import train_bpe_tokenizer

    train, _ = splits()
    tokenizer = train_bpe_tokenizer(path_task.tokenizer_corpus(train), tmp_path / "tok", vocab_size=512)
    text = ("Left to right. 7 - 3 = 4, so 4 + 5 + 1 - 6. 4 + 5 = 9, so 9 + 1 - 6. 9 + 1 = 11, so 11 - 6. "
            "11 - 6 = 5. The answer is \\boxed{5}.")
    ids, types, first = hindsight_check.response_tokens(tokenizer, text, "4")
    assert ids[-1] == tokenizer.eos_token_id and len(types) == len(ids)
    assert tokenizer.decode(ids[first]).strip() == "11" and types[first] == "value"
    assert types.count("answer") >= 1 and set(types) <= set(path_task.TOKEN_TYPES)


def test_batched_divergences_equal_one_rollout_at_a_time(tiny_checkpoints):
    """The mechanism check's right-padded batches give each rollout the logits of its own forward, and its
    divergence is the trainer's per-token JSD / reverse KL (zero against itself)."""
    import torch

    from megatron_opsd.demo import hindsight_check
    from megatron_opsd.losses.divergence import vocab_parallel_divergence

    model = hindsight_check.load_model(tiny_checkpoints["qwen3"])
    prompts, responses = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [[9, 10, 11, 12], [13, 14], [15, 16, 17]]
    batched = hindsight_check.response_logits(model, prompts, responses, batch=2)
    alone = torch.cat([hindsight_check.response_logits(model, [p], [r]) for p, r in zip(prompts, responses)])
    assert batched.shape == (9, alone.shape[1]) and torch.allclose(batched, alone, atol=1e-5)
    div = hindsight_check.per_token_divergences(model, model, prompts, prompts, responses)
    assert [len(d) for d in div["jsd"]] == [4, 2, 3] and max(abs(d).max() for d in div["reverse_kl"]) < 1e-6
    other = hindsight_check.per_token_divergences(model, model, prompts, [[7, 7]] * 3, responses)
    expect = vocab_parallel_divergence(alone, hindsight_check.response_logits(model, [[7, 7]] * 3, responses),
                                       kind="jsd", beta=0.5)[1].numpy()
    assert np.allclose(np.concatenate(other["jsd"]), expect, atol=1e-6) and expect.max() > 0


# ------------------------------------------------------------------------------------------- statistics

def test_hierarchical_bootstrap_resamples_chains_then_problems():
    rng = np.random.default_rng(0)
    same = [np.full((40, 2), 3.0)] * 3
    assert ablation2.hierarchical_ci(same, ablation.sample_mean, n_boot=50) == (3.0, 3.0)
    # one chain: the problems-only bootstrap, exactly (the same draws)
    x = rng.normal(size=(60, 1))
    lo, hi = ablation2.hierarchical_ci([x], ablation.sample_mean, n_boot=300, seed=4)
    draws, expect = np.random.default_rng(4), []
    for _ in range(300):
        draws.integers(0, 1, 1)  # the chain draw (one chain)
        expect.append(x[draws.integers(0, 60, 60)].mean())
    assert (lo, hi) == pytest.approx(tuple(np.percentile(expect, [2.5, 97.5])))
    # chains that differ: the CI covers the chain spread, wider than pooling the problems would give
    chains = [rng.normal(m, 1.0, size=(200, 1)) for m in (0.0, 1.0, 2.0)]
    m = ablation2.chain_metric(chains, ablation.sample_mean, n_boot=500)
    assert m["per_chain"] == pytest.approx([c.mean() for c in chains])
    assert m["value"] == pytest.approx(np.mean(m["per_chain"]))
    pooled = ablation.bootstrap_ci(np.concatenate(chains), ablation.sample_mean, n_boot=500)
    assert m["ci"][1] - m["ci"][0] > 3 * (pooled[1] - pooled[0])
    # paired change per chain: half the tokens, same accuracy -> exactly -50% and 0 points in every chain
    arrays = [((rng.random((30, 2)) < 0.6).astype(float), rng.integers(50, 90, (30, 2)).astype(float))
              for _ in range(2)]
    ch = ablation2.change([(c, t / 2) for c, t in arrays], arrays, n_boot=100)
    assert ch["tokens_relative"]["per_chain"] == pytest.approx([-0.5, -0.5]) and ch["accuracy"]["ci"] == (0.0, 0.0)


def test_prompts_per_step_oversample_the_rarer_kind():
    r = ablation2.FULL
    assert ablation2.prompts_per_step("all", 0.7, r) == 5  # ceil(1.25 * 16 / 4)
    assert ablation2.prompts_per_step("correct", 0.7, r) == 8  # ceil(20 / 2.8)
    assert ablation2.prompts_per_step("incorrect", 0.7, r) == 16  # ceil(20 / 1.2) = 17, capped
    assert ablation2.prompts_per_step("incorrect", 1.0, r) == 16 and ablation2.prompts_per_step("correct", 1.0, r) == 5


def test_budget_counts_report_short_and_empty_steps(tmp_path):
    rows = [{"rollout/num_rollouts": 16, "rollout/accuracy": 0.25, "rollout/num_kept": 4, "rollout/num_trained": 4,
             "rollout/groups_mixed": 0.5},
            {"rollout/num_rollouts": 16, "rollout/accuracy": 0.0, "rollout/num_kept": 0, "rollout/num_trained": 0,
             "rollout/groups_mixed": 0.0},
            {"rollout/num_rollouts": 16, "rollout/accuracy": 0.5, "rollout/num_kept": 8, "rollout/num_trained": 4,
             "rollout/groups_mixed": 1.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    b = ablation2.budget_counts(path, 4)
    assert (b["steps"], b["generated"], b["correct"], b["kept_by_filter"], b["trained"]) == (3, 48, 12, 12, 8)
    assert (b["short_steps"], b["empty_steps"]) == (1, 1) and b["budget_share"] == pytest.approx(8 / 12)
    assert b["groups_mixed"] == pytest.approx(0.5)


def _evidence(acc, acc_ci, tok, tok_ci, **kw):
    ev = {"rlvr_accuracy": 0.7, "budget_share": {"correct": 1.0, "incorrect": 1.0}, "peak_at_first_wrong": 0.1,
          "change": {f: {"accuracy": {"value": acc, "ci": acc_ci}, "tokens_relative": {"value": tok, "ci": tok_ci}}
                     for f in ("correct", "incorrect")},
          "ordering": {"value": 0.05, "ci": (0.01, 0.09)}}
    ev.update(kw)
    return ev


def test_verdict_rules_on_planted_inputs():
    v = ablation2.verdict
    # correct-only: same accuracy, 30% shorter -> reproduced; incorrect-only the same -> refuted (length changes)
    out = v(_evidence(0.0, (-0.02, 0.02), -0.3, (-0.35, -0.25)))
    assert out["correct_only"]["outcome"] == "reproduced" and out["incorrect_only"]["outcome"] == "refuted"
    assert out["ordering"]["outcome"] == "reproduced"
    # accuracy clearly down, length unchanged: incorrect-only reproduced, correct-only refuted (both ways)
    out = v(_evidence(-0.08, (-0.12, -0.04), 0.01, (-0.03, 0.05)))
    assert out["incorrect_only"]["outcome"] == "reproduced" and out["correct_only"]["outcome"] == "refuted"
    # wide CIs: inconclusive
    out = v(_evidence(-0.01, (-0.09, 0.07), -0.12, (-0.30, 0.04), ordering={"value": 0.0, "ci": (-0.05, 0.05)}))
    assert {c["outcome"] for c in out.values()} == {"inconclusive"}
    # preconditions: the regime, the budget, attributable errors (incorrect-only only)
    out = v(_evidence(0.0, (-0.02, 0.02), -0.3, (-0.35, -0.25), rlvr_accuracy=0.97))
    assert {c["outcome"] for c in out.values()} == {"inconclusive"} and "0.97" in out["correct_only"]["reason"]
    out = v(_evidence(0.0, (-0.02, 0.02), -0.3, (-0.35, -0.25), budget_share={"correct": 0.5, "incorrect": 1.0}))
    assert out["correct_only"]["outcome"] == "inconclusive" and "budget" in out["correct_only"]["reason"]
    assert out["incorrect_only"]["outcome"] == "refuted" and out["ordering"]["outcome"] == "inconclusive"
    out = v(_evidence(-0.08, (-0.12, -0.04), 0.01, (-0.03, 0.05), peak_at_first_wrong=0.8))
    assert out["incorrect_only"]["outcome"] == "inconclusive" and "attributable" in out["incorrect_only"]["reason"]
    assert out["correct_only"]["outcome"] == "refuted"


def test_hindsight_arguments_and_stages():
    recipe, run_dir, config_dir = ablation2.resolve_hindsight(parse("--ablation", "hindsight", "--quick"))
    assert recipe == ablation2.QUICK and run_dir.name == "demo-hindsight-quick"
    assert cli.main(parse("--ablation", "hindsight", "--seed", "3")) == 2
    assert cli.main(parse("--ablation", "hindsight", "--filters", "correct,bogus")) == 2
    cfg = ablation2.hindsight_pipeline(ablation2.FULL, run_dir, config_dir, 1, 0.7)
    objs = cli.stage_config_objects(cfg)
    assert [s.name for s in cfg.stages[:2]] == ["sft", "rlvr"] and len(cfg.stages) == 2 + 2 * 3
    arms = {s.name: objs[s.name] for s in cfg.stages[2:]}
    assert all(s.init_from == "rlvr" for s in cfg.stages[2:])
    assert {(o.loss.divergence, o.rollout.filter) for o in arms.values()} == \
        {(loss, f) for loss in ablation2.LOSSES for f in ablation2.FILTERS}
    for o in arms.values():
        assert (o.teacher.context, o.teacher.weights, o.loss.reduction, o.loss.beta) == ("reference", "frozen",
                                                                                          "token_mean", 0.5)
        assert (o.rollout.n, o.rollout.max_kept, o.train.steps, o.rollout.seed) == (4, 16, 30, 1)
        assert o.rollout.prompts_per_step == ablation2.prompts_per_step(o.rollout.filter, 0.7, ablation2.FULL)
    assert objs["sft"].train.seed == 1 and objs["rlvr"].rollout.seed == 1


# ------------------------------------------------------------------------------------------- end to end

@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)
def test_quick_hindsight_end_to_end(tmp_path):
    """`megatron-opsd demo --ablation hindsight --quick`: the real chain (SFT, RLVR, two OPSD arms with the
    reference teacher, sidecar evaluation, the mechanism check on the models' own rollouts) runs, and what holds
    for any seed holds: each filter trains only on what it names and at most K rollouts per step, the arms run
    the same steps, short and empty steps are reported, the mechanism check gives finite numbers, every value
    lies in its CI and the verdict names an outcome. No effect size (the models are barely trained)."""
    out = tmp_path / "hindsight"
    results = run_quick_ablation("hindsight", out)
    q, summary = ablation2.QUICK, results["summary"]
    budgets = summary["budgets"]["c0"]
    for f in q.filters:
        b = budgets[ablation2.arm_name("jsd", f)]
        assert b["steps"] == q.opsd_steps and b["generated"] == q.opsd_steps * q.group_size * b["prompts_per_step"]
        assert b["kept_by_filter"] == (b["correct"] if f == "correct" else b["generated"] - b["correct"])
        assert all(t <= q.kept_per_step for t in b["trained_per_step"]) and b["trained"] <= b["kept_by_filter"]
        assert b["short_steps"] == sum(t < q.kept_per_step for t in b["trained_per_step"])
        assert b["empty_steps"] == sum(t == 0 for t in b["trained_per_step"])
        metrics = [json.loads(x) for x in (out / "chains" / "chain-0" / "stages" / ablation2.arm_name("jsd", f) /
                                           "metrics.jsonl").read_text().splitlines() if x.strip()]
        assert [m["rollout/num_trained"] for m in metrics] == \
            [min(q.kept_per_step, m["rollout/num_kept"]) for m in metrics]
    for name, row in summary["rows"].items():
        for mode, m in row.items():
            for key, metric in m.items():
                lo, hi = metric["ci"]
                assert lo - 1e-9 <= metric["value"] <= hi + 1e-9, (name, mode, key)
    mech = summary["mechanism"]["c0"]
    assert set(mech) == {"rlvr"} | {ablation2.arm_name("jsd", f) for f in q.filters}
    assert mech["rlvr"]["rollouts"] == q.n_test * q.sampled_n  # the arms: the first sampled pass
    for m in mech.values():
        assert m["rollouts"] in (q.n_test, q.n_test * q.sampled_n)
        values = [x for by in m["mean_by_type"].values() for kinds in by.values() for x in kinds.values()
                  if x is not None]
        assert values and all(np.isfinite(values)) and min(values) >= -1e-6  # divergences (float rounding)
    claims = summary["verdict"]["jsd"]["claims"]
    assert set(claims) == {"correct_only", "incorrect_only", "ordering"}
    assert all(c["outcome"] in ("reproduced", "refuted", "inconclusive") and c["reason"] for c in claims.values())
    if results["curves_png"]:
        assert (out / "curves.png").stat().st_size > 10_000


def test_summary_table_and_verdict_from_planted_runs():
    """summarize -> results_table on planted per-chain arrays: per-chain values, the paired change, the budget and
    mechanism rows and a verdict per loss (correct-only halves the tokens at equal accuracy: reproduced)."""
    from dataclasses import replace

    rng = np.random.default_rng(0)
    recipe = replace(ablation2.FULL, chains=(0, 1), losses=("jsd",), filters=("correct", "incorrect"), n_boot=200)

    def run(p, tokens, samples=2):
        correct = (rng.random((50, samples)) < p).astype(float)
        return correct, np.full((50, samples), float(tokens))

    arrays, budgets, mech = {}, {}, {}
    for c in ("c0", "c1"):
        base = run(0.6, 100)
        arrays.update({f"{c}-sft": {"greedy": run(0.5, 120, 1), "sampled": run(0.5, 120)},
                       f"{c}-rlvr": {"greedy": run(0.6, 100, 1), "sampled": base},
                       f"{c}-rlvr_reference_prompt": {"greedy": run(0.9, 100, 1)},
                       f"{c}-opsd-jsd-correct": {"greedy": run(0.6, 50, 1), "sampled": (base[0], base[1] / 2)},
                       f"{c}-opsd-jsd-incorrect": {"greedy": run(0.3, 100, 1), "sampled": run(0.3, 100)}})
        budgets[c] = {a: {"trained": 480.0, "budget_share": 1.0, "short_steps": 0, "empty_steps": 0,
                          "groups_mixed": 0.6, "kept_by_filter": 500.0, "generated": 900.0, "prompts_per_step": 8}
                      for a in ("opsd-jsd-correct", "opsd-jsd-incorrect")}
        check = {"rollouts": 100, "incorrect": 40, "incorrect_located": 30, "peak_at_first_wrong": 0.1,
                 "peak_at_first_wrong_chance": 0.02, "peak_in_answer": 0.7,
                 "mean_by_type": {"jsd": {k: dict.fromkeys(path_task.TOKEN_TYPES, 0.01) for k in ("correct",
                                                                                                   "incorrect")}}}
        mech[c] = {"rlvr": check, "opsd-jsd-correct": check, "opsd-jsd-incorrect": check}
    summary = ablation2.summarize(recipe, arrays, budgets, mech, {"c0": 0.6, "c1": 0.6})
    row = summary["rows"]["opsd-jsd-correct"]
    assert row["change_vs_rlvr"]["tokens_relative"]["per_chain"] == pytest.approx([-0.5, -0.5])
    assert row["change_vs_rlvr"]["accuracy"]["value"] == 0.0 and len(row["sampled"]["accuracy"]["per_chain"]) == 2
    claims = summary["verdict"]["jsd"]["claims"]
    assert claims["correct_only"]["outcome"] == "reproduced" and claims["ordering"]["outcome"] == "reproduced"
    assert summary["verdict"]["jsd"]["evidence"]["peak_at_first_wrong"] == pytest.approx(0.1)
    table = ablation2.results_table(summary)
    assert "| opsd-jsd-correct |" in table and "c1 opsd-jsd-incorrect" in table
    assert "0.0 pts [0.0, 0.0] (chains 0.0, 0.0), -50.0% [-50.0, -50.0] (chains -50.0, -50.0)" in table
    assert "jsd (primary) correct_only: **reproduced**" in table and "10% (2%)" in table
