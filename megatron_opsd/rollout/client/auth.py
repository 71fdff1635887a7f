"""Trainer side of who may use a sidecar: the run's secret (``rollout/secret.py``) and the header every call carries."""
from __future__ import annotations

import os
from typing import Mapping, Optional

from megatron_opsd.errors import UsageError
from megatron_opsd.rollout.secret import SECRET_ENV, SECRET_FILE_ENV, new_secret, read_secret_file


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


def bearer(secret: Optional[str]) -> dict[str, str]:
    """The header every call to a sidecar carries (none without a secret: the sidecar then answers 401)."""
    return {"Authorization": f"Bearer {secret}"} if secret else {}
