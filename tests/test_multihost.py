"""Multi-node for real on one machine (issue 27): three hosts as Linux network namespaces on a bridge, each with
its own address (10.77.0.1-3/24, nothing else reachable), the launch scripts used as a user would.

Host a and host b each run ``examples/launch/torchrun_multinode.sh megatron-opsd train`` (one rank per host,
TP=2 spanning them, c10d rendezvous at a's address); host c runs a ``megatron-opsd sidecar`` started as
``examples/launch/opsd.sbatch`` starts one (``env CUDA_VISIBLE_DEVICES= TORCH_NCCL_ASYNC_ERROR_HANDLING=2
megatron-opsd sidecar --host <its address>``, the secret in the environment, ``curl /health`` until it answers),
reached by its address; weights go from a to c over the collective (gloo) transport.

The module runs in file order, two sidecars on c started together: port 8000 for the two-host run, port 8001 for
every run after it, running through every fault after it (each resumed run gives it the checkpoint's weights
with a restore push, whatever version it serves):
1. the two-host run: steps 1 to 3 complete (checkpoints, pushes v1 to v3 applied: greedy on the sidecar equals
   transformers on the step-3 checkpoint), then its sidecar dies (every process of it SIGKILLed) during step 4's
   push;
2. host b's link down while rank 0 grades step 1 of a new run (``tests._rewards.pause_at_call``); while b waits
   for TCP to give up, host a alone (both ranks) resumes the two-host step-1 checkpoint and trains step 2;
3. that step-2 checkpoint resumed on a and b, where host b's ranks are killed while rank 0 grades step 3; the run
   resumed from its last checkpoint (step 2) against the same running sidecar trains steps 3 and 4;
4. the two-host run resumed from its last checkpoint (step 3, after its sidecar died) trains step 4.
Every step equals the two-host run's to the last digit (step 4, which that run never finished: the two resumed
runs equal each other), every leg's pushes reach c (greedy equal to the leg's export).
Every fault ends within its stated bound with an error line on each surviving host and nothing left in a or b
(the host whose link goes down with the kernel's TCP retransmission limit lowered: docs/scale.md).
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
# wait in the rendezvous store and its close after a failure at most 10 s each (RDZV_READ_TIMEOUT /
# RDZV_CLOSE_TIMEOUT) while node 0 answers. Every surviving host's launcher must exit within FAULT_BOUND_S of the
# fault. On a host whose link is down only TCP's retransmission limit ends its torchrun agent (docs/scale.md,
# "Across hosts"): TCP_RETRIES2 is ~51 s with a 200 ms RTO (the kernel's default of 15: ~15 min), after the rank's
# error line (its gloo timeout, 18 s, then at most 15 s asking the job's store for a peer's error,
# parallel/control.py), so that host's bound is LINK_DOWN_BOUND_S.
FAULT_BOUND_S = 60
TCP_RETRIES2 = 7
LINK_DOWN_BOUND_S = 80


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


def sidecar_url(port: int = SIDECAR_PORT) -> str:
    return f"http://{ADDRESS['c']}:{port}"


SIDECAR_URL = sidecar_url()
SPARE_PORT = SIDECAR_PORT + 1
SPARE_URL = sidecar_url(SPARE_PORT)  # the second sidecar: every run but the two-host one


def spawn_sidecar(model_dir: str, log: Path, port: int = SIDECAR_PORT) -> subprocess.Popen:
    """``megatron-opsd sidecar`` on host c as opsd.sbatch starts it."""
    return spawn("c", ["env", "CUDA_VISIBLE_DEVICES=", "TORCH_NCCL_ASYNC_ERROR_HANDLING=2", "megatron-opsd", "sidecar",
                       "--model", model_dir, "--tensor-parallel-size", "1", "--host", ADDRESS["c"],
                       "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
                       "--kv-cache-memory-bytes", str(128 << 20)], log)


def wait_healthy(proc: subprocess.Popen, log: Path, url: str = SIDECAR_URL, timeout_s: float = 600) -> None:
    """/health polled from host a as opsd.sbatch polls it (it gives up when the sidecar exits first)."""
    deadline = time.monotonic() + timeout_s
    while curl("a", f"{url}/health", timeout_s=5) is None:
        assert proc.poll() is None, f"sidecar exited before it was healthy:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"sidecar not healthy after {timeout_s} s"
        time.sleep(1)


def signal_sidecar(proc: subprocess.Popen, sig: int) -> list[int]:
    """``sig`` to every process of one sidecar on c (its session: ``spawn`` starts a new one, vLLM's engine core and
    workers stay in it), leaving the other sidecar there alone; returns the pids signalled."""
    pids = []
    for pid in pids_in("c"):
        try:
            if os.getpgid(pid) == proc.pid:
                os.kill(pid, sig)
                pids.append(pid)
        except ProcessLookupError:  # exited meanwhile
            pass
    return pids


def kill_sidecar(proc: subprocess.Popen) -> None:
    """The sidecar's host dying, as far as this sidecar goes: SIGKILL to every process of it, until none is left."""
    for _ in range(50):
        if not signal_sidecar(proc, signal.SIGKILL):
            proc.wait(timeout=30)
            return
        time.sleep(0.1)
    raise AssertionError(f"sidecar processes left on c: {signal_sidecar(proc, 0)}")


