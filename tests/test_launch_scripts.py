"""Launch scripts: the sbatch script's rendered srun/torchrun commands (DRY_RUN=1), a real two-"node" torchrun
c10d rendezvous on 127.0.0.1 running the TP=2 smoke job, and - where a slurm cluster answers (for example the
one ``examples/launch/local_slurm.sh start`` sets up) - the sbatch script run for real with a CPU vLLM sidecar."""
from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "examples" / "launch" / "opsd.sbatch"
TORCHRUN = ROOT / "examples" / "launch" / "torchrun_multinode.sh"
VENV_BIN = str(Path(sys.executable).parent)


def _env(**extra) -> dict:
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def dry_run_sbatch(**env) -> tuple[int, list, str]:
    proc = subprocess.run(["bash", str(SBATCH)], env=_env(DRY_RUN=1, CONFIG="cfg.yaml", MODEL="/ckpt", **env),
                          capture_output=True, text=True, timeout=60)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DRY_RUN: ")]
    return proc.returncode, [shlex.split(line[len("DRY_RUN: "):]) for line in lines], proc.stdout + proc.stderr


def option(argv: list, name: str) -> str:
    """Value of ``--name=value`` or ``--name value`` in argv."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name:
            return argv[i + 1]
    raise KeyError(name)


def options(argv: list, name: str) -> list:
    """Every value of ``--name value`` in argv (repeated options such as ``--set``)."""
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == name]


def sbatch_directives() -> dict:
    """``#SBATCH --key=value`` lines of the script."""
    return dict(line[len("#SBATCH "):].split("=", 1) for line in SBATCH.read_text().splitlines()
                if line.startswith("#SBATCH ") and "=" in line)


def test_sbatch_directives_ask_for_gpus_and_write_no_missing_dir():
    """A job without --gpus-per-node gets no GPUs on GRES clusters; --output into a logs/ that does not exist makes
    slurm drop the job's output silently, so the script leaves --output to slurm's default."""
    directives = sbatch_directives()
    assert directives["--gpus-per-node"] == "8"
    assert "--output" not in directives


def test_sbatch_dry_run_llama70b_layout():
    """6 nodes: trainer TP8 x PP4 on 4 nodes, one TP=8 sidecar on each of the 2 sidecar nodes."""
    rc, commands, out = dry_run_sbatch(HOSTS="g1 g2 g3 g4 g5 g6", TRAINER_NODES=4, SIDECAR_NODES=2,
                                       SIDECARS_PER_NODE=1, SIDECAR_TP=8, LOG_DIR="/logs/j")
    assert rc == 0, out
    sruns = [c for c in commands if c[0] == "srun"]
    sidecars, trainer = sruns[:-1], sruns[-1]
    assert [option(c, "--nodelist") for c in sidecars] == ["g5", "g6"]
    for cmd in sidecars:
        assert option(cmd, "--nodes") == "1" and option(cmd, "--ntasks") == "1"
        tail = cmd[cmd.index("env"):]
        assert tail[1] == "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7"
        # the trainer's TearDown (1) must not reach vLLM: a failed weight push would kill its workers
        assert tail[2] == "TORCH_NCCL_ASYNC_ERROR_HANDLING=2"
        assert tail[3:5] == ["megatron-opsd", "sidecar"] and option(tail, "--model") == "/ckpt"
        assert option(tail, "--tensor-parallel-size") == "8" and option(tail, "--port") == "8000"
        assert option(cmd, "--output") == f"/logs/j/sidecar-{option(cmd, '--nodelist')}-0.log"
        assert option(cmd, "--cpus-per-task") == "64"  # 8 GPUs x CPUS_PER_GPU=8: vLLM's workers get cores
    assert [c for c in commands if c[:2] == ["wait", "for"]] == [["wait", "for", "http://g5:8000/health"],
                                                                  ["wait", "for", "http://g6:8000/health"]]
    assert option(trainer, "--nodes") == "4" and option(trainer, "--ntasks-per-node") == "1"
    assert option(trainer, "--nodelist") == "g1,g2,g3,g4" and "--overlap" not in trainer
    assert option(trainer, "--output") == "/logs/j/trainer-%N.log"
    assert option(trainer, "--cpus-per-task") == "64"  # 8 ranks x 8 cores, not 8 ranks on one core
    torchrun = trainer[trainer.index("torchrun"):]
    assert option(torchrun, "--nnodes") == "4" and option(torchrun, "--nproc-per-node") == "8"
    assert option(torchrun, "--rdzv-backend") == "c10d" and option(torchrun, "--rdzv-endpoint") == "g1:29400"
    assert option(torchrun, "--log-dir") == "/logs/j/ranks"
    program = torchrun[torchrun.index("--no-python") + 1:]
    assert program[:4] == ["megatron-opsd", "train", "--config", "cfg.yaml"]
    # the trainer trains the checkpoint the sidecars serve
    assert options(program, "--set") == ["model.path=/ckpt", "rollout.sidecar_urls=http://g5:8000,http://g6:8000"]


