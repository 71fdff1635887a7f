"""`megatron-opsd demo`: argument errors, the stage pipeline it builds, the evaluation prompts, the report (the
--quick demo end to end is in test_demo_e2e.py)."""
import argparse
import json

import pytest

from megatron_opsd.demo import cli, report
from megatron_opsd.demo.recipe import FULL, QUICK, stage_config_dir


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_resolve_to_runs_name():
    recipe, run_dir, config_dir = cli.resolve(parse())
    assert recipe == FULL and str(run_dir) == "runs/demo" and config_dir == stage_config_dir()
    recipe, run_dir, _ = cli.resolve(parse("--quick", "--filters", "correct,all", "--nproc", "2"))
    assert recipe.filters == ("correct", "all") and recipe.nproc == 2 and str(run_dir) == "runs/demo-quick"
    assert recipe.sft_steps == QUICK.sft_steps
    assert str(cli.resolve(parse("--name", "x1", "--out", "/tmp/elsewhere"))[1]) == "/tmp/elsewhere"


@pytest.mark.parametrize("argv, message", [
    (("--seed", "-1"), "--seed must be >= 0"),
    (("--name", "../up"), "must be a folder name"),
    (("--filters", "all,bogus"), "choose a comma-separated subset of all,correct,incorrect"),
    (("--filters", ","), "choose a comma-separated subset"),
    (("--filters", "all,all"), "names a filter twice"),
    (("--nproc", "3"), "--nproc must be 1 or 2"),
    (("--config-dir", "/nonexistent"), "sft.yaml not found"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(cli.DemoArgumentError, match=message.replace("(", r"\(")):
        cli.resolve(parse(*argv))
    assert cli.main(parse(*argv)) == 2
    assert message in capsys.readouterr().err


def test_stage_configs_load_with_the_demo_overrides():
    from megatron_opsd.config import load_config
    from megatron_opsd.demo.task import CONCISE_INSTRUCTION
    from megatron_opsd.training.sft.config import load_sft_config

    sft = load_sft_config(str(stage_config_dir() / "sft.yaml"), ["model.path=x", "train.steps=7"])
    assert sft.train.steps == 7 and sft.data.global_batch_size % sft.optim.micro_batch_size == 0
    cfg = load_config(str(stage_config_dir() / "opsdc.yaml"), ["rollout.filter=incorrect"])
    assert cfg.teacher.context == "concise" and cfg.teacher.concise_instruction == CONCISE_INSTRUCTION
    assert cfg.loss.divergence == "reverse_kl" and cfg.rollout.filter == "incorrect"


def test_demo_pipeline_branches_every_filter_from_the_sft_stage(tmp_path):
    recipe, _, config_dir = cli.resolve(parse("--filters", "all,incorrect", "--nproc", "2"))
    cfg = cli.demo_pipeline(recipe, tmp_path / "run", config_dir, seed=3)
    assert [s.name for s in cfg.stages] == ["sft", "opsdc-all", "opsdc-incorrect"]
    assert [s.init_from for s in cfg.stages] == [None, "sft", "sft"] and cfg.nproc == 2
    assert cfg.model == str(tmp_path / "run" / "init") and cfg.out_dir == str(tmp_path / "run" / "stages")
    assert cfg.eval.path is None and not any(s.evaluate for s in cfg.stages)  # the demo evaluates itself
    loaded = cli.stage_config_objects(cfg)
    assert loaded["sft"].train.steps == recipe.sft_steps and loaded["sft"].parallel.tensor_model_parallel_size == 2
    opsdc = loaded["opsdc-incorrect"]
    assert opsdc.rollout.filter == "incorrect" and opsdc.train.steps == recipe.opsdc_steps
    assert opsdc.rollout.seed == 3 and opsdc.data.eval_path == str(tmp_path / "run" / "data" / "curve.jsonl")


def test_lora_variant_trains_adapters_in_the_opsdc_stages_only(tmp_path):
    """--lora: the OPSDC stages carry model.lora (frozen teacher = adapters off, adapter-only sync) and its lr,
    the SFT stage stays full fine-tuning; default filter all, own run name; --filters and --quick still apply."""
    from megatron_opsd.demo.recipe import LORA_OVERRIDES

    recipe, run_dir, config_dir = cli.resolve(parse("--lora"))
    assert recipe.filters == ("all",) and recipe.opsdc_overrides == LORA_OVERRIDES and str(run_dir) == "runs/demo-lora"
    assert recipe.opsdc_steps == FULL.opsdc_steps and recipe.sft_steps == FULL.sft_steps
    quick, quick_dir, _ = cli.resolve(parse("--lora", "--quick", "--filters", "correct"))
    assert quick.filters == ("correct",) and quick.opsdc_steps == QUICK.opsdc_steps
    assert str(quick_dir) == "runs/demo-lora-quick" and quick.to_dict()["opsdc_overrides"] == list(LORA_OVERRIDES)
    loaded = cli.stage_config_objects(cli.demo_pipeline(recipe, tmp_path / "run", config_dir, seed=0))
    assert list(loaded) == ["sft", "opsdc-all"] and loaded["sft"].model.lora.rank == 0
    full = cli.stage_config_objects(cli.demo_pipeline(FULL, tmp_path / "run", config_dir, seed=0))["opsdc-all"]
    lora = loaded["opsdc-all"]
    assert (lora.model.lora.rank, lora.model.lora.alpha, lora.model.lora.sync) == (16, 32.0, "adapter")
    assert lora.teacher.weights == "frozen" and lora.optim.lr == 1e-3 > full.optim.lr and full.model.lora.rank == 0
    assert lora.rollout == full.rollout and lora.loss == full.loss and lora.train == full.train


def test_bad_stage_config_fails_before_anything_runs(tmp_path, capsys):
    import shutil

    shutil.copy(stage_config_dir() / "sft.yaml", tmp_path / "sft.yaml")
    (tmp_path / "opsdc.yaml").write_text((stage_config_dir() / "opsdc.yaml").read_text() + "\nbogus:\n  key: 1\n")
    out = tmp_path / "run"
    assert cli.main(parse("--config-dir", str(tmp_path), "--out", str(out))) == 1
    assert "bogus" in capsys.readouterr().err and not out.exists()


def test_concise_evaluation_prompt_is_the_teacher_context():
    """The evaluation's concise prompt template renders exactly the OPSDC teacher's context."""
    from dataclasses import replace

    from megatron_opsd.config import DataConfig
    from megatron_opsd.data.contexts import student_messages
    from megatron_opsd.data.datasets import PromptExample
    from megatron_opsd.demo import task
    from megatron_opsd.demo.evaluate import CONCISE_PROMPT_TEMPLATE

    problem = "Compute 7 + 5 - 3."
    data = replace(DataConfig(), prompt_template=CONCISE_PROMPT_TEMPLATE)
    assert student_messages(PromptExample(id="a", prompt=problem), data) == task.concise_messages(problem)
    assert student_messages(PromptExample(id="a", prompt=problem), DataConfig()) == task.student_messages(problem)


def test_table_verdict_and_curves(tmp_path):
    before = {"label": "SFT", "prompt": "student", "accuracy": 0.80, "mean_tokens": 100.0, "truncated_share": 0.0}
    after = {"label": "OPSDC", "prompt": "student", "accuracy": 0.79, "mean_tokens": 55.0, "truncated_share": 0.0}
    table = report.results_table([before, after])
    assert "| OPSDC | student | 79.0% | 55.0 | -45.0% | -1.0 pts | n/a | n/a | 0.0% |" in table
    v = report.verdict(before, after)
    assert v["met"] and v["token_reduction"] == pytest.approx(0.45)
    assert not report.verdict(before, {**after, "accuracy": 0.77})["met"]  # 3 points worse
    assert not report.verdict(before, {**after, "mean_tokens": 70.0})["met"]  # only 30% shorter
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(m) for m in [
        {"step": 1, "divergence": 0.1, "entropy/student": 0.2, "entropy/teacher": 0.3, "rollout/mean_length": 90,
         "rollout/accuracy": 0.5, "tokens": 12},
        {"step": 2, "divergence": 0.05, "entropy/student": 0.1, "entropy/teacher": 0.2, "rollout/mean_length": 60,
         "rollout/accuracy": 0.6, "eval/accuracy": 0.7, "eval/response_length/mean": 50.0, "tokens": 9},
        {"step": 3, "divergence": 0.0, "entropy/student": 0.0, "entropy/teacher": 0.0, "rollout/mean_length": 40,
         "rollout/accuracy": 1.0}]) + "\n")  # filter=incorrect, all correct: nothing trained, no KL point
    curves = report.read_curves(metrics, {"accuracy": 0.6, "mean_tokens": 95.0})
    assert curves["kl"] == {"steps": [1, 2], "values": [0.1, 0.05]}
    assert curves["heldout_length"] == {"steps": [0, 2], "values": [95.0, 50.0]}
    assert curves["rollout_length"]["steps"] == [1, 2, 3]
    png = report.plot_curves({"all": curves, "correct": curves}, tmp_path / "c.png", "t")
    assert png is None or png.stat().st_size > 1000