def weight_version(url: str = SIDECAR_URL) -> int:
    return curl("a", f"{url}/health")["weight_version"]


def sidecar_greedy(url: str = SIDECAR_URL) -> list[list[int]]:
    out = curl("a", f"{url}/generate", dict(prompts=PROMPTS, temperature=0.0, max_tokens=MAX_TOKENS,
                                            ignore_eos=True))
    return [samples[0]["token_ids"] for samples in out["results"]]


def hf_greedy_of(model_dir: str, state: dict) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return [hf_greedy(model, prompt, MAX_TOKENS, state) for prompt in PROMPTS]


def run_config(tmp_path: Path, model_dir: str, url: str = SIDECAR_URL, **sections) -> Path:
    """The run every phase trains (TP=2, a checkpoint every step, all kept). The learning rate is constant (the
    default schedule), so runs that differ only in ``train.steps`` train the same steps."""
    base = dict(rollout={"sidecar_urls": [url], "transport": "collective", "sync_timeout_s": 5.0,
                         "push_retries": 0},
                parallel={"tensor_model_parallel_size": 2, "timeout_minutes": 0.25, "control_timeout_minutes": 0.3},
                train={"steps": 4, "eval_every": 0}, checkpoint={"save_every": 1, "keep_last": 4},
                logging={"dir": str(tmp_path / "run"), "progress": False, "tensorboard": False})
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return tiny_run_config(tmp_path, model_dir, **base)


