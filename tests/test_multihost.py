"""Multi-node for real on one machine (issue 27): three hosts as Linux network namespaces on a bridge, each with
its own address (10.77.0.1-3/24, nothing else reachable), the launch scripts used as a user would.

Host a and host b each run ``examples/launch/torchrun_multinode.sh megatron-opsd train`` (one rank per host,
TP=2 spanning them, c10d rendezvous at a's address); host c runs a ``megatron-opsd sidecar`` started as
``examples/launch/opsd.sbatch`` starts one (``env CUDA_VISIBLE_DEVICES= TORCH_NCCL_ASYNC_ERROR_HANDLING=2
megatron-opsd sidecar --host <its address>``, the secret in the environment, ``curl /health`` until it answers),
reached by its address; weights go from a to c over the collective (gloo) transport.

The module runs in file order, one sidecar per phase (a sidecar whose version moved on cannot serve a run from
step 0, and the third fault kills it):
1. faults in step 1 (no push yet, the sidecar stays at version 0): host b's ranks killed, then host b's link
   down, each while rank 0 grades step 1's rollouts (``tests._rewards.pause_at_call``);
2. the two-host run: steps 1 and 2 complete (checkpoints, pushes v1 and v2 applied: greedy on the sidecar equals
   transformers on the step-2 checkpoint), then the sidecar's host dies during step 3's push;
3. a fresh sidecar; the two-host checkpoint of step 1 resumes on one host (a, both ranks): its step 2 equals the
   two-host step 2 to the last digit, and it finishes (step 3, pushed to c, greedy equal to its export).
Every fault ends within its stated bound with an error line on each surviving host and nothing left in a or b
(but for the torchrun agent of a host whose link is down, which the test ends: docs/scale.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests._rewards import PAUSE_AT_CALL_ENV, PAUSE_DIR_ENV
from tests.test_rollout_sidecar import hf_greedy
from tests.test_trainer_e2e import tiny_run_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = ROOT / "examples" / "launch" / "torchrun_multinode.sh"
VENV_BIN = str(Path(sys.executable).parent)
PREFIX = f"opsd{os.getpid() % 100000}"  # namespace names: unique per test process
ADDRESS = {"a": "10.77.0.1", "b": "10.77.0.2", "c": "10.77.0.3"}
SIDECAR_PORT, RDZV_PORT = 8000, 29400
PROMPTS, MAX_TOKENS = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [100, 12]], 8
SECRET = "multihost-test-secret-0123456789"
# The fault bound: parallel.timeout_minutes / control_timeout_minutes below are 0.25 / 0.3 min (15 s / 18 s), a
# rendezvous store call and its close after a failure at most 10 s each (RDZV_READ_TIMEOUT / RDZV_CLOSE_TIMEOUT);
# every surviving host's launcher must exit within FAULT_BOUND_S of the fault.
FAULT_BOUND_S = 60


def ns(host: str) -> str:
    return f"{PREFIX}{host}"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=check)


def pids_in(host: str) -> list[int]:
    out = sh("ip", "netns", "pids", ns(host), check=False).stdout.split()
    return [int(p) for p in out]


def kill_host(host: str) -> None:
    """SIGKILL every process in the host's namespace (a host dying), until none is left."""
    for _ in range(50):
        pids = pids_in(host)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes left in {ns(host)}: {pids_in(host)}")


def delete_hosts() -> None:
    for host in ("a", "b", "c", "sw"):
        if ns(host) in sh("ip", "netns", "list", check=False).stdout:
            kill_host(host)
            sh("ip", "netns", "del", ns(host), check=False)


