"""Host-memory files a killed run left behind, removed when the next sidecar starts.

A SIGKILLed run cannot clean up: its weight-staging directories (``opsd-update-p<pid>-*``, ``sidecar/staging.py``),
the shm transport's bucket files (``opsd-weights-<pid>-*``, ``client/sidecar_client.py``) and the POSIX shared-memory
segments of vLLM's worker message queues (``psm_*``: vLLM 0.32's ``ShmRingBuffer``,
``distributed/device_communicators/shm_broadcast.py``, creates them with
``shared_memory.SharedMemory(create=True, size=self.total_bytes_of_buffer)``, unlinked only by a live owner) stay in ``/dev/shm``, which is RAM (issue 32 found about 840 MB after a few SIGKILLs).

Nothing that a live process may still use is removed: our staging files carry their creator's pid and go only when
that pid is dead; a ``psm_*`` segment carries no pid, so it goes only when it belongs to this user, is older than a
minute (a segment between its creation and its mapping), and no process maps it or holds it open (read from
``/proc/*/maps`` and ``/proc/*/fd``); if a process of this user cannot be read the segments are left alone.
The pid test assumes the processes sharing a ``/dev/shm`` share one pid namespace (one host or one container).
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Optional

from megatron_opsd.rollout.protocol import SHM_BUCKET_PREFIX, STAGING_DIR_PREFIX

logger = logging.getLogger(__name__)

_OWNED = re.compile(rf"^(?:{re.escape(STAGING_DIR_PREFIX)}|{re.escape(SHM_BUCKET_PREFIX)})(\d+)-")
SHM_SEGMENT_PREFIX = "psm_"
SHM_DIR = Path("/dev/shm")


def pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_pid(name: str) -> Optional[int]:
    """The creating pid in the name of one of our staging entries, None for anything else."""
    match = _OWNED.match(name)
    return int(match.group(1)) if match else None


def _paths_in_use(shm_dir: Path) -> Optional[set[str]]:
    """Paths under ``shm_dir`` that a process maps or holds open; None when such a process could not be read.
    Not root, only this user's processes are read: others cannot open a segment created ``0600`` (as
    ``multiprocessing.shared_memory`` does), and their ``/proc`` entries are not ours to read."""
    used, prefix, uid = set(), str(shm_dir) + "/", os.getuid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if uid != 0 and proc.stat().st_uid != uid:
                continue
            used.update(line.split(None, 5)[-1].strip() for line in (proc / "maps").read_text().splitlines()
                        if prefix in line)
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    used.add(target)
        except FileNotFoundError:
            continue  # it exited while we looked
        except PermissionError:
            if uid != 0:
                return None  # a process of this user we cannot read: it might use any segment of ours
            # root reads every process but those the kernel itself hides (a sandbox's pid 1): skip those
    return {path.removesuffix(" (deleted)") for path in used}


def _ours_and_old(path: Path, min_age_s: float) -> bool:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return stat.st_uid == os.getuid() and time.time() - stat.st_mtime > min_age_s


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_dead_leftovers(roots: Optional[Iterable[str | Path]] = None, shm_dir: Path = SHM_DIR,
                         min_age_s: float = 60.0) -> list[Path]:
    """Remove what dead runs left (module docstring) from ``shm_dir`` and the staging ``roots`` (default: every
    place ``staging.staging_root`` may choose); returns what went."""
    removed = []
    if roots is None:
        roots = [tempfile.gettempdir(), os.environ.get("OPSD_STAGING_DIR")]
    dirs = {Path(d) for d in [shm_dir, *roots] if d}
    for directory in dirs:
        for path in (directory.iterdir() if directory.is_dir() else ()):
            pid = owner_pid(path.name)
            if pid is not None and pid != os.getpid() and not pid_alive(pid):
                _remove(path)
                removed.append(path)
    segments = [p for p in (shm_dir.iterdir() if shm_dir.is_dir() else ()) if p.name.startswith(SHM_SEGMENT_PREFIX)]
    segments = [p for p in segments if _ours_and_old(p, min_age_s)]
    in_use = _paths_in_use(shm_dir) if segments else set()
    if in_use is not None:
        for path in segments:
            if str(path) not in in_use:
                _remove(path)
                removed.append(path)
    if removed:
        logger.info("removed %d files of dead runs from %s", len(removed), ", ".join(sorted(map(str, dirs))))
    return removed
