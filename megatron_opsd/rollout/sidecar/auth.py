"""Sidecar side of who may use a sidecar: the secret it guards every route with (``rollout/secret.py`` says where
it lives), checked on every HTTP call before any route runs.

- ``sidecar_secret``: what ``megatron-opsd sidecar`` reads or creates (never from its command line).
- **HTTP**: ``RequireSecret`` wraps the whole app (our routes, vLLM's ``/v1/*``, ``/metrics``, anything mounted) and
  answers 401, before any route runs, to a request without ``Authorization: Bearer <secret>``; only ``GET /health``
  is open (launchers poll it while the engine starts). The comparison is constant-time over SHA-256 digests.
- The weight-transfer rendezvous's key is derived from the same secret (``secret.rendezvous_key``).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from megatron_opsd.rollout.secret import SECRET_ENV, SECRET_FILE_ENV, new_secret, read_secret_file, write_secret_file

logger = logging.getLogger("megatron_opsd.sidecar")
OPEN_ROUTES = frozenset({("GET", "/health"), ("HEAD", "/health")})
REFUSED = ("missing or wrong sidecar secret: send 'Authorization: Bearer <secret>' with the run's secret "
           f"(${SECRET_ENV}, or the file named by ${SECRET_FILE_ENV})")


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
