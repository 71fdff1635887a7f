"""Evaluation reporting without a model: baseline comparison numbers (overall and per MATH level) on two
hand-built result sets, the written JSON / Markdown / PNG, and the errors of `megatron-opsd eval` on bad
input (all raised before any model or sidecar is started)."""
import json
from pathlib import Path

import pytest

from megatron_opsd.cli import main as cli_main
from megatron_opsd.evaluation.report import compare_to_baseline, write_report
from megatron_opsd.evaluation.runner import (EvalSettings, default_data_dir, packaged_data_dir, resolve_benchmarks,
                                            summarize)

N = 4
SCALE = {1: 0.4, 2: 0.5, 3: 0.6, 4: 0.8, 5: 0.9}  # model tokens / baseline tokens, per MATH level


def _prompt(pid, level, tokens, correct):
    return {"id": pid, "gold": "1", "prompt_tokens": 10, "level": level, "subject": "Algebra",
            "samples": [{"index": j, "tokens": t, "finish_reason": "length" if t >= 1000 else "stop",
                         "truncated": t >= 1000, "answer": None, "correct": c}
                        for j, (t, c) in enumerate(zip(tokens, correct))]}


def _runs():
    """Baseline and model on 10 shared prompts (2 per level) plus one prompt only the model has."""
    base, model = [], []
    for level in SCALE:
        for k in range(2):
            pid = f"test/{level}/{k}.json"
            tokens = [100 * level + 10 * k + 20 * j for j in range(N)]
            base.append(_prompt(pid, level, tokens, [j < 2 for j in range(N)]))  # 50% correct
            model.append(_prompt(pid, level, [t * SCALE[level] for t in tokens],
                                 [j < 1 + (level % 3) for j in range(N)]))
    model.append(_prompt("extra", 1, [5] * N, [True] * N))
    wrap = lambda prompts: {"model": "m", "settings": {"n": N}, "benchmarks": {"math500": summarize(prompts, N)}}  # noqa: E731
    return wrap(model), wrap(base), model, base


def test_summary_numbers():
    model, _, prompts, _ = _runs()
    b = model["benchmarks"]["math500"]
    samples = [s for p in prompts for s in p["samples"]]
    assert b["num_prompts"] == 11 and b["num_samples"] == 44
    assert b["accuracy"] == pytest.approx(sum(s["correct"] for s in samples) / 44)
    assert b["tokens"]["mean"] == pytest.approx(sum(s["tokens"] for s in samples) / 44)
    assert b["tokens"]["truncated_share"] == 0.0
    assert set(b["pass_at_k"]) == {"1", "2", "4"} and b["pass_at_k"]["1"] == pytest.approx(b["accuracy"])
    assert b["pass_at_k"]["4"] == pytest.approx(1.0)  # every prompt has at least one correct sample
    lvl5 = b["by"]["level"]["5"]
    assert lvl5["num_prompts"] == 2 and lvl5["accuracy"] == pytest.approx(3 / 4)  # 1 + 5 % 3 = 3 of 4
    assert list(b["by"]["subject"]) == ["Algebra"]


def test_baseline_comparison_by_level(tmp_path):
    model, base, mp, bp = _runs()
    comp = compare_to_baseline(model, base, n_boot=500, seed=1)["math500"]
    assert comp["num_prompts"] == 10 and comp["unpaired_prompts"] == 1  # "extra" is not in the baseline
    mine = [s for p in mp[:10] for s in p["samples"]]
    theirs = [s for p in bp for s in p["samples"]]
    expected = 1 - sum(s["tokens"] for s in mine) / sum(s["tokens"] for s in theirs)
    assert comp["compression"]["value"] == pytest.approx(expected)
    lo, hi = comp["compression"]["ci"]
    assert lo <= expected <= hi and hi - lo > 0.01  # levels differ, so resampling prompts moves it
    delta = (sum(s["correct"] for s in mine) - sum(s["correct"] for s in theirs)) / 40
    assert comp["accuracy_delta"]["value"] == pytest.approx(delta)
    assert comp["accuracy_delta"]["ci"][0] <= delta <= comp["accuracy_delta"]["ci"][1]
    assert set(comp["by_level"]) == {"1", "2", "3", "4", "5"}
    for level, scale in SCALE.items():
        e = comp["by_level"][str(level)]
        assert e["num_prompts"] == 2
        assert e["compression"]["value"] == pytest.approx(1 - scale)
        assert e["compression"]["ci"] == pytest.approx([1 - scale, 1 - scale])  # same scale for every prompt
        assert e["accuracy_delta"]["value"] == pytest.approx((1 + level % 3) / N - 0.5)
    # the "compresses easy problems more" reading: level 1 compressed most, level 5 least
    assert comp["by_level"]["1"]["compression"]["value"] > comp["by_level"]["5"]["compression"]["value"]

    paths = write_report(model, tmp_path / "out", baseline=base, n_boot=500, seed=1)
    saved = json.loads(paths["json"].read_text())
    assert saved["baseline_comparison"]["math500"]["compression"]["value"] == pytest.approx(expected)
    md = paths["markdown"].read_text()
    assert f"| math500 | all | 10 |" in md and f"| {100 * expected:.1f} [" in md
    assert "| math500 | 1 | 2 |" in md and "| 60.0 [60.0, 60.0] |" in md  # level 1: 1 - 0.4
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_baseline_without_shared_prompts():
    model, base, _, _ = _runs()
    base["benchmarks"]["math500"]["prompts"] = [dict(p, id="other-" + p["id"])
                                                for p in base["benchmarks"]["math500"]["prompts"]]
    with pytest.raises(ValueError, match="no prompt id in common"):
        compare_to_baseline(model, base)
    with pytest.raises(ValueError, match="baseline has none of the benchmarks"):
        compare_to_baseline(model, {"benchmarks": {"aime24": {}}})


