"""Config, input and layout errors through the real console command: one line on stderr
(`megatron-opsd: error: <field>: ...`), exit status 2, no traceback, no `[rankN]:` prefix; said once per job
(only rank 0 of a torchrun/srun job prints it, a `--nproc` worker's error comes back to the launcher as itself);
`--debug` / OPSD_DEBUG=1 bring the traceback back."""
import os
import subprocess
import sys

import pytest

from megatron_opsd.errors import UsageError
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    """A tiny 4-head Qwen3 and a two-prompt train.jsonl."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("cli_errors")
    model = make_tiny_hf_checkpoint(root / "model", family="qwen3", num_heads=4, num_kv_heads=2)
    data = root / "train.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?", "answer": "4"}\n')
    return root, model, data


def run_train(root, *argv, **env):
    return subprocess.run([sys.executable, "-m", "megatron_opsd.cli", "train", *argv], capture_output=True, text=True,
                          cwd=root, env={**os.environ, "OPSD_DEBUG": "", **env}, timeout=300)


CASES = {
    "loss.divergence=rkl": "loss.divergence: 'rkl' is not one of ['reverse_kl', 'forward_kl', 'jsd'",
    "bogus.key=1": "unknown config key 'bogus.key'; valid keys at the top level",
    "rollout.n=0": "rollout.n must be >= 1, got 0",
    "optim.lr=abc": "optim.lr: expected a number, got 'abc'",
    "model.path=missing-dir": "model.path: 'missing-dir' does not exist; give an HF checkpoint directory",
    "parallel.tensor_model_parallel_size=3": "parallel.tensor_model_parallel_size: num_attention_heads (4) is not "
                                             "divisible by tensor_model_parallel_size (3)",
}


@pytest.mark.parametrize("override", list(CASES))
def test_one_line_exit_2(train_inputs, override):
    root, model, data = train_inputs
    nproc = ["--nproc", "3"] if override.startswith("parallel.") else []  # 3 ranks, 4 heads: a layout error
    out = run_train(root, f"model.path={model}", f"data.train_path={data}", override, *nproc)
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"megatron-opsd: error: {out.stderr.split('error: ', 1)[-1]}"  # nothing before the line
    assert out.stderr.count("\n") == 1 and CASES[override] in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout and "[rank" not in out.stderr


def test_debug_shows_the_traceback(train_inputs):
    root, model, data = train_inputs
    for argv, env in ((["--debug"], {}), ([], {"OPSD_DEBUG": "1"})):
        out = run_train(root, f"model.path={model}", "rollout.n=0", *argv, **env)
        assert out.returncode == 1 and "Traceback" in out.stderr, out.stderr
        assert "megatron_opsd.config.ConfigError: rollout.n must be >= 1, got 0" in out.stderr


def test_only_rank_0_prints(train_inputs):
    """Under torchrun/srun every rank runs the command and hits the same error; ranks other than 0 stay quiet."""
    root, model, data = train_inputs
    quiet = run_train(root, f"model.path={model}", "loss.divergence=rkl", RANK="1")
    assert quiet.returncode == 2 and quiet.stderr == "" and quiet.stdout == ""
    loud = run_train(root, f"model.path={model}", "loss.divergence=rkl", RANK="0")
    assert loud.returncode == 2 and loud.stderr.startswith("megatron-opsd: error: loss.divergence:")


def test_refuses_to_overwrite_a_checkpointed_run(train_inputs):
    """`checkpoint.resume=false` over a run directory holding a checkpoint: one line naming the way out, before
    any rank starts (resuming is the default; training/rundir.py)."""
    root, model, data = train_inputs
    step = root / "kept" / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / "opsd_checkpoint.json").write_text("{}")  # the marker of a complete checkpoint
    out = run_train(root, f"model.path={model}", f"data.train_path={data}", f"logging.dir={root / 'kept'}",
                    "checkpoint.resume=false")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "checkpoint.resume: false, but" in out.stderr and "holds step-3 of an earlier run" in out.stderr
    assert "choose a new logging.dir" in out.stderr
    assert sorted(p.name for p in step.iterdir()) == ["opsd_checkpoint.json"]  # untouched


def fail_with_usage_error() -> None:
    raise UsageError("data.train_path: bad rows")


@pytest.mark.slow  # two spawned ranks with megatron: ~30 s alone, minutes on a loaded machine
def test_worker_usage_error_comes_back_as_itself():
    """A UsageError raised on the spawned ranks reaches the launcher as that error (the CLI prints it once),
    not as a DistributedError with one traceback per rank."""
    with pytest.raises(UsageError, match=r"^data.train_path: bad rows$"):
        run_distributed(fail_with_usage_error, 2, ParallelConfig())
