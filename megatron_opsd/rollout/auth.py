"""Who may use a sidecar: one shared secret per run, checked on every HTTP call and at the weight-transfer rendezvous.

Without it, anyone who can reach a sidecar's port could push weights into the model the trainer samples from,
pause it, or use it for generation; vLLM's ``--api-key`` guards only its ``/v1`` routes, not the ones we mount.

- **Where the secret lives**: ``$OPSD_SIDECAR_SECRET``, or a file readable only by its owner named by
  ``$OPSD_SIDECAR_SECRET_FILE`` (``rollout.secret_env`` / ``rollout.secret_file`` pick others). Never a command-line
  argument: ``ps`` and ``/proc/*/cmdline`` show those to every user of the machine. ``run_secret`` makes one for a
  run that has none and exports it in this process's environment, so every process the run starts and every
  client it creates use the same one.
- **HTTP**: ``RequireSecret`` wraps the whole app (our routes, vLLM's ``/v1/*``, ``/metrics``, anything mounted) and
  answers 401, before any route runs, to a request without ``Authorization: Bearer <secret>``; only ``GET /health``
  is open (launchers poll it while the engine starts). The comparison is constant-time over SHA-256 digests.
- **Weight-transfer rendezvous** (``rollout/collective.py``): torch's TCPStore has no authentication, so the group's
  keys live under a prefix derived from a one-time key, ``HMAC(secret, nonce)`` with a fresh nonce per rendezvous
  (``rendezvous_key``), which the trainer and the sidecar each compute from the secret (the key itself never
  travels); once the group has formed, every member proves the key to every other (``verify_members``) before a
  tensor is sent. What a stranger can and cannot do there is in docs/sidecar.md ("Access").
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Optional

import torch

from megatron_opsd.errors import UsageError

logger = logging.getLogger("megatron_opsd.sidecar")
SECRET_ENV = "OPSD_SIDECAR_SECRET"
SECRET_FILE_ENV = "OPSD_SIDECAR_SECRET_FILE"
OPEN_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})
REFUSED = ("missing or wrong sidecar secret: send 'Authorization: Bearer <secret>' with the run's secret "
           f"(${SECRET_ENV}, or the file named by ${SECRET_FILE_ENV})")


# ---------------------------------------------------------------------------------------------------- the secret
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


def find_secret(environ: Optional[Mapping[str, str]] = None, *, env: Optional[str] = None,
                file: Optional[str] = None) -> Optional[str]:
    """The secret from ``file`` if given, else ``$env`` (default ``$OPSD_SIDECAR_SECRET``), else the file named by
    ``$OPSD_SIDECAR_SECRET_FILE``; None when none of them is set."""
    environ = os.environ if environ is None else environ
    if file:
        return read_secret_file(file, "rollout.secret_file")
    if env and not environ.get(env):
        raise UsageError(f"rollout.secret_env: ${env} is not set; export the sidecars' secret in it")
    if environ.get(env or SECRET_ENV):
        return environ[env or SECRET_ENV]
    if environ.get(SECRET_FILE_ENV):
        return read_secret_file(environ[SECRET_FILE_ENV])
    return None


def run_secret() -> str:
    """The run's secret: the one the environment names, else a new one, exported as ``$OPSD_SIDECAR_SECRET`` in this
    process's environment so the sidecars, ranks and clients of this run share it (never on a command line)."""
    secret = find_secret()
    if secret is None:
        secret = os.environ[SECRET_ENV] = new_secret()
    return secret


def sidecar_secret(secret_file: Optional[str], port: int) -> tuple[str, Optional[Path]]:
    """The secret ``megatron-opsd sidecar`` guards its routes with: ``--secret-file`` (created with a new secret if it
    does not exist), else ``$OPSD_SIDECAR_SECRET``, else ``$OPSD_SIDECAR_SECRET_FILE``, else a new secret in a new
    temporary file (returned second, to be removed at exit). Either way its path is logged, never the secret; both
    variables are removed from this process's environment, so vLLM's engine and worker processes do not hold it."""
    secret, named = os.environ.pop(SECRET_ENV, None), os.environ.pop(SECRET_FILE_ENV, None)
    path = secret_file or (None if secret else named)
    if path and not Path(path).expanduser().exists():
        write_secret_file(path, new_secret())
        logger.info("wrote a new sidecar secret to %s (readable only by you): clients read it with "
                    "%s=%s", path, SECRET_FILE_ENV, path)
    if path:
        return read_secret_file(path, "--secret-file" if secret_file else SECRET_FILE_ENV), None
    if secret:
        return secret, None
    fd, name = tempfile.mkstemp(prefix=f"opsd-sidecar-{port}-", suffix=".secret")  # created 0600
    with os.fdopen(fd, "w") as handle:
        handle.write(new_secret() + "\n")
    created = Path(name)
    logger.warning("no %s, %s or --secret-file: every route but GET /health needs the secret written to %s (readable "
                   "only by you, removed at exit); clients read it with %s=%s", SECRET_ENV, SECRET_FILE_ENV, created,
                   SECRET_FILE_ENV, created)
    return read_secret_file(created), created


def bearer(secret: Optional[str]) -> dict[str, str]:
    """The header every call to a sidecar carries (none without a secret: the sidecar then answers 401)."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}


# ---------------------------------------------------------------------------------------------------- HTTP
def _digest(token: str | bytes) -> bytes:
    return hashlib.sha256(token if isinstance(token, bytes) else token.encode()).digest()


class RequireSecret:
    """ASGI middleware: every HTTP and websocket request without ``Authorization: Bearer <secret>`` is answered
    401 (websockets: closed with 1008) before any route or other middleware sees it; ``OPEN_ROUTES`` excepted.

    Added once around vLLM's whole app (``server.mount``) rather than per route, so routes that vLLM or a plugin adds
    later are guarded too (vLLM's own ``--api-key`` middleware guards only paths under ``/v1``, ``/v2``, ...)."""

    def __init__(self, app, secret: str, open_routes: frozenset = OPEN_ROUTES):
        if not secret:
            raise ValueError("secret: empty; the sidecar needs a secret to guard its routes")
        self.app, self.digest, self.open_routes = app, _digest(secret), open_routes

    def allowed(self, scope) -> bool:
        if scope["type"] == "http" and (scope["method"], scope["path"]) in self.open_routes:
            return True
        value = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        # constant time in the token (both sides hashed to 32 bytes): no timing hint about its length or prefix
        return hmac.compare_digest(_digest(token.strip()), self.digest) and scheme.lower() == b"bearer"

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.allowed(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        body = json.dumps({"detail": REFUSED}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b'Bearer realm="megatron-opsd sidecar"')]})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------- rendezvous
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
