"""No orphans: every process we start dies with its parent (SIGKILL included), and SIGTERM runs the normal
shutdown. Real processes throughout; a run's processes are found by a unique marker in their environment."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest
import yaml

MARKER = "OPSD_TEST_RUN_MARKER"
REPO = Path(__file__).resolve().parents[1]


def marked(marker: str) -> list[psutil.Process]:
    """Live (not zombie) processes whose environment carries ``MARKER=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_gone(marker: str, timeout_s: float, known: list = ()) -> list[str]:
    """The command lines of the marked processes (and of ``known`` ones: vLLM's workers set their process title,
    which hides their environment) still alive after ``timeout_s``; empty when all are gone."""
    deadline = time.monotonic() + timeout_s
    while (left := marked(marker) + [p for p in known if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [_describe(p) for p in left]


def _describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid} ppid {proc.ppid()}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid} (gone)"


def wait_for(predicate, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout_s:.0f} s")
        time.sleep(0.2)


class MarkedRun:
    """``cmd`` started in a fresh session (its own process group, as a batch scheduler's job step would be) with
    a unique marker in its environment; on exit every process still carrying the marker is SIGKILLed, so a
    failing test never leaks processes itself."""

    def __init__(self, cmd: list, tmp_path: Path, **env):
        self.marker = uuid.uuid4().hex
        env = {**os.environ, MARKER: self.marker, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", **env}
        self.proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)

    def __enter__(self) -> "MarkedRun":
        return self

    def __exit__(self, *exc) -> None:
        for proc in marked(self.marker):
            proc.kill()
        self.proc.kill()
        self.proc.wait()

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.poll() is not None else ""


# A parent that starts a sleeping child through lifecycle.start_process (from a thread that then exits, when
# asked: PR_SET_PDEATHSIG would fire at that thread's exit, so that child must be supervised instead).
PARENT = textwrap.dedent("""
    import sys, threading, time
    from megatron_opsd.lifecycle import start_process
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    if sys.argv[1] == "thread":  # the thread outlives the child's set-up, then exits
        t = threading.Thread(target=lambda: (start_process(sleeper), time.sleep(1.5))); t.start(); t.join()
    else:
        start_process(sleeper)
    print("started", flush=True)
    time.sleep(600)
""")


@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_child_dies_with_sigkilled_parent(tmp_path, started_from):
    with MarkedRun([sys.executable, "-c", PARENT, started_from], tmp_path) as run:
        wait_for(lambda: any("time.sleep(600)" in " ".join(p.cmdline()) for p in marked(run.marker)
                             if p.pid != run.proc.pid), 30, "child", run.proc)
        time.sleep(2.5)  # the starting thread is gone by now: the child must have survived it
        assert len(marked(run.marker)) >= 2
        run.proc.kill()
        run.proc.wait()
        assert wait_gone(run.marker, 5.0) == []


# A "rank" (started by someone else, like torch's spawn) guards its group, then a library starts a helper process
# behind our back (like megatron's checkpoint-writer manager): SIGKILL of the rank must take the helper along.
RANK = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_opsd.lifecycle import guard_process_group
    guard_process_group()
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(helper.pid, flush=True)
    time.sleep(600)
""")


def test_guarded_group_dies_with_its_sigkilled_leader(tmp_path):
    launcher = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {RANK!r}]); time.sleep(600)"
    with MarkedRun([sys.executable, "-c", launcher], tmp_path) as run:
        wait_for(lambda: len(marked(run.marker)) >= 4, 30, "rank, guard and helper", run.proc)
        rank = next(p for p in marked(run.marker) if p.ppid() == run.proc.pid)
        time.sleep(1.0)  # the guard has set PDEATHSIG
        rank.kill()
        deadline = time.monotonic() + 5.0
        while len(marked(run.marker)) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [p.pid for p in marked(run.marker)] == [run.proc.pid], [_describe(p) for p in marked(run.marker)]


def test_wrapper_refuses_a_parent_that_is_already_gone(tmp_path):
    """The re-check after prctl: the parent died between fork and prctl, so the kernel will not signal us."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "megatron_opsd.lifecycle", "--parent-pid", "1", "--",
                           sys.executable, "-c", "import time; time.sleep(600)"], cwd=REPO, timeout=60,
                          process_group=0)
    assert proc.returncode == -signal.SIGKILL and time.monotonic() - start < 30  # it killed its group: itself
    # and it never kills a group that is neither its own nor its parent's (here: pytest's)
    proc = subprocess.run([sys.executable, "-m", "megatron_opsd.lifecycle", "--parent-pid", "1", "--", "true"],
                          cwd=REPO, timeout=60, capture_output=True, text=True)
    assert proc.returncode == 2 and "refusing to kill someone else's group" in proc.stderr


