"""The compression ablation (issue 19, `megatron-opsd demo --ablation compression`): its task variant, its
statistics (bootstrap CIs, paired changes, the paper's verdict) and, slow + vllm, the --quick chain end to end."""
import argparse
import contextlib
import io
import json
import random

import numpy as np
import pytest

from megatron_opsd.config import DataConfig
from megatron_opsd.data import contexts
from megatron_opsd.data.datasets import load_prompt_dataset
from megatron_opsd.demo import ablation, carry_task, cli, task


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


# ------------------------------------------------------------------------------------------------- task

def test_long_traces_are_correct_and_every_slip_is_caught():
    train, _ = task.generate_splits(task.TaskConfig(n_train=300, n_test=1, min_steps=3, max_steps=3, max_value=12))
    rng, slips = random.Random(0), 0
    for ex in train:
        trace = carry_task.long_trace(ex, rng)
        assert task.boxed_answer(trace) == ex["answer"]
        for lhs, op, operand, result in task.solve_steps(ex["problem"]):
            # a slip writes a wrong value for this step, and the detour right after it restates the right one
            for wrong in {result - 2, result - 1, result + 1, result + 2} - {result}:
                slip = f"{lhs} {op} {operand} = {wrong}"
                if slip in trace:
                    slips += 1
                    assert f"{lhs} {op} {operand} = {result}, not {wrong}." in trace, trace
    # slip_prob 0.2 per step over 900 steps (a slip value can coincide with a later step's text: loose bounds)
    assert 120 <= slips <= 240


