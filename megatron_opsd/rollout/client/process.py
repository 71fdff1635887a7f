"""Start and stop a sidecar as a subprocess (tests, the trainer on one machine, the demo).

The sidecar is started through ``megatron_opsd.lifecycle``: it runs in its own process group (its vLLM workers
included) and dies with the process that started it, also when that one is SIGKILLed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.config import ConfigError
from megatron_opsd.lifecycle import start_process, stop_process
from megatron_opsd.parallel.distributed import free_port
from megatron_opsd.rollout.client.auth import run_secret
from megatron_opsd.rollout.client.sidecar_client import SidecarClient, SidecarError
from megatron_opsd.rollout.environment import prepare_vllm_env
from megatron_opsd.rollout.secret import SECRET_ENV, SECRET_FILE_ENV


class SidecarProcess:
    """A running ``megatron-opsd sidecar``; ``stop()`` (or leaving the ``with`` block) terminates it."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path, secret: str):
        self.proc, self.url, self.log_path = proc, url, log_path
        self.secret = secret  # what its clients send (``SidecarClient(url, secret=...)``; default: the run's)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the sidecar's process group, as a crash would."""
        stop_process(self.proc, grace_s=0.0)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (a clean server stop), SIGKILL after ``timeout_s``; always reaps the whole process group."""
        stop_process(self.proc, grace_s=timeout_s)

    def __enter__(self) -> "SidecarProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def refuse_local_sidecar_on_gpu(sidecar_urls: list) -> None:
    """A local sidecar would start vLLM on rank 0's own training GPU (already full with the model, the teacher and
    the optimizer, and vLLM then asks for 90% of it): on CUDA, sidecars run on their own GPUs and are named."""
    if not sidecar_urls and torch.cuda.is_available():
        raise ConfigError("rollout.sidecar_urls is empty, so rank 0 would start vLLM on its own training GPU: start "
                          "sidecars on GPUs of their own (`megatron-opsd sidecar --model DIR --port 8000`, or "
                          "examples/launch/opsd.sbatch) and set rollout.sidecar_urls=http://HOST:8000[,...]")


def sidecar_env(base: dict) -> dict:
    """The environment a sidecar process starts with: ``base`` plus vLLM's settings, never over the user's own.

    ``VLLM_WORKER_MULTIPROC_METHOD=spawn``: the server touches CUDA (``torch.cuda.is_available()``) before vLLM
    starts its engine core and tensor-parallel workers, and a forked child cannot re-initialise CUDA (TRL sets the
    same); see ``engine.prepare_vllm_env``.
    """
    return prepare_vllm_env(str(Path(tempfile.gettempdir()) / "opsd-vllm-cache"), environ=dict(base))


def start_sidecar_process(model_dir: str | Path, port: Optional[int] = None, *, host: str = "127.0.0.1",
                          log_path: Optional[str | Path] = None, startup_timeout_s: float = 900.0,
                          env: Optional[dict] = None, secret: Optional[str] = None, **options) -> SidecarProcess:
    """Run ``python -m megatron_opsd.cli sidecar --model DIR`` and wait until /health answers.

    ``options`` become command-line flags (``max_model_len=256`` -> ``--max-model-len 256``; ``True`` -> a
    bare flag). The server's output goes to ``log_path`` (a temporary file by default), quoted in the error
    if it dies or does not come up in time. Every route but ``/health`` then needs ``secret`` (default the run's,
    ``auth.run_secret``: created and exported here if the environment has none, so this process's clients send it);
    the sidecar gets it in its environment, never on its command line.
    """
    port = port or free_port()
    log_path = Path(log_path or tempfile.mkstemp(prefix=f"opsd-sidecar-{port}-", suffix=".log")[1])
    cmd = [sys.executable, "-m", "megatron_opsd.cli", "sidecar", "--model", str(model_dir), "--host", host,
           "--port", str(port)]
    for key, value in options.items():
        if value is None or value is False:
            continue
        cmd.append("--" + key.replace("_", "-"))
        if value is not True:
            cmd.append(str(value))
    secret = secret or (env or {}).get(SECRET_ENV) or run_secret()
    child_env = sidecar_env({**os.environ, "HF_HUB_OFFLINE": "1", **(env or {}), SECRET_ENV: secret})
    child_env.pop(SECRET_FILE_ENV, None)
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = start_process(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    sidecar = SidecarProcess(proc, f"http://{host}:{port}", log_path, secret)
    try:
        _wait_until_healthy(sidecar, startup_timeout_s)
    except BaseException:  # also SIGTERM's SystemExit or Ctrl-C while waiting: never leave it running
        sidecar.stop()
        raise
    return sidecar


def _wait_until_healthy(sidecar: SidecarProcess, startup_timeout_s: float) -> None:
    deadline = time.monotonic() + startup_timeout_s
    with SidecarClient(sidecar.url, timeout_s=5.0, retries=1) as client:
        while True:
            if not sidecar.alive():
                raise SidecarError(f"sidecar exited with code {sidecar.proc.returncode} during start-up; log "
                                   f"{sidecar.log_path}:\n{sidecar.log_tail()}")
            try:
                client.wait_healthy(timeout_s=1.0, poll_s=0.5)
                return
            except SidecarError:
                if time.monotonic() > deadline:
                    raise SidecarError(f"sidecar not healthy after {startup_timeout_s:.0f} s; log "
                                       f"{sidecar.log_path}:\n{sidecar.log_tail()}") from None
