"""Server-side staging of a weight update, so that a half-received update is never applied.

Buckets (safetensors bytes) are validated on arrival against the served checkpoint's tensor names and
shapes and written, in the served dtype, to a staging directory (``/dev/shm`` when it has room: host memory);
only ``commit`` hands the files to vLLM's workers (each reads them itself, at any TP), and only once every
expected tensor is present. A bucket carries an index, so re-sending it (a client retry) replaces it instead of
duplicating tensors. An update that ends without a commit leaves no files behind.
"""
from __future__ import annotations

import itertools
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.rollout.protocol import STAGING_DIR_PREFIX


class WeightUpdateError(ValueError):
    """A bad update request; ``status`` is the HTTP code the server answers with."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def check_version(version: int, current_version: int, restore: bool = False, field: str = "version") -> None:
    """An ordinary push must move the version forward (a lower or equal one is a stale trainer or another run's).
    A restore may set any version >= 0: a resumed trainer giving a running sidecar its checkpoint's weights, whose
    step is at or below what the sidecar already served (``SidecarClient.push_weights``)."""
    if restore:
        if version < 0:
            raise WeightUpdateError(f"{field}: {version} is negative; a restore sets the checkpoint's step (>= 0)")
    elif version <= current_version:
        raise WeightUpdateError(f"{field}: {version} must be greater than the current weight version "
                                f"{current_version}")


@dataclass
class StagedUpdate:
    update_id: str
    version: int
    num_tensors: Optional[int]
    directory: Path
    started: float = field(default_factory=time.perf_counter)
    bucket_bytes: dict[int, int] = field(default_factory=dict)  # bucket index -> bytes staged
    owner: dict[str, int] = field(default_factory=dict)  # tensor name -> bucket index

    @property
    def nbytes(self) -> int:
        return sum(self.bucket_bytes.values())

    def bucket_path(self, index: int) -> Path:
        return self.directory / f"bucket-{index:06d}.safetensors"

    @property
    def files(self) -> list[str]:
        return [str(self.bucket_path(i)) for i in sorted(self.bucket_bytes)]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The staged tensors, read back (tests, small updates)."""
        from safetensors.torch import load_file

        return {k: v for path in self.files for k, v in load_file(path).items()}

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


STAGING_DIR_ENV = "OPSD_STAGING_DIR"


def staging_root(update_bytes: int) -> str:
    """Where an HTTP/shm update is staged: ``$OPSD_STAGING_DIR`` if set, else ``/dev/shm`` (host memory, what the
    shm transport uses too) when it has room for the whole update, else the temp directory. Containers often
    mount a 64 MB ``/dev/shm``, which a real update would overflow half-way."""
    if os.environ.get(STAGING_DIR_ENV):
        return os.environ[STAGING_DIR_ENV]
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free >= 1.1 * update_bytes:
        return str(shm)
    return tempfile.gettempdir()


class WeightStager:
    """Holds at most one update in flight; a new ``begin`` discards an abandoned one (e.g. a restarted trainer)."""

    def __init__(self, tensor_specs: dict[str, tuple[tuple[int, ...], str]], dtype: torch.dtype,
                 optional: frozenset[str] = frozenset()):
        self.specs = tensor_specs
        self.dtype = dtype
        self.optional = optional  # accepted but not required (the LM head of a tied model)
        self._lock = threading.Lock()
        self._update: Optional[StagedUpdate] = None
        self._ids = itertools.count()

    def begin(self, version: int, current_version: int, num_tensors: Optional[int] = None,
              restore: bool = False) -> str:
        check_version(version, current_version, restore)
        if num_tensors is not None and not len(self.specs) <= num_tensors <= len(self.specs) + len(self.optional):
            raise WeightUpdateError(f"num_tensors: {num_tensors} does not match the model, which has "
                                    f"{len(self.specs)} tensors")
        with self._lock:
            update_id = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            self._replace(StagedUpdate(update_id, version, num_tensors,
                                       Path(tempfile.mkdtemp(prefix=f"{STAGING_DIR_PREFIX}{os.getpid()}-{update_id}-",
                                                            dir=staging_root(self.update_bytes())))))
            return update_id

    def update_bytes(self) -> int:
        """Bytes of a complete update in the served dtype."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return sum(math.prod(shape) for shape, _ in self.specs.values()) * itemsize

    def _replace(self, update: Optional[StagedUpdate]) -> None:
        if self._update is not None:
            self._update.discard()
        self._update = update

    def require(self, update_id: str) -> None:
        """Raise (409) unless ``update_id`` is the update in progress; cheap check before parsing a body."""
        with self._lock:
            self._get(update_id)

    def _get(self, update_id: str) -> StagedUpdate:
        if self._update is None or self._update.update_id != update_id:
            raise WeightUpdateError(f"update_id: {update_id!r} is not the update in progress (it was committed, "
                                    "aborted, replaced by a newer begin, or rejected); start again with "
                                    "POST /weights/begin", status=409)
        return self._update

    def add_bucket(self, update_id: str, index: int, tensors: dict[str, torch.Tensor]) -> int:
        """Validate and stage one bucket. Any bad tensor rejects the whole update (it can no longer commit)."""
        from safetensors.torch import save_file

        with self._lock:
            update = self._get(update_id)
            try:
                self._validate(update, index, tensors)
            except WeightUpdateError:
                self._replace(None)
                raise
            for name in [k for k, i in update.owner.items() if i == index]:  # a re-sent bucket replaces its tensors
                del update.owner[name]
            staged = {k: v.to(self.dtype).contiguous() for k, v in tensors.items()}
            save_file(staged, str(update.bucket_path(index)))
            update.bucket_bytes[index] = sum(t.numel() * t.element_size() for t in staged.values())
            update.owner.update({name: index for name in tensors})
            return len(update.owner)

    def _validate(self, update: StagedUpdate, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            raise WeightUpdateError(f"bucket {index}: contains no tensors")
        for name, tensor in tensors.items():
            self.check_tensor(name, tuple(tensor.shape), tensor.dtype)
            if update.owner.get(name, index) != index:
                raise WeightUpdateError(f"tensor {name!r}: already received in bucket {update.owner[name]}")

    def check_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Raise (422) unless ``name`` is a tensor of the served model with this shape and a float dtype."""
        if name not in self.specs and name not in self.optional:
            close = [k for k in self.specs if k.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]][:3]
            raise WeightUpdateError(f"tensor {name!r}: not a parameter of the served model (HF names expected, "
                                    f"e.g. {close or list(self.specs)[:3]})")
        expected = self.specs.get(name, (None,))[0]
        if expected is not None and tuple(shape) != expected:
            raise WeightUpdateError(f"tensor {name!r}: shape {tuple(shape)} does not match the served "
                                    f"model's {expected} (padded vocabulary rows must be stripped)")
        if not dtype.is_floating_point:
            raise WeightUpdateError(f"tensor {name!r}: dtype {dtype} is not a floating-point type")

    def check_announced(self, names: list[str], shapes: list[list[int]], dtype_names: list[str]) -> None:
        """Validate a whole update from its announced tensor list (collective transport: before any byte moves)."""
        for name, shape, dtype_name in zip(names, shapes, dtype_names):
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype):
                raise WeightUpdateError(f"tensor {name!r}: unknown dtype {dtype_name!r}")
            if dtype != self.dtype:
                raise WeightUpdateError(f"tensor {name!r}: dtype {dtype_name} differs from the served "
                                        f"{str(self.dtype).removeprefix('torch.')}; cast before sending")
            self.check_tensor(name, tuple(shape), dtype)
        if len(set(names)) != len(names):
            raise WeightUpdateError("names: a tensor is announced twice")
        missing = [k for k in self.specs if k not in set(names)]
        if missing:
            raise WeightUpdateError(f"names: {len(missing)} tensors of the served model are missing from the "
                                    f"update, e.g. {missing[:3]}; an update must replace every tensor")

    def take_for_commit(self, update_id: str) -> StagedUpdate:
        """Remove the update if complete; the caller applies it, then ``discard``s it. Incomplete updates stay."""
        with self._lock:
            update = self._get(update_id)
            missing = [k for k in self.specs if k not in update.owner]
            if missing:
                raise WeightUpdateError(f"update {update_id}: {len(missing)} tensors not received yet, e.g. "
                                        f"{missing[:3]}; nothing was applied", status=409)
            if update.num_tensors is not None and update.num_tensors != len(update.owner):
                raise WeightUpdateError(f"num_tensors: begin announced {update.num_tensors} tensors but "
                                        f"{len(update.owner)} arrived; nothing was applied", status=409)
            self._update = None
            return update

    def abort(self, update_id: Optional[str] = None) -> bool:
        with self._lock:
            if self._update is None or (update_id is not None and self._update.update_id != update_id):
                return False
            self._replace(None)
            return True

    @property
    def in_progress(self) -> Optional[str]:
        return None if self._update is None else self._update.update_id