def test_reference_prompt_is_the_trainers_teacher_context(tmp_path):
    """The SFT mixture's reference prompt is exactly what the trainer builds with teacher.context=reference from
    the JSONL row (so the teacher is in distribution)."""
    train, _ = task.generate_splits(task.TaskConfig(n_train=20, n_test=1, min_steps=3, max_steps=3, max_value=12))
    path = task.write_jsonl(tmp_path / "train.jsonl", train)
    rows = load_prompt_dataset(path, DataConfig())
    for ex, row in zip(train, rows):
        assert carry_task.reference_messages(ex) == contexts.teacher_messages(
            row, DataConfig(), carry_task.reference_teacher_config())
    records = carry_task.build_sft_mixture(train * 10, seed=0)
    kinds = {r["kind"] for r in records}
    assert kinds == {"reference", "long"}
    for r in records:
        if r["kind"] == "reference":
            assert contexts.REFERENCE_INTRO in r["messages"][0]["content"]
            assert "Wait" not in r["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------- statistics

def test_bootstrap_ci_known_cases():
    # a constant sample: every replicate is the constant
    assert ablation.bootstrap_ci(np.full((50, 3), 7.0), ablation.sample_mean) == (7.0, 7.0)
    # the mean of a large normal sample: percentile CI ~ mean +- 1.96 sd / sqrt(n)
    x = np.random.default_rng(1).normal(3.0, 2.0, size=2000)
    lo, hi = ablation.bootstrap_ci(x, ablation.sample_mean, n_boot=2000)
    half = 1.96 * x.std(ddof=1) / np.sqrt(len(x))
    assert abs((hi - lo) / 2 - half) < 0.1 * half and abs((lo + hi) / 2 - x.mean()) < 0.1 * half
    # resampling is over problems: two identical samples per problem give the 1-D sample's CI exactly
    y = np.random.default_rng(2).integers(0, 2, size=100).astype(float)
    assert ablation.bootstrap_ci(np.stack([y, y], 1), ablation.sample_mean, seed=3) == \
        ablation.bootstrap_ci(y, ablation.sample_mean, seed=3)
    # and it equals numpy's percentile bootstrap written out
    idx = np.random.default_rng(4).integers(0, 100, size=(300, 100))
    expect = tuple(np.percentile([y[i].mean() for i in idx], [2.5, 97.5]))
    assert ablation.bootstrap_ci(y, ablation.sample_mean, n_boot=300, seed=4) == pytest.approx(expect)


def test_paired_change_and_verdict():
    rng = np.random.default_rng(0)
    correct = (rng.random((80, 4)) < 0.7).astype(float)
    tokens = rng.integers(60, 140, size=(80, 4)).astype(float)
    same = ablation.paired_change((correct, tokens), (correct, tokens), n_boot=200)
    assert same["accuracy"] == {"value": 0.0, "ci": (0.0, 0.0)}
    assert same["tokens_relative"]["value"] == 0.0 and same["tokens_relative"]["ci"] == (0.0, 0.0)
    # the "after" model: half the tokens, the same accuracy, and with 8 samples (seeds pooled) vs 4
    after = (np.concatenate([correct, correct], 1), np.concatenate([tokens, tokens], 1) / 2)
    change = ablation.paired_change(after, (correct, tokens), n_boot=200)
    assert change["accuracy"]["value"] == 0.0 and change["tokens_relative"]["value"] == pytest.approx(-0.5)
    assert ablation.paper_verdict(change, "correct")["met"]
    assert not ablation.paper_verdict(change, "incorrect")["met"]  # no accuracy drop
    worse = ablation.paired_change((np.zeros_like(correct), tokens), (correct, tokens), n_boot=200)
    assert worse["accuracy"]["ci"][1] < 0 and ablation.paper_verdict(worse, "incorrect")["met"]
    assert ablation.paper_verdict(change, "all") is None


def test_summary_table_pools_seeds():
    rng = np.random.default_rng(0)
    recipe = ablation.AblationRecipe(seeds=(0, 1), filters=("correct",), n_boot=100)

    def run(p, mean_tokens):
        return {"greedy": ((rng.random((30, 1)) < p).astype(float), np.full((30, 1), mean_tokens)),
                "sampled": ((rng.random((30, 2)) < p).astype(float), np.full((30, 2), mean_tokens))}

    arrays = {"sft": run(0.5, 120.0), "rlvr": run(0.8, 100.0), "opsd-correct-s0": run(0.8, 50.0),
              "opsd-correct-s1": run(0.8, 60.0), "rlvr_reference_prompt": {"greedy": run(1.0, 40.0)["greedy"]}}
    summary = ablation.summarize(recipe, arrays)
    row = summary["opsd-correct"]["sampled"]
    assert row["mean_tokens"]["value"] == pytest.approx(55.0)
    assert row["mean_tokens"]["per_seed"] == [50.0, 60.0] and row["mean_tokens"]["seed_range"] == [50.0, 60.0]
    assert row["change_vs_rlvr"]["tokens_relative"]["value"] == pytest.approx(-0.45)
    table = ablation.results_table(summary)
    assert "OPSD correct-only" in table and "(seeds 50.0-60.0)" in table and len(table.splitlines()) == 6


def test_arrays_read_the_evaluation_runners_records():
    """(problems x samples) arrays from what ``evaluation.runner.evaluate`` returns per benchmark."""
    from megatron_opsd.evaluation.runner import summarize

    prompts = [{"id": f"p{i}", "gold": "1", "samples": [{"correct": (i + j) % 2 == 0, "tokens": 10 * i + j,
                                                         "truncated": False} for j in range(3)]} for i in range(4)]
    correct, tokens = ablation.benchmark_arrays(summarize(prompts, 3))
    assert correct.shape == tokens.shape == (4, 3)
    assert correct[1].tolist() == [0.0, 1.0, 0.0] and tokens[2].tolist() == [20.0, 21.0, 22.0]


def test_ablation_arguments():
    recipe, run_dir, config_dir = ablation.resolve_ablation(parse("--ablation", "compression", "--quick"))
    assert recipe == ablation.QUICK and run_dir.name == "demo-compression-quick"
    assert (config_dir / "opsd_reference.yaml").is_file()
    assert cli.main(parse("--ablation", "compression", "--seed", "3")) == 2
    assert cli.main(parse("--ablation", "compression", "--filters", "correct,bogus")) == 2
    stages = ablation.ablation_pipeline(ablation.FULL, run_dir, config_dir).stages
    cfgs = cli.stage_config_objects(ablation.ablation_pipeline(ablation.FULL, run_dir, config_dir))
    assert [s.name for s in stages[:3]] == ["sft", "rlvr", "opsd-correct-s0"] and len(stages) == 2 + 3 * 3
    assert all(s.init_from == "rlvr" for s in stages[2:])
    assert {cfgs[s.name].teacher.context for s in stages[2:]} == {"reference"}
    assert {(cfgs[s.name].rollout.filter, cfgs[s.name].rollout.seed) for s in stages[2:]} == \
        {(f, s) for f in ablation.ABLATION_FILTERS for s in (0, 1, 2)}


# ------------------------------------------------------------------------------------------- end to end

def run_quick_ablation(name: str, out) -> dict:
    """`megatron-opsd demo --ablation NAME --quick --out OUT`: exit 0, the printed table is table.md; results.json."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(parse("--ablation", name, "--quick", "--out", str(out))) == 0
    assert (out / "table.md").read_text().strip() in printed.getvalue()
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # several training stages and sidecars: more than pytest.ini's 900 s on a busy machine
def test_quick_ablation_end_to_end(tmp_path):
    """`megatron-opsd demo --ablation compression --quick`: every stage runs (a few steps each), the filters keep
    exactly the rollouts they name, and results.json / table / PNG hold CIs around their values. No effect size
    is asserted: none is robust across seeds at this length (docs/demo_design.md)."""
    out = tmp_path / "abl"
    results = run_quick_ablation("compression", out)
    q = ablation.QUICK
    for filt in q.filters:
        counts = results["filter_counts"][ablation.opsd_stage_name(filt, 0)]
        assert counts["generated"] == 16 * q.opsd_steps
        assert counts["kept"] == (counts["correct"] if filt == "correct" else counts["generated"] - counts["correct"])
        curves = results["curves"][f"{filt}/s0"]
        assert curves["heldout_accuracy"]["steps"] == [q.eval_every]
        for mode in ("greedy", "sampled"):
            m = results["summary"][f"opsd-{filt}"][mode]
            for key in ("accuracy", "mean_tokens", "p90_tokens"):
                lo, hi = m[key]["ci"]
                assert lo <= m[key]["value"] <= hi
    rlvr = results["summary"]["rlvr"]["greedy"]
    assert rlvr["mean_tokens"]["value"] > 0 and results["rlvr_curve"]
    assert len(results["rlvr_curve"]) == q.rlvr_steps
    if results["curves_png"]:
        assert (out / "curves.png").stat().st_size > 10_000