def test_sbatch_dry_run_sidecar_on_trainer_node():
    """Qwen3-8B on one node: trainer on GPUs 0-5, a TP=2 sidecar on GPUs 6,7 of the same node."""
    rc, commands, out = dry_run_sbatch(HOSTS="n1", SIDECAR_NODES=0, SIDECAR_TP=2, SIDECAR_GPU_OFFSET=6,
                                       GPUS_PER_NODE=6)
    assert rc == 0, out
    sidecar, trainer = [c for c in commands if c[0] == "srun"]
    assert option(sidecar, "--nodelist") == "n1" and "CUDA_VISIBLE_DEVICES=6,7" in sidecar
    assert "--overlap" in trainer and option(trainer, "--nodes") == "1"
    assert option(trainer, "--nproc-per-node") == "6"
    assert option(sidecar, "--cpus-per-task") == "16" and option(trainer, "--cpus-per-task") == "48"
    assert "rollout.sidecar_urls=http://n1:8000" in trainer


def test_sbatch_binds_each_sidecar_to_its_node_address_and_keeps_the_secret_off_command_lines():
    """A sidecar listens on the address its node's name resolves to (the trainer's URLs name the node), not on every
    interface; SIDECAR_BIND overrides; an unresolvable name falls back to every interface, saying so. The secret
    reaches the steps through the environment: no rendered command holds it."""
    secret = "given-secret-0123456789"
    rc, commands, out = dry_run_sbatch(HOSTS="localhost", SIDECAR_NODES=0, SIDECAR_TP=2, SIDECAR_GPU_OFFSET=6,
                                       GPUS_PER_NODE=6, OPSD_SIDECAR_SECRET=secret)
    assert rc == 0, out
    sidecar = next(c for c in commands if c[0] == "srun")
    assert option(sidecar, "--host") in ("127.0.0.1", "::1") and secret not in out
    rc, commands, out = dry_run_sbatch(HOSTS="localhost", SIDECAR_NODES=0, SIDECAR_BIND="10.1.2.3")
    assert option(next(c for c in commands if c[0] == "srun"), "--host") == "10.1.2.3"
    rc, commands, out = dry_run_sbatch(HOSTS="no-such-node-x1 no-such-node-x2", SIDECAR_NODES=1)
    assert option(next(c for c in commands if c[0] == "srun"), "--host") == "0.0.0.0"
    assert "cannot resolve no-such-node-x2; its sidecar listens on every interface" in out


def test_sbatch_refuses_too_few_nodes():
    rc, _, out = dry_run_sbatch(HOSTS="a b", TRAINER_NODES=2, SIDECAR_NODES=1)
    assert rc == 2 and "cannot hold TRAINER_NODES=2 + SIDECAR_NODES=1" in out