def test_builtin_benchmarks_resolve(monkeypatch, tmp_path):
    """The packaged copies (inside the installed package, whatever the checkout's location), with their row
    counts; OPSD_DATA_DIR and --data-dir read another copy; a missing file there names the path."""
    import megatron_opsd

    monkeypatch.delenv("OPSD_DATA_DIR", raising=False)
    paths = resolve_benchmarks("math500, aime24,amc23")
    assert list(paths) == ["math500", "aime24", "amc23"]
    assert default_data_dir() == packaged_data_dir()
    assert packaged_data_dir().is_relative_to(Path(megatron_opsd.__file__).parent)
    assert [sum(1 for _ in p.open()) for p in paths.values()] == [500, 30, 40]
    (tmp_path / "aime24").mkdir()
    (tmp_path / "aime24" / "test.jsonl").write_text('{"id": 1, "problem": "p", "answer": "3"}\n')
    monkeypatch.setenv("OPSD_DATA_DIR", str(tmp_path))
    assert resolve_benchmarks("aime24") == {"aime24": tmp_path / "aime24" / "test.jsonl"}
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'math500' / 'test.jsonl'} does not exist "
                                                f"\\(data directory from OPSD_DATA_DIR={tmp_path}\\)"):
        resolve_benchmarks("math500")
    assert resolve_benchmarks("math500", packaged_data_dir())["math500"] == paths["math500"]


def _eval(capsys, *argv):
    rc = cli_main(["eval", "--model", "/nonexistent-model", "--no-progress", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--benchmarks", "math5000"], "unknown benchmark 'math5000'; choose from ['aime24', 'amc23', 'math500']"),
    (["--benchmarks", "/nonexistent/dir/extra.jsonl"], "benchmark file '/nonexistent/dir/extra.jsonl' does not exist"),
    (["--benchmarks", "math500", "--data-dir", "/nonexistent"], "/nonexistent/math500/test.jsonl does not exist (data "
                                                                "directory from --data-dir /nonexistent)"),
    (["--benchmarks", ""], "benchmarks: empty"),
    (["--benchmarks", "math500", "--n", "0"], "n: 0 samples per prompt; must be >= 1"),
    (["--benchmarks", "math500", "--baseline", "/nonexistent/results.json"], "--baseline '/nonexistent/results.json' "
                                                                            "does not exist"),
    (["--benchmarks", "math500", "--limit", "1"], "--model '/nonexistent-model' is not a directory"),
])
def test_bad_input_errors(capsys, argv, message):
    rc, err = _eval(capsys, *argv)
    assert rc == 2 and message in err, err


def test_bad_files(capsys, tmp_path):
    no_problem = tmp_path / "no_problem.jsonl"
    no_problem.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    rc, err = _eval(capsys, "--benchmarks", str(no_problem))
    assert rc == 2 and "row 0 has no 'problem' (data.prompt_field); available fields: ['answer', 'question']" in err

    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2?"}) + "\n")
    rc, err = _eval(capsys, "--benchmarks", str(no_answer))
    assert rc == 2 and "1 row(s) have no 'answer' field (data.answer_field), e.g. row 1" in err

    bad_baseline = tmp_path / "baseline.json"
    bad_baseline.write_text(json.dumps({"accuracy": 0.5}))
    rc, err = _eval(capsys, "--benchmarks", "amc23", "--baseline", str(bad_baseline))
    assert rc == 2 and "has no 'benchmarks' object" in err

    ckpt = tmp_path / "step-10"
    ckpt.mkdir()
    (ckpt / "opsd_checkpoint.json").write_text("{}")
    rc = cli_main(["eval", "--model", str(ckpt), "--benchmarks", "amc23"])
    err = capsys.readouterr().err
    assert rc == 2 and "no complete step-N checkpoint there" in err  # a marker alone is no checkpoint
    rc = cli_main(["eval", "--model", str(tmp_path), "--benchmarks", "amc23"])
    err = capsys.readouterr().err
    assert rc == 2 and "has no config.json and is no training checkpoint" in err


def test_settings_validation():
    with pytest.raises(ValueError, match=r"top_p: 1.5; must be in \(0, 1\]"):
        EvalSettings(top_p=1.5)
    with pytest.raises(ValueError, match="max_tokens: 0"):
        EvalSettings(max_tokens=0)