def create_hosts() -> None:
    """Namespaces a, b, c, each with loopback and eth0 (10.77.0.x/24) on a bridge in a fourth namespace ``sw``;
    the root namespace is not touched."""
    sw = ns("sw")
    for cmd in (["ip", "netns", "add", sw], ["ip", "-n", sw, "link", "set", "lo", "up"],
                ["ip", "-n", sw, "link", "add", "br0", "type", "bridge"], ["ip", "-n", sw, "link", "set", "br0", "up"]):
        sh(*cmd)
    for host, address in ADDRESS.items():
        for cmd in (["ip", "netns", "add", ns(host)], ["ip", "-n", ns(host), "link", "set", "lo", "up"],
                    ["ip", "-n", sw, "link", "add", f"p{host}", "type", "veth", "peer", "name", "eth0", "netns",
                     ns(host)],
                    ["ip", "-n", sw, "link", "set", f"p{host}", "master", "br0", "up"],
                    ["ip", "-n", ns(host), "addr", "add", f"{address}/24", "dev", "eth0"],
                    ["ip", "-n", ns(host), "link", "set", "eth0", "up"]):
            sh(*cmd)


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (`apt-get install -y iproute2`) to create network namespaces"
    probe = f"{PREFIX}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    return None if made.returncode == 0 else f"`ip netns add` fails here: {made.stderr.strip()}"


@pytest.fixture(scope="module")
def hosts():
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    delete_hosts()
    try:
        create_hosts()
        yield
    finally:  # also on failure or timeout: nothing of ours outlives the module
        delete_hosts()


def env(**extra) -> dict:
    out = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT), OPSD_SIDECAR_SECRET=SECRET)
    out.pop("OPSD_SIDECAR_SECRET_FILE", None)
    out.update({k: str(v) for k, v in extra.items()})
    return out


def spawn(host: str, cmd: list, log: Path, **extra) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(["ip", "netns", "exec", ns(host), *cmd], stdout=out, stderr=subprocess.STDOUT,
                                env=env(**extra), cwd=ROOT, start_new_session=True)


def curl(host: str, url: str, body: dict | None = None, timeout_s: float = 60) -> dict | None:
    """An HTTP call from ``host`` (the test process itself sits outside every namespace); the secret in a header
    file, never on a command line."""
    headers = Path(f"/tmp/{PREFIX}-headers")
    headers.write_text(f"Authorization: Bearer {SECRET}\nContent-Type: application/json\n")
    headers.chmod(0o600)
    cmd = ["ip", "netns", "exec", ns(host), "curl", "-sf", "--max-time", str(timeout_s), "-H", f"@{headers}", url]
    if body is not None:
        cmd += ["-d", json.dumps(body)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s + 10)
    return json.loads(proc.stdout) if proc.returncode == 0 else None


SIDECAR_URL = f"http://{ADDRESS['c']}:{SIDECAR_PORT}"


def start_sidecar(model_dir: str, log: Path, timeout_s: float = 600) -> subprocess.Popen:
    """``megatron-opsd sidecar`` on host c as opsd.sbatch starts it, then /health polled from host a as the script
    polls it (it gives up when the sidecar exits first)."""
    proc = spawn("c", ["env", "CUDA_VISIBLE_DEVICES=", "TORCH_NCCL_ASYNC_ERROR_HANDLING=2", "megatron-opsd", "sidecar",
                       "--model", model_dir, "--tensor-parallel-size", "1", "--host", ADDRESS["c"],
                       "--port", str(SIDECAR_PORT), "--dtype", "float32", "--max-model-len", "256",
                       "--kv-cache-memory-bytes", str(128 << 20)], log)
    deadline = time.monotonic() + timeout_s
    while curl("a", f"{SIDECAR_URL}/health", timeout_s=5) is None:
        assert proc.poll() is None, f"sidecar exited before it was healthy:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"sidecar not healthy after {timeout_s} s"
        time.sleep(1)
    return proc


def sidecar_greedy(host: str = "a") -> list[list[int]]:
    out = curl(host, f"{SIDECAR_URL}/generate", dict(prompts=PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS,
                                                     ignore_eos=True))
    return [samples[0]["token_ids"] for samples in out["results"]]