# SIGTERM to a CLI-like parent: its handler raises SystemExit, the finally block stops the child (whose own
# handler runs its finally), and a grandchild that ignores SIGTERM (like a stuck worker) is reaped with its group.
GRACEFUL_PARENT = textwrap.dedent("""
    import sys, time
    from megatron_opsd.lifecycle import install_shutdown_handlers, start_process, stop_process
    child_code = '''
    import subprocess, sys, time
    from megatron_opsd.lifecycle import install_shutdown_handlers
    install_shutdown_handlers()
    subprocess.Popen([sys.executable, "-c",
                      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    try:
        time.sleep(600)
    finally:
        open("child_clean", "w").close()
    '''
    install_shutdown_handlers()
    child = start_process([sys.executable, "-c", child_code])
    print("started", flush=True)
    try:
        time.sleep(600)
    finally:
        stop_process(child, grace_s=5.0)
        open("parent_clean", "w").close()
""")


def test_sigterm_runs_the_normal_shutdown_and_reaps_the_group(tmp_path):
    with MarkedRun([sys.executable, "-c", GRACEFUL_PARENT], tmp_path) as run:
        # parent, guard, child and grandchild: the child starts the grandchild only after installing its handler
        # (waiting for three and sleeping 1 s raced a child still importing on a busy machine)
        wait_for(lambda: len(marked(run.marker)) >= 4, 60, "guard, child and grandchild", run.proc)
        run.proc.send_signal(signal.SIGTERM)
        assert run.proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert "SIGTERM received: shutting down" in run.output()
        assert (tmp_path / "child_clean").exists() and (tmp_path / "parent_clean").exists()
        assert wait_gone(run.marker, 5.0) == []


# ------------------------------------------------------------------------------------------ real runs
@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_train_with_local_sidecar_leaves_no_process(tiny_checkpoints, tmp_path, sig):
    """`megatron-opsd train --nproc 1` (launcher rank + local vLLM sidecar): signal the CLI after its first step."""
    from tests.test_trainer_e2e import tiny_run_config

    config = tiny_run_config(tmp_path, tiny_checkpoints["qwen3"], parallel={"tensor_model_parallel_size": 1},
                             train={"steps": 10_000, "eval_every": 0},
                             checkpoint={"save_every": 1})
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_opsd.cli", "train", "--config", str(config), "--nproc", "1"]
    with MarkedRun(cmd, tmp_path) as run:
        latest = run_dir / "checkpoints" / "latest"
        wait_for(latest.exists, 600, "first checkpoint", run.proc)
        roles = {" ".join(p.cmdline()) for p in marked(run.marker)}
        assert any("sidecar" in c for c in roles) and any("multiprocessing" in c for c in roles), roles
        tree = psutil.Process(run.proc.pid).children(recursive=True)
        run.proc.send_signal(sig)
        if sig == signal.SIGTERM:
            assert run.proc.wait(timeout=60) == 128 + signal.SIGTERM
            assert "SIGTERM received: shutting down" in run.output()
            assert "Application shutdown complete" in (run_dir / "sidecar.log").read_text()  # a clean server stop
        assert not (left := wait_gone(run.marker, 30.0, tree)), "\n".join(left)
    # `latest` still names a complete checkpoint (saves are atomic; the shutdown writes nothing half-way)
    assert (run_dir / "checkpoints" / latest.read_text().strip()).is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_pipeline_leaves_no_process(tiny_checkpoints, tmp_path, sig):
    """`megatron-opsd pipeline` -> an sft stage process -> its launcher rank; signal the pipeline mid-stage.
    No vLLM here: the sidecar's part of the chain is the train test's."""
    rows = [{"prompt": f"What is {a} + {b}?", "response": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1), (2, 7)]]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "data": {"train_path": str(tmp_path / "pairs.jsonl"), "global_batch_size": 2, "max_seq_len": 64},
        "optim": {"micro_batch_size": 2}, "train": {"steps": 10_000},
        "logging": {"progress": False, "tensorboard": False}}))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({
        "name": "orphans", "model": tiny_checkpoints["qwen3"], "out_dir": str(tmp_path / "out"), "nproc": 1,
        "eval": {"path": None, "baseline": False},
        "stages": [{"name": "sft", "kind": "sft", "config": str(tmp_path / "sft.yaml")}]}))
    cmd = [sys.executable, "-m", "megatron_opsd.cli", "pipeline", "--config", str(tmp_path / "pipeline.yaml")]
    with MarkedRun(cmd, tmp_path) as run:
        # The stage's rank has initialised torch.distributed and is building the trainer (saves config.yaml).
        wait_for((tmp_path / "out" / "sft" / "config.yaml").is_file, 600, "the stage's trainer", run.proc)
        assert len(marked(run.marker)) >= 3  # pipeline, stage CLI, rank
        tree = psutil.Process(run.proc.pid).children(recursive=True)
        run.proc.send_signal(sig)
        if sig == signal.SIGTERM:
            assert run.proc.wait(timeout=60) == 128 + signal.SIGTERM
            out = run.output()
            assert out.count("SIGTERM received: shutting down") >= 2, out[-3000:]  # pipeline, then its stage
        assert not (left := wait_gone(run.marker, 30.0, tree)), "\n".join(left)
