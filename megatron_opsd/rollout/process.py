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

from megatron_opsd.lifecycle import start_process, stop_process
from megatron_opsd.rollout.client import SidecarClient, SidecarError


class SidecarProcess:
    """A running ``megatron-opsd sidecar``; ``stop()`` (or leaving the ``with`` block) terminates it."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc, self.url, self.log_path = proc, url, log_path

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


def start_sidecar_process(model_dir: str | Path, port: Optional[int] = None, *, host: str = "127.0.0.1",
                          log_path: Optional[str | Path] = None, startup_timeout_s: float = 300.0,
                          env: Optional[dict] = None, **options) -> SidecarProcess:
    """Run ``python -m megatron_opsd.cli sidecar --model DIR`` and wait until /health answers.

    ``options`` become command-line flags (``max_model_len=256`` -> ``--max-model-len 256``; ``True`` -> a
    bare flag). The server's output goes to ``log_path`` (a temporary file by default), quoted in the error
    if it dies or does not come up in time.
    """
    from megatron_opsd.parallel.launch import free_port

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
    child_env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", HF_HUB_OFFLINE="1", **(env or {}))
    child_env.setdefault("VLLM_CACHE_ROOT", str(Path(tempfile.gettempdir()) / "opsd-vllm-cache"))
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = start_process(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env)
    sidecar = SidecarProcess(proc, f"http://{host}:{port}", log_path)
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