class Trainer:
    """``torchrun_multinode.sh megatron-opsd train --config CONFIG`` on each of ``hosts``, one rank per host (or
    NPROC_PER_NODE ranks on a lone host)."""

    def __init__(self, config: Path, hosts: tuple, tag: str, nproc: int = 1, overrides: tuple = (), **extra):
        self.logs = {h: config.parent / f"{tag}-{h}.out" for h in hosts}
        self.procs = {h: spawn(h, ["bash", str(TORCHRUN), "megatron-opsd", "train", "--config", str(config),
                                   *overrides],
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


def assert_left_nothing(host: str) -> None:
    wait_until = time.monotonic() + 10
    while pids_in(host) and time.monotonic() < wait_until:
        time.sleep(0.2)
    assert not pids_in(host), f"left running on {host}: {pids_in(host)}"


def assert_fault_ends(trainer: Trainer, survivors: tuple, start: float, cause: str, bounds: dict | None = None,
                      then=None) -> None:
    """Every surviving host prints an error line matching ``cause`` and its launcher exits non-zero within
    FAULT_BOUND_S of the fault (or the host's own bound in ``bounds``), leaving nothing running there; nothing is
    left on a killed trainer host either. ``then()`` runs once the first survivor is done (its host is free)."""
    import re

    bounds = bounds or {}
    for host in ("a", "b"):
        if host not in survivors:
            assert_left_nothing(host)
    for host in survivors:  # one host after the other: the first is free (for ``then``) while the next still ends
        bound_s = bounds.get(host, FAULT_BOUND_S)
        while not any(re.search(cause, line) for line in error_lines(trainer.output(host))):
            assert time.monotonic() < start + bound_s, (host, error_lines(trainer.output(host)), trainer.tails())
            time.sleep(0.2)
        try:
            code = trainer.procs[host].wait(timeout=max(1.0, start + bound_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{host}'s launcher still running {bound_s} s after the fault:\n"
                                 f"{trainer.tails()}") from None
        assert code != 0, trainer.tails()
        assert_left_nothing(host)
        if then is not None and host == survivors[0]:
            then()


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints):
    return tiny_checkpoints["qwen3"]


@pytest.fixture(scope="module")
def sidecars(hosts, model_dir, tmp_path_factory):
    """Both sidecars on c, started together as opsd.sbatch starts its replicas: port 8000 serves the two-host run
    (whose third fault kills it), port 8001 every other run, through every fault after it."""
    folder = tmp_path_factory.mktemp("sidecar")
    procs = {port: spawn_sidecar(model_dir, folder / f"sidecar{port}.log", port) for port in (SIDECAR_PORT, SPARE_PORT)}
    for port, proc in procs.items():
        wait_healthy(proc, folder / f"sidecar{port}.log", sidecar_url(port))
        # vLLM's first request pays its warm-up (6 s against 0.8 s for the next, measured while the suite ran): paid
        # here, not inside the runs' first step, whose rank-0 rollouts the other ranks wait for in an 18 s bound
        sidecar_greedy(sidecar_url(port))
    yield procs
    kill_host("c")


def pause_env(folder: Path, call: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    return {PAUSE_AT_CALL_ENV: call, PAUSE_DIR_ENV: folder}


PAUSING = {"reward": {"kind": "callable", "callable": "tests._rewards:pause_at_call"}}
REWARD_CALLS_PER_STEP = 4  # rollout.prompts_per_step x rollout.n of tiny_run_config, graded on rank 0


@pytest.fixture(scope="module")
def two_host_run(hosts, sidecars, model_dir, tmp_path_factory):
    """The two-host run, uninterrupted for steps 1 to 3 (the reference the resumed runs are compared with); paused
    in step 4's grading, the sidecar is checked, frozen (SIGSTOP: its host stops answering), and killed once rank 0
    waits on it in step 4's push (its processes only: the second sidecar on c runs on)."""
    tmp_path = tmp_path_factory.mktemp("two_host")
    config = run_config(tmp_path, model_dir, **PAUSING)
    trainer = Trainer(config, ("a", "b"), tag="run", **pause_env(tmp_path / "pause", 3 * REWARD_CALLS_PER_STEP + 1))
    first = sidecars[SIDECAR_PORT]
    try:
        wait_for(tmp_path / "pause" / "paused", trainer)
        served = weight_version()
        greedy = sidecar_greedy()
        signal_sidecar(first, signal.SIGSTOP)
        (tmp_path / "pause" / "go").write_text("")
        deadline = time.monotonic() + 120
        while not waiting_on_sidecar():  # rank 0's request to the frozen sidecar sits unread in c's socket
            assert time.monotonic() < deadline, trainer.tails()
            time.sleep(0.1)
        start = time.monotonic()
        kill_sidecar(first)
        assert_fault_ends(trainer, ("a", "b"), start, r"weight")
    finally:
        kill_sidecar(first)
        for host in ("a", "b"):
            kill_host(host)
    return dict(tmp_path=tmp_path, config=config, served=served, greedy=greedy, metrics=read_metrics(tmp_path / "run"),
                trainer=trainer)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def waiting_on_sidecar() -> bool:
    """An established connection to the sidecar's port on host c with unread bytes (Recv-Q > 0)."""
    out = sh("ip", "netns", "exec", ns("c"), "ss", "-tnH", "state", "established", check=False).stdout
    return any(int(fields[0]) > 0 and fields[2].endswith(f":{SIDECAR_PORT}")
               for fields in (line.split() for line in out.splitlines()) if len(fields) >= 4)


def test_two_host_run_pushes_every_step_across_hosts_then_the_sidecar_host_dies(two_host_run, model_dir):
    """TP=2 across hosts a and b through torchrun_multinode.sh (c10d at a's address), the collective push from
    a to the sidecar on c: steps 1 to 3 logged and checkpointed, the sidecar serving version 3 whose greedy
    decoding equals transformers on the step-3 checkpoint; then c dies mid-push (step 4) and both trainer hosts
    end with an error line naming the push. Nothing on one host exercises routable addresses, the gloo
    interface choice or the sidecar's workers connecting back across a network."""
    from megatron_opsd.training import export_cli

    run = two_host_run
    assert [m["step"] for m in run["metrics"]] == [1, 2, 3]
    assert run["served"] == 3
    out = run["tmp_path"] / "step3_hf"
    checkpoints = run["tmp_path"] / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step")) == ["step-1", "step-2",
                                                                                        "step-3"]
    assert export_cli.main(argparse.Namespace(checkpoint=str(checkpoints / "step-3"), out=str(out), tp=1,
                                              pp=1)) == 0
    assert run["greedy"] == hf_greedy_of(model_dir, load_file(str(out / "model.safetensors")))


def assert_step_equal(resumed: dict, reference: dict) -> None:
    """Every logged number but the timings, to the last digit."""
    assert resumed["step"] == reference["step"] and set(resumed) == set(reference)
    timed = [k for k in reference if k.startswith(("time/", "overlap/")) or k.endswith("_per_s")]
    assert len(reference) - len(timed) > 15 and "loss" in reference and "grad_norm" in reference
    assert {k: v for k, v in resumed.items() if k not in timed} == \
        {k: v for k, v in reference.items() if k not in timed}


def assert_served(url: str, version: int, hf: Path, model_dir: str) -> None:
    """The sidecar serves ``version`` and, greedily, what transformers makes of the exported weights."""
    assert weight_version(url) == version
    assert sidecar_greedy(url) == hf_greedy_of(model_dir, load_file(str(hf / "model.safetensors")))


def leg_config(tmp_path: Path, model_dir: str, run_dir: Path, steps: int, tag: str) -> Path:
    """A resumed leg: the two-host run's config (same grading) in ``run_dir`` against the second sidecar, to
    ``steps``, exported to hf-TAG."""
    return run_config(tmp_path, model_dir, url=SPARE_URL, train={"steps": steps},
                      export={"hf_dir": str(tmp_path / f"hf-{tag}")}, logging={"dir": str(run_dir)}, **PAUSING)


def finish_leg(trainer: "Trainer", run_dir: Path) -> list[dict]:
    """Wait for a resumed leg to end; returns its run directory's metrics, one row per step."""
    assert set(trainer.wait(300).values()) == {0}, trainer.tails()
    assert "resumed from" in trainer.output(next(iter(trainer.procs))), trainer.tails()
    return read_metrics(run_dir)


# A leg with no fault in it keeps the tight bounds of run_config but these two: its hosts' ranks may start
# seconds apart under load (two trainers and two sidecars on two cores), and the 15 s process-group timeout the
# fault tests need once failed a clean-clone suite at init_process_group ("Gloo connectFullMesh failed").
FAULT_FREE = ("parallel.timeout_minutes=1", "parallel.control_timeout_minutes=1")
CHAIN = {}  # what the later tests resume: the one-host leg's run directory, step 4 of the run resumed after host b died


def test_host_b_link_down_ends_on_both_hosts_while_a_resumes_on_its_own(two_host_run, sidecars, model_dir,
                                                                         tmp_path):
    """While rank 0 (host a) grades step 1's rollouts and rank 1 (host b) waits for them, host b's link goes down:
    each host prints its error line and its launcher exits non-zero within the bound, and nothing is left on a or
    b; no push reached the sidecar. b's torchrun agent is blocked in a rendezvous-store call to a that no torchrun
    timeout bounds: only the kernel's TCP retransmission limit ends it, lowered on b as a cluster admin would
    (docs/scale.md). Only separate hosts can lose a link. While b waits for TCP, host a, free again, resumes the
    two-host run's step-1 checkpoint on its own (both TP ranks) against the same sidecar (a restore push) and
    trains step 2: equal to the two-host run's step 2 to the last digit, the sidecar serving the leg's export.
    Checkpoints written on two hosts read on one are only seen here."""
    run = two_host_run
    copy = tmp_path / "leg" / "run"  # the leg in its own folder (config.yaml, logs), apart from the fault's run
    shutil.copytree(run["tmp_path"] / "run", copy)
    for step in (2, 3):
        shutil.rmtree(copy / "checkpoints" / f"step-{step}")
    (copy / "checkpoints" / "latest").write_text("step-1")
    one_host = leg_config(tmp_path / "leg", model_dir, copy, 2, "one_host")
    config = run_config(tmp_path, model_dir, url=SPARE_URL, **PAUSING)
    trainer = Trainer(config, ("a", "b"), tag="fault", **pause_env(tmp_path / "pause", 1))
    leg = {}

    def resume_on_a() -> None:
        assert weight_version(SPARE_URL) == 0  # no push reached the sidecar
        leg["trainer"] = Trainer(one_host, ("a",), tag="one_host", nproc=2)

    try:
        wait_for(tmp_path / "pause" / "paused", trainer)
        start = time.monotonic()
        # TCP gives up on an unanswered segment after ~51 s instead of ~15 min (net.ipv4.tcp_retries2=15, the
        # default): what frees b's torchrun agent (docs/scale.md); b's namespace only, the root one untouched
        sh("ip", "netns", "exec", ns("b"), "sysctl", "-qw", f"net.ipv4.tcp_retries2={TCP_RETRIES2}")
        sh("ip", "-n", ns("b"), "link", "set", "eth0", "down")
        (tmp_path / "pause" / "go").write_text("")
        assert_fault_ends(trainer, ("a", "b"), start, r"[Tt]imed out|timeout", {"b": LINK_DOWN_BOUND_S},
                          then=resume_on_a)
        metrics = finish_leg(leg["trainer"], copy)
    finally:
        sh("ip", "-n", ns("b"), "link", "set", "eth0", "up", check=False)
        kill_host("a")
        kill_host("b")
    assert [m["step"] for m in metrics] == [1, 2]
    assert_step_equal(metrics[-1], run["metrics"][1])
    assert_served(SPARE_URL, 2, tmp_path / "leg" / "hf-one_host", model_dir)
    CHAIN["run_dir"] = copy


def test_resume_on_two_hosts_after_host_b_died_against_the_running_sidecar(two_host_run, sidecars, model_dir,
                                                                           tmp_path):
    """The step-2 checkpoint that one host wrote (the link-down test's leg) resumed on hosts a and b, where host
    b's processes are SIGKILLed while rank 0 grades step 3 (a prints its error line and exits within the bound;
    the sidecar still serves version 2, the restore's); that run resumed from its last checkpoint (step 2) on a
    and b against the same running sidecar (a restore of the version it serves, refused before the restore push
    existed) trains steps 3 and 4: step 3 equals the uninterrupted two-host run's to the last digit, and the
    sidecar serves the leg's export. A lost host, a checkpoint written on one host read on two, and a resume
    against a sidecar that outlived the run are only seen here."""
    assert "run_dir" in CHAIN, "needs test_host_b_link_down_ends_on_both_hosts_while_a_resumes_on_its_own (file order)"
    run_dir = CHAIN["run_dir"]
    config = leg_config(tmp_path, model_dir, run_dir, 4, "two_host")
    trainer = Trainer(config, ("a", "b"), tag="resume-killed", **pause_env(tmp_path / "pause", 1))
    try:
        wait_for(tmp_path / "pause" / "paused", trainer)
        start = time.monotonic()
        kill_host("b")
        (tmp_path / "pause" / "go").write_text("")
        assert_fault_ends(trainer, ("a",), start, r"Connection closed by peer|Connection reset|Broken pipe")
        assert "resumed from" in trainer.output("a") and weight_version(SPARE_URL) == 2  # the restore, no v3
        metrics = finish_leg(Trainer(config, ("a", "b"), tag="resume-after-fault", overrides=FAULT_FREE), run_dir)
    finally:
        kill_host("a")
        kill_host("b")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert_step_equal(metrics[2], two_host_run["metrics"][2])
    assert_served(SPARE_URL, 4, tmp_path / "hf-two_host", model_dir)
    CHAIN["step4"] = metrics[3]


def test_the_run_whose_sidecar_died_resumes_and_finishes(two_host_run, sidecars, model_dir, tmp_path):
    """The two-host run, whose sidecar died during step 4's push, resumed from its last checkpoint (step 3) on a
    and b against the other sidecar on c, which serves version 4 of the run resumed after host b died (a restore
    to an older version): step 4 equals that run's step 4 to the last digit (the two reach it through different
    checkpoints and hosts; the uninterrupted run never finished it) and the sidecar serves the leg's export.
    A restore that left the newer weights in place would change step 4's rollouts."""
    assert "step4" in CHAIN, "needs test_resume_on_two_hosts_after_host_b_died_against_the_running_sidecar"
    copy = tmp_path / "run"
    shutil.copytree(two_host_run["tmp_path"] / "run", copy)
    assert weight_version(SPARE_URL) == 4
    try:
        metrics = finish_leg(Trainer(leg_config(tmp_path, model_dir, copy, 4, "after_sidecar"), ("a", "b"),
                                     tag="resume-after-sidecar", overrides=FAULT_FREE), copy)
    finally:
        kill_host("a")
        kill_host("b")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert_step_equal(metrics[3], CHAIN["step4"])
    assert_served(SPARE_URL, 4, tmp_path / "hf-after_sidecar", model_dir)