def hf_greedy_of(model_dir: str, state: dict) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return [hf_greedy(model, prompt, MAX_TOKENS, state) for prompt in PROMPTS]


def run_config(tmp_path: Path, model_dir: str, **sections) -> Path:
    base = dict(rollout={"sidecar_urls": [SIDECAR_URL], "transport": "collective", "sync_timeout_s": 5.0,
                         "push_retries": 0},
                parallel={"tensor_model_parallel_size": 2, "timeout_minutes": 0.25, "control_timeout_minutes": 0.3},
                train={"steps": 3, "eval_every": 0}, checkpoint={"save_every": 1},
                logging={"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False})
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return tiny_run_config(tmp_path, model_dir, **base)


class Trainer:
    """``torchrun_multinode.sh megatron-opsd train --config CONFIG`` on each of ``hosts``, one rank per host (or
    NPROC_PER_NODE ranks on a lone host)."""

    def __init__(self, config: Path, hosts: tuple, tag: str, nproc: int = 1, **extra):
        self.logs = {h: config.parent / f"{tag}-{h}.out" for h in hosts}
        self.procs = {h: spawn(h, ["bash", str(TORCHRUN), "megatron-opsd", "train", "--config", str(config)],
                               self.logs[h], NNODES=len(hosts), NODE_RANK=i, NPROC_PER_NODE=nproc,
                               RDZV_HOST=ADDRESS[hosts[0]], RDZV_PORT=RDZV_PORT, RDZV_ID=f"{PREFIX}{tag}",
                               RDZV_TIMEOUT=120, RDZV_READ_TIMEOUT=10, RDZV_CLOSE_TIMEOUT=10, LOG_DIR=config.parent / f"{tag}-logs", **extra)
                      for i, h in enumerate(hosts)}

    def wait(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        try:
            return {h: p.wait(timeout=max(1.0, deadline - time.monotonic())) for h, p in self.procs.items()}
        except subprocess.TimeoutExpired:
            raise AssertionError(f"trainer still running after {timeout_s} s:\n{self.tails()}") from None

    def output(self, host: str) -> str:
        return self.logs[host].read_text(errors="replace")

    def tails(self) -> str:
        return "\n".join(f"--- {h}\n{self.output(h)[-3000:]}" for h in self.logs)


def wait_for(path: Path, trainer: Trainer, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert all(p.poll() is None for p in trainer.procs.values()), f"a host's trainer exited:\n{trainer.tails()}"
        assert time.monotonic() < deadline, f"{path} not written within {timeout_s} s:\n{trainer.tails()}"
        time.sleep(0.2)


def error_lines(text: str) -> list[str]:
    """The rank's own error line(s): ``[default0]:SomeError: ...`` as torchrun tees them."""
    return [line for line in text.splitlines() if "Error: " in line and line.startswith("[default")]


def assert_fault_ends(trainer: Trainer, survivors: tuple, start: float, cause: str, cut_off: tuple = ()) -> None:
    """Every surviving host prints an error line matching ``cause`` and its launcher exits non-zero within
    FAULT_BOUND_S of the fault; then nothing is left running on the trainer hosts. A host in ``cut_off`` (its
    link down) prints its rank's error line in the bound, but its torchrun agent stays behind, still trying to
    close the rendezvous in node 0's store that it cannot reach (torchrun's, docs/scale.md): the test ends it."""
    import re

    deadline = start + FAULT_BOUND_S
    for host in survivors:
        while not any(re.search(cause, line) for line in error_lines(trainer.output(host))):
            assert time.monotonic() < deadline, (host, error_lines(trainer.output(host)), trainer.tails())
            time.sleep(0.2)
    for host in survivors:
        if host in cut_off:
            kill_host(host)
            continue
        try:
            code = trainer.procs[host].wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{host}'s launcher still running {FAULT_BOUND_S} s after the fault:\n"
                                 f"{trainer.tails()}") from None
        assert code != 0, trainer.tails()
    for host in ("a", "b"):
        wait_until = time.monotonic() + 10
        while pids_in(host) and time.monotonic() < wait_until:
            time.sleep(0.2)
        assert not pids_in(host), f"left running on {host}: {pids_in(host)}"


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints):
    return tiny_checkpoints["qwen3"]


@pytest.fixture(scope="module")
def first_sidecar(hosts, model_dir, tmp_path_factory):
    proc = start_sidecar(model_dir, tmp_path_factory.mktemp("sidecar") / "sidecar1.log")
    yield proc
    kill_host("c")


def pause_env(folder: Path, call: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {PAUSE_AT_CALL_ENV: call, PAUSE_DIR_ENV: folder}


PAUSING = {"reward": {"kind": "callable", "callable": "tests._rewards:pause_at_call"}}


@pytest.mark.parametrize("fault", ["host b killed", "host b link down"])
def test_fault_in_step_1_ends_on_every_surviving_host(hosts, first_sidecar, model_dir, tmp_path, fault):
    """While rank 0 (host a) grades step 1's rollouts and rank 1 (host b) waits for them, host b dies (every
    process in its namespace SIGKILLed) or its link goes down: each surviving host prints its error line and its
    launcher exits non-zero within the bound (after the link loss, b's torchrun agent, cut off from a's rendezvous
    store, is ended by the test: docs/scale.md), and nothing is left on a or b. Only separate hosts can lose a link; a killed
    rank on one host is test_trainer_resume's, not a lost peer across a network."""
    config = run_config(tmp_path, model_dir, **PAUSING)
    trainer = Trainer(config, ("a", "b"), tag="fault", **pause_env(tmp_path / "pause", 1))
    try:
        wait_for(tmp_path / "pause" / "paused", trainer)
        start = time.monotonic()
        if fault == "host b killed":
            kill_host("b")
            survivors, cause = ("a",), r"Connection closed by peer|Connection reset|Broken pipe"
        else:
            sh("ip", "-n", ns("b"), "link", "set", "eth0", "down")
            survivors, cause = ("a", "b"), r"[Tt]imed out|timeout"
        (tmp_path / "pause" / "go").write_text("")
        assert_fault_ends(trainer, survivors, start, cause, cut_off=("b",) if "link" in fault else ())
    finally:
        sh("ip", "-n", ns("b"), "link", "set", "eth0", "up", check=False)
        kill_host("a")
        kill_host("b")
    assert curl("a", f"{SIDECAR_URL}/health")["weight_version"] == 0  # no push reached the sidecar


@pytest.fixture(scope="module")
def two_host_run(hosts, first_sidecar, model_dir, tmp_path_factory):
    """The two-host run: steps 1 and 2 complete; paused in step 3's grading, the sidecar is checked, frozen
    (SIGSTOP: its host stops answering), and killed once rank 0 waits on it in step 3's push."""
    tmp_path = tmp_path_factory.mktemp("two_host")
    config = run_config(tmp_path, model_dir, **PAUSING)
    trainer = Trainer(config, ("a", "b"), tag="run", **pause_env(tmp_path / "pause", 2 * 2 * 2 + 1))
    try:
        wait_for(tmp_path / "pause" / "paused", trainer)
        served = curl("a", f"{SIDECAR_URL}/health")["weight_version"]
        greedy = sidecar_greedy()
        for pid in pids_in("c"):
            os.kill(pid, signal.SIGSTOP)
        (tmp_path / "pause" / "go").write_text("")
        deadline = time.monotonic() + 120
        while not waiting_on_sidecar():  # rank 0's request to the frozen sidecar sits unread in c's socket
            assert time.monotonic() < deadline, trainer.tails()
            time.sleep(0.1)
        start = time.monotonic()
        kill_host("c")
        assert_fault_ends(trainer, ("a", "b"), start, r"weight")
    finally:
        for host in ("a", "b", "c"):
            kill_host(host)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return dict(tmp_path=tmp_path, config=config, served=served, greedy=greedy, metrics=metrics, trainer=trainer)


def waiting_on_sidecar() -> bool:
    """An established connection to the sidecar's port on host c with unread bytes (Recv-Q > 0)."""
    out = sh("ip", "netns", "exec", ns("c"), "ss", "-tnH", "state", "established", check=False).stdout
    return any(int(fields[0]) > 0 and fields[2].endswith(f":{SIDECAR_PORT}")
               for fields in (line.split() for line in out.splitlines()) if len(fields) >= 4)


def test_two_host_run_pushes_every_step_across_hosts_then_the_sidecar_host_dies(two_host_run, model_dir):
    """TP=2 across hosts a and b through torchrun_multinode.sh (c10d at a's address), the collective push from
    a to the sidecar on c: steps 1 and 2 logged and checkpointed, the sidecar serving version 2 whose greedy
    decoding equals transformers on the step-2 checkpoint; then c dies mid-push (step 3) and both trainer hosts
    end with an error line naming the push. Nothing on one host exercises routable addresses, the gloo
    interface choice or the sidecar's workers connecting back across a network."""
    from megatron_opsd.training import export_cli

    run = two_host_run
    assert [m["step"] for m in run["metrics"]] == [1, 2]
    assert run["served"] == 2
    out = run["tmp_path"] / "step2_hf"
    checkpoints = run["tmp_path"] / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step")) == ["step-1", "step-2"]
    assert export_cli.main(argparse.Namespace(checkpoint=str(checkpoints / "step-2"), out=str(out), tp=1,
                                              pp=1)) == 0
    assert run["greedy"] == hf_greedy_of(model_dir, load_file(str(out / "model.safetensors")))


def test_two_host_checkpoint_resumes_on_one_host_equal_to_the_last_digit(two_host_run, hosts, model_dir,
                                                                           tmp_path):
    """A fresh sidecar on c; the two-host run's step-1 checkpoint resumed on host a alone (both TP ranks there):
    its step 2 equals the two-host step 2 in every logged number, to the last digit, and it finishes step 3,
    whose push reaches c (greedy equals transformers on the exported weights). The cross-host checkpoint
    (written by ranks on two hosts) and the host-count independence of a step are only seen here."""
    run = two_host_run
    copy = tmp_path / "run"
    shutil.copytree(run["tmp_path"] / "run", copy)
    shutil.rmtree(copy / "checkpoints" / "step-2")
    (copy / "checkpoints" / "latest").write_text("step-1")
    proc = start_sidecar(model_dir, tmp_path / "sidecar2.log")
    try:
        config = run_config(tmp_path, model_dir, export={"hf_dir": str(tmp_path / "hf")}, **PAUSING)  # same grading
        trainer = Trainer(config, ("a",), tag="resume", nproc=2)
        assert set(trainer.wait(300).values()) == {0}, trainer.tails()
        metrics = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics] == [1, 2, 3]
        two_host = run["metrics"][1]
        one_host = metrics[1]
        assert set(one_host) == set(two_host)
        timed = [k for k in two_host if k.startswith(("time/", "overlap/")) or k.endswith("_per_s")]
        assert len(two_host) - len(timed) > 15 and "loss" in two_host and "grad_norm" in two_host
        assert {k: v for k, v in one_host.items() if k not in timed} == \
            {k: v for k, v in two_host.items() if k not in timed}
        assert curl("a", f"{SIDECAR_URL}/health")["weight_version"] == 3
        assert sidecar_greedy() == hf_greedy_of(model_dir, load_file(str(tmp_path / "hf" / "model.safetensors")))
    finally:
        kill_host("a")
        kill_host("c")
        proc.wait(timeout=30)