def test_torchrun_script_dry_run():
    proc = subprocess.run(["bash", str(TORCHRUN), "megatron-opsd", "train", "--config", "c.yaml"],
                          env=_env(DRY_RUN=1, NNODES=4, NODE_RANK=2, RDZV_HOST="h0", NPROC_PER_NODE=8),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[0] == "torchrun" and option(argv, "--nnodes") == "4" and option(argv, "--rdzv-endpoint") == "h0:29400"
    assert option(argv, "--rdzv-conf").startswith("is_host=0,")  # only node 0 hosts the c10d store
    assert argv[argv.index("--no-python") + 1:] == ["megatron-opsd", "train", "--config", "c.yaml"]


def test_torchrun_script_refuses_a_secret_file_others_can_read(tmp_path):
    secret = tmp_path / "sidecar.secret"
    secret.write_text("s3cret\n")
    for mode, rc, said in [(0o644, 2, "is readable by others (mode 644); chmod 600"), (0o600, 0, "torchrun")]:
        secret.chmod(mode)
        proc = subprocess.run(["bash", str(TORCHRUN), "true"], env=_env(DRY_RUN=1, OPSD_SIDECAR_SECRET_FILE=secret),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == rc and said in proc.stdout + proc.stderr, proc.stderr


SMOKE = re.compile(r"smoke rank=(\d) host=\S+ world=(\d) TP=(\d) DP=\d tp_rank=\d logits_sum=(\S+) "
                   r"logits_abs_sum=(\S+)")


def _smoke_lines(text: str) -> dict:
    return {int(m.group(1)): (int(m.group(2)), int(m.group(3)), float(m.group(4)), float(m.group(5)))
            for m in SMOKE.finditer(text)}


@pytest.fixture(scope="module")
def single_process_smoke():
    proc = subprocess.run([sys.executable, "-m", "megatron_opsd.models.smoke"], env=_env(), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _smoke_lines(proc.stdout)[0]


def test_torchrun_two_nodes_on_localhost(tmp_path, single_process_smoke):
    """Two torchrun agents ("nodes") on 127.0.0.1 rendezvous over c10d; TP=2 spans them; logits = TP=1's."""
    port = 29400 + os.getpid() % 500
    env = _env(NNODES=2, NPROC_PER_NODE=1, RDZV_HOST="127.0.0.1", RDZV_PORT=port, RDZV_ID=f"t{port}",
               LOG_DIR=tmp_path / "logs")
    procs = [subprocess.Popen(["bash", str(TORCHRUN), "python", "-m", "megatron_opsd.models.smoke", "--tp", "2"],
                              env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=ROOT) for rank in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=400)[0])
    finally:
        for proc in procs:
            proc.kill() if proc.poll() is None else None
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    ranks = _smoke_lines("\n".join(outputs))
    assert sorted(ranks) == [0, 1]
    _, _, ref_sum, ref_abs = single_process_smoke
    for world, tp, total, abs_total in ranks.values():
        assert (world, tp) == (2, 2)
        assert total == pytest.approx(ref_sum, abs=1e-3) and abs_total == pytest.approx(ref_abs, rel=1e-5)
    for node in ("node0", "node1"):  # per-rank log files
        logs = list((tmp_path / "logs" / node).rglob("stdout.log"))
        assert len(logs) == 1 and "smoke rank=" in logs[0].read_text()


# ------------------------------------------------------------------------------------------ real slurm
def _slurm_conf():
    """The SLURM_CONF of a cluster that answers (env, local_slurm.sh's, or the system's), else None."""
    if shutil.which("sbatch") is None:
        return None
    conf = os.environ.get("SLURM_CONF") or "/tmp/opsd-slurm/slurm.conf"
    if not Path(conf).exists():
        conf = "/etc/slurm/slurm.conf"
        if not Path(conf).exists():
            return None
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=_env(SLURM_CONF=conf), capture_output=True,
                             text=True, timeout=5)
    except subprocess.TimeoutExpired:
        return None
    return conf if out.returncode == 0 and re.search(r"idle|mix", out.stdout) else None


LOCAL_SLURM = ROOT / "examples" / "launch" / "local_slurm.sh"


def _start_local_slurm() -> bool:
    """Start the one-node local cluster when slurm is installed (scripts/setup_test_slurm.sh, run by `make
    test`), we are root, and no cluster answers yet; it is left running for later sessions (cheap, idle)."""
    if os.geteuid() != 0 or shutil.which("slurmctld") is None or os.environ.get("OPSD_SKIP_SLURM") == "1":
        return False
    proc = subprocess.run(["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=120)
    deadline = time.time() + 60  # the node can flap between idle and unknown while slurmd registers
    while proc.returncode == 0 and time.time() < deadline:
        if _slurm_conf() is not None:
            return True
        time.sleep(2)
    return False


@functools.lru_cache(maxsize=1)
def _cluster_conf():
    conf = _slurm_conf()
    if conf is None and _start_local_slurm():
        conf = _slurm_conf()
    return conf


def _slurm_env():
    """A fresh environment (tests add their own variables) for the cluster that answers, else None."""
    conf = _cluster_conf()
    return None if conf is None else _env(SLURM_CONF=conf)


needs_slurm = pytest.mark.skipif(_slurm_env() is None, reason="no slurm cluster answers and none could be started "
                                 "(needs root and Debian's slurm-wlm: scripts/setup_test_slurm.sh); start one with "
                                 "`examples/launch/local_slurm.sh start`")


def _sbatch_and_wait(env: dict, out_file: Path, timeout: float = 500) -> None:
    job = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={out_file}", str(SBATCH)], env=env,
                         capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip().split(";")[0]
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            queue = subprocess.run(["squeue", "-h", "-j", job_id], env=env, capture_output=True, text=True)
            if not queue.stdout.strip():
                return
            time.sleep(3)
        pytest.fail(f"slurm job {job_id} still running after {timeout}s")
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True)


@needs_slurm
def test_sbatch_stops_when_a_sidecar_dies(tmp_path):
    env = _slurm_env()
    env.update(CONFIG="unused.yaml", MODEL="/nonexistent", SIDECAR_NODES="0", SIDECAR_CMD="false",
               LOG_DIR=str(tmp_path / "logs"), HEALTH_TIMEOUT="120")
    _sbatch_and_wait(env, tmp_path / "job.out", timeout=120)
    out = (tmp_path / "job.out").read_text()
    assert "exited before it was healthy" in out and "trainer exited" not in out


@needs_slurm
@pytest.mark.slow
@pytest.mark.vllm
def test_sbatch_real_run_with_cpu_sidecar(tmp_path):
    """sbatch -> srun sidecar (real vLLM-CPU server on a tiny model) -> /health -> srun torchrun TP=2 smoke
    job that receives rollout.sidecar_urls and reaches the sidecar -> sidecar stopped when the trainer exits."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    model = make_tiny_hf_checkpoint(tmp_path / "tiny", family="qwen3")
    port = 18000 + os.getpid() % 1000
    env = _slurm_env()
    env.update(CONFIG="unused.yaml", MODEL=str(model), SIDECAR_NODES="0", SIDECAR_TP="1", GPUS_PER_NODE="2",
               SIDECAR_PORT=str(port), RDZV_PORT=str(port + 1), CPUS_PER_GPU="1",
               SIDECAR_ARGS="--dtype float32 --kv-cache-memory-bytes 134217728", HEALTH_TIMEOUT="400",
               TRAINER_CMD="python -m megatron_opsd.models.smoke --tp 2", LOG_DIR=str(tmp_path / "logs"),
               VLLM_CACHE_ROOT=str(tmp_path / "vllm"))
    _sbatch_and_wait(env, tmp_path / "job.out")
    out = (tmp_path / "job.out").read_text()
    assert "healthy" in out and "trainer exited with status 0" in out and "sidecars stopped" in out, out
    ranks_text = "\n".join(p.read_text() for p in (tmp_path / "logs" / "ranks").rglob("stdout.log"))
    ranks = _smoke_lines(ranks_text)
    assert sorted(ranks) == [0, 1] and all(v[:2] == (2, 2) for v in ranks.values())
    assert "smoke sidecar http://" in ranks_text and f":{port}/health -> HTTP 200" in ranks_text
    # the job's secret reached the trainer step through srun's environment; without it the sidecar refuses
    assert f":{port}/v1/models -> HTTP 200 with the run's secret, HTTP 401 without" in ranks_text
    assert f"overrides: model.path={model} rollout.sidecar_urls=" in ranks_text  # trains what the sidecar serves
    host_port = f":{port}"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if "sidecar" in line and host_port in line]  # shut down


def test_smoke_checksum_is_tp_independent_with_gpu_initialisation():
    """Issue 31, 9c: on a GPU megatron initialises each TP shard from the TP rank's RNG stream, so its random
    weights differ with TP; the smoke job loads seeded full HF weights through the trainer's loader instead, and
    its checksum at TP=2 equals TP=1 under the GPU setting (use_cpu_initialization=False), run here on CPU."""
    from megatron_opsd.parallel.distributed import ParallelConfig
    from megatron_opsd.parallel.launch import run_distributed
    from tests._workers_parallel import smoke_checksums_with_gpu_initialisation

    one = run_distributed(smoke_checksums_with_gpu_initialisation, 1)[0]
    two = run_distributed(smoke_checksums_with_gpu_initialisation, 2, ParallelConfig(tensor_model_parallel_size=2))
    for rank in two:
        for key in ("sum", "abs_sum"):
            assert rank["seeded"][key] == pytest.approx(one["seeded"][key], rel=1e-6, abs=1e-6)
    # the control: megatron's GPU-style initialisation alone gives a different model at TP=2
    assert two[0]["megatron_init"]["abs_sum"] != pytest.approx(one["megatron_init"]["abs_sum"], rel=1e-3)


def test_torchrun_script_tells_the_other_nodes_a_routable_address():
    """torchrun's MASTER_ADDR is rendezvous rank 0's --local-addr, else its host name (127.x in many containers):
    the script passes this node's address on its route to RDZV_HOST, or LOCAL_ADDR when given, and nothing when
    RDZV_HOST does not resolve (torchrun's own default then)."""
    def rendered(**extra):
        proc = subprocess.run(["bash", str(TORCHRUN), "true"], env=_env(DRY_RUN=1, NNODES=2, **extra),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return shlex.split(proc.stdout)

    assert option(rendered(RDZV_HOST="127.0.0.1"), "--local-addr") == "127.0.0.1"
    assert option(rendered(RDZV_HOST="127.0.0.1", LOCAL_ADDR="10.1.2.3"), "--local-addr") == "10.1.2.3"
    assert "--local-addr" not in rendered(RDZV_HOST="no-such-node-x1")
