"""Trainer operations: resume equals an uninterrupted run; the `correct` filter trains on nothing when no
rollout is correct; bad config keys are errors naming the key."""
import json

import pytest

from megatron_opsd.config import ConfigError, load_config
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.cli import run_trainer
from tests.test_trainer_e2e import tiny_run_config

pytestmark = pytest.mark.vllm


def run(config_path, *overrides):
    cfg = load_config(str(config_path), list(overrides))
    run_distributed(run_trainer, 1, cfg.parallel, cfg)
    with open(f"{cfg.logging.dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_checkpoints, tmp_path):
    """A run cut after step 1 and resumed (checkpoint, sampler position, resumed weights pushed to the new
    sidecar) logs exactly the losses, divergences, rollout lengths and grad norms of an uninterrupted run."""
    config = tiny_run_config(tmp_path, tiny_checkpoints["qwen3"], parallel={"tensor_model_parallel_size": 1},
                             train={"steps": 3}, checkpoint={"save_every": 1})
    full = run(config, f"logging.dir={tmp_path / 'full'}")
    run(config, f"logging.dir={tmp_path / 'cut'}", "train.steps=1")
    resumed = run(config, f"logging.dir={tmp_path / 'cut'}", "checkpoint.resume=true")
    assert [m["step"] for m in resumed] == [1, 2, 3]  # metrics.jsonl is appended to across the restart
    for key in ("loss", "divergence", "rollout/mean_length", "grad_norm"):
        assert [m[key] for m in resumed[1:]] == [m[key] for m in full[1:]], key


def test_correct_filter_with_no_correct_rollout_trains_nothing(tiny_checkpoints, tmp_path):
    """With rollout.filter=correct and a reward that is never correct, a real trainer step distils on nothing:
    loss 0, no gradient norm, no tokens; the filter's unit tests do not run the step around it."""
    config = tiny_run_config(tmp_path, tiny_checkpoints["qwen3"], parallel={"tensor_model_parallel_size": 1},
                             train={"steps": 1}, rollout={"filter": "correct"},
                             reward={"kind": "callable", "callable": "tests._rewards:never_correct"})
    (metrics,) = run(config)
    assert metrics["rollout/accuracy"] == 0.0 and metrics["rollout/fraction_filtered"] == 1.0
    assert metrics["loss"] == 0.0 and "grad_norm" not in metrics and "tokens" not in metrics


def test_bad_config_key_names_it(tmp_path):
    """Config only, no sidecar despite the module's vllm mark: a misspelt key or an unknown filter value is a
    ConfigError naming the key."""
    with pytest.raises(ConfigError, match="loss.kindd"):
        load_config(None, ["loss.kindd=jsd"])
    with pytest.raises(ConfigError, match="rollout.filter"):
        load_config(None, ["rollout.filter=best"])
