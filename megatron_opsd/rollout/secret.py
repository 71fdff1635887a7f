"""The run's secret, shared by the trainer-side client and the sidecar: where it lives and the keys derived from it.

Without it, anyone who can reach a sidecar's port could push weights into the model the trainer samples from,
pause it, or use it for generation; vLLM's ``--api-key`` guards only its ``/v1`` routes, not the ones we mount.

- **Where the secret lives**: ``$OPSD_SIDECAR_SECRET``, or a file readable only by its owner named by
  ``$OPSD_SIDECAR_SECRET_FILE`` (``rollout.secret_env`` / ``rollout.secret_file`` pick others). Never a command-line
  argument: ``ps`` and ``/proc/*/cmdline`` show those to every user of the machine. The trainer side reads or makes
  it (``client/auth.py``), the sidecar guards its routes with it (``sidecar/auth.py``).
- **Weight-transfer rendezvous** (``rollout/transfer.py``): torch's TCPStore has no authentication, so the group's
  keys live under a prefix derived from a one-time key, ``HMAC(secret, nonce)`` with a fresh nonce per rendezvous
  (``rendezvous_key``), which the trainer and the sidecar each compute from the secret (the key itself never
  travels); once the group has formed, every member proves the key to every other (``verify_members``) before a
  tensor is sent. What a stranger can and cannot do there is in docs/sidecar.md ("Access").
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from datetime import timedelta
from pathlib import Path

import torch

from megatron_opsd.errors import UsageError

SECRET_ENV = "OPSD_SIDECAR_SECRET"
SECRET_FILE_ENV = "OPSD_SIDECAR_SECRET_FILE"


def new_secret() -> str:
    return secrets.token_urlsafe(32)  # 256 random bits


def read_secret_file(path: str | os.PathLike, field: str = SECRET_FILE_ENV) -> str:
    """The secret in ``path``; a ``UsageError`` naming ``field`` if it is missing, empty or readable by others."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
        text = path.read_text().strip()
    except OSError as err:
        raise UsageError(f"{field}: cannot read the secret file {path} ({err.strerror}); create it readable only by "
                         f"you, e.g. `megatron-opsd sidecar --secret-file {path} ...` creates one") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"{field}: {path} is readable by others (mode {stat.filemode(mode)}); chmod 600 {path}")
    if not text:
        raise UsageError(f"{field}: {path} is empty; put the secret in it (one line)")
    return text


def write_secret_file(path: str | os.PathLike, secret: str) -> Path:
    """Create ``path`` (it must not exist: a link planted there is not followed) readable only by its owner."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return path


def rendezvous_key(secret: str, nonce: str) -> str:
    """The one-time key of one weight-transfer rendezvous: only holders of the secret can compute it."""
    if not nonce:
        raise ValueError("init_info.nonce: missing; the trainer sends a fresh nonce with every rendezvous")
    return hmac.new(secret.encode(), f"opsd-weights/rendezvous/{nonce}".encode(), hashlib.sha256).hexdigest()


def store_prefix(key: str) -> str:
    """Where the group's keys live in the TCPStore (TCPStore cannot list keys, so they cannot be found without
    the key). A one-way function of the key: a store key seen on the wire does not give away the key."""
    return "opsd-weights/" + hashlib.sha256(f"store/{key}".encode()).hexdigest()


def member_tag(key: str, rank: int) -> bytes:
    return hmac.new(key.encode(), f"member/{rank}".encode(), hashlib.sha256).digest()


def verify_members(group, key: str, rank: int, world_size: int, timeout_s: float, device: str = "cpu") -> None:
    """COLLECTIVE over the fresh group: each rank in turn broadcasts its tag ``HMAC(key, rank)``, and every rank checks
    every other's before any weight moves, so a process that took a member's place in the group without the key
    (say by connecting to one of gloo's listening sockets first) is caught on both sides. Broadcast is the one
    collective the transfer itself uses, on gloo and NCCL alike."""
    timeout = timedelta(seconds=timeout_s)
    impostors = []
    for src in range(world_size):
        tag = torch.frombuffer(bytearray(member_tag(key, src)), dtype=torch.uint8)
        buffer = tag.to(device) if src == rank else torch.empty(tag.numel(), dtype=torch.uint8, device=device)
        group.broadcast(buffer, src, timeout).wait(timeout)
        if src != rank and not hmac.compare_digest(bytes(buffer.cpu().tolist()), bytes(tag.tolist())):
            impostors.append(src)
    if impostors:
        raise PermissionError(f"weight-transfer group: rank(s) {impostors} did not prove the run's secret; refusing to "
                              "transfer weights (is a process other than the trainer and the sidecar's workers on "
                              "this port?)")
