"""Atomic, resumable training checkpoints with megatron ``dist_checkpointing`` (torch_dist format).

Layout under ``root``::

    step-N/            a complete checkpoint: dist_checkpointing files (model, optimizer, extra models, per-rank
                       RNG) + common.pt (step, scheduler, data/extra state) + config.yaml + opsd_checkpoint.json
    tmp-step-N/        a save in progress (or a crashed one): never loaded, removed by the next save
    latest             the name of the newest complete checkpoint, replaced atomically (temp file + os.replace)

A save writes everything into ``tmp-step-N``, waits for all ranks, writes ``opsd_checkpoint.json`` last, renames
the directory to ``step-N`` and only then points ``latest`` at it: a crash at any point leaves the previous
checkpoint and ``latest`` intact. Model weights are saved as ShardedTensors (reloadable at another TP/PP layout),
the distributed optimizer in the chosen OPTIMIZER_SHARDINGS format; the RNG states (python, numpy, torch,
megatron's tracker) are saved per global rank and restored only at the same world size.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import yaml
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_opsd.models.gpt import unwrap
from megatron_opsd.parallel import control

logger = logging.getLogger(__name__)

STEP_PREFIX = "step-"
TMP_PREFIX = "tmp-"
LATEST_FILE = "latest"
MARKER_FILE = "opsd_checkpoint.json"
FORMAT_VERSION = 1
_RNG_KEY = "opsd.rng_state"
# Distributed-optimizer state formats of megatron 0.16: "dp_reshardable" (Megatron-LM's default: each rank writes
# its own optimizer shard, no gather; reload only at the same TP/PP) and "fully_reshardable" (gathered per
# parameter on DP rank 0: reloadable at any TP/PP/DP, more memory and time at save).
OPTIMIZER_SHARDINGS = ("dp_reshardable", "fully_reshardable")
_RESERVED = {"optimizer", "scheduler", "step", "world_size", "format_version", "data_state", "extra_state"}


@dataclass
class LoadedCheckpoint:
    """What ``load_checkpoint`` restores besides the tensors: the step, the caller's data position and extra
    state (exactly as given to ``save_checkpoint``), and where it came from."""

    step: int
    path: Path
    data_state: dict = field(default_factory=dict)
    extra_state: dict = field(default_factory=dict)
    rng_restored: bool = True


def _chunk_key(name: str, i: int, n: int) -> str:
    return name if n == 1 else f"{name}{i}"


def _rank() -> int:
    return torch.distributed.get_rank()


def _barrier() -> None:
    """On the control group: between these barriers rank 0 alone renames and deletes checkpoint directories."""
    control.barrier()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _check_extra_models(extra_models: Optional[dict]) -> None:
    """Before any collective: an extra model's name must not clash with the checkpoint's own keys."""
    for name in extra_models or {}:
        if name in _RESERVED or re.fullmatch(r"model\d*", name) or name.startswith("opsd"):
            raise ValueError(f"extra_models name {name!r} is reserved: pick another (e.g. 'teacher', 'ema')")


def _sharded_state_dict(model_chunks: list, optimizer, extra_models: Optional[dict], is_loading: bool,
                        optimizer_sharding: str) -> dict:
    """Model chunks under ``model`` (``model0..`` with virtual stages), the optimizer, and each extra model's
    chunks under its own name with its ShardedTensor keys prefixed by ``<name>.`` (so they do not clash)."""
    state = {_chunk_key("model", i, len(model_chunks)): unwrap(chunk).sharded_state_dict()
             for i, chunk in enumerate(model_chunks)}
    if optimizer is not None:
        model_state = dict(state)
        metadata = {"distrib_optim_sharding_type": optimizer_sharding, "chained_optim_avoid_prefix": True}
        state["optimizer"] = optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
    for name, chunks in (extra_models or {}).items():
        for i, chunk in enumerate(chunks):
            state[_chunk_key(name, i, len(chunks))] = unwrap(chunk).sharded_state_dict(prefix=f"{name}.")
    return state


def _ensure_optimizer_state(optimizer) -> None:
    """Create empty Adam states (zeros, step 0) before a load: megatron's distributed optimizer builds its load
    mapping from ``state_dict()``, which without Apex/TE asserts that every parameter has a ``step``."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or getattr(opt, "init_state_fn", None) is None:
            continue
        opt.init_state_fn(inner, opt.config)
        for group in inner.param_groups:
            for param in group["params"]:
                inner.state[param].setdefault("step", torch.zeros((), dtype=torch.float32))


@contextlib.contextmanager
def _without_adam_steps(optimizer):
    """Without Apex/TE, megatron 0.16's fully_reshardable optimizer format does not store torch Adam's ``step``
    but its loader copies every state key (KeyError 'step'): hide ``step`` from that copy during a load;
    ``_restore_adam_steps`` sets it afterwards."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        original = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if original is None:
            continue

        def set_states(model_param, tensors, original=original, opt=opt):
            group, order = opt.model_param_group_index_map[model_param]
            state = opt.optimizer.state[opt.optimizer.param_groups[group]["params"][order]]
            step = state.pop("step", None) if "step" not in tensors else None
            try:
                original(model_param, tensors)
            finally:
                if step is not None:
                    state["step"] = step

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # back to the class method


def _restore_adam_steps(optimizer) -> None:
    """Without Apex/TE, megatron 0.16's DistributedOptimizer.load_state_dict leaves torch Adam's per-parameter
    ``step`` wrong (measured: 0 after loading a step-2 checkpoint, and one tensor shared by all parameters, which
    torch increments once per parameter), so the bias correction after a resume differs. The param groups carry
    the right common step: give every parameter its own copy of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in (inner.param_groups if inner is not None else ()):
            if "step" not in group:
                continue
            for param in group["params"]:
                if "step" in inner.state.get(param, {}):
                    inner.state[param]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def _rng_object(data) -> ShardedObject:
    world = torch.distributed.get_world_size()
    return ShardedObject(_RNG_KEY, data, (world,), (_rank(),), replica_id=0)


def _is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file()


def _step_dirs(root: Path) -> list:
    """Complete checkpoints under ``root``, oldest first."""
    found = []
    for path in root.glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX):]
        if suffix.isdigit() and _is_complete(path):
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, or the newest complete ``step-N`` if that one is missing; None if none."""
    root = Path(root)
    latest = root / LATEST_FILE
    if latest.is_file():
        path = root / latest.read_text().strip()
        if _is_complete(path):
            return path
        logger.warning("%s names %s, which is not a complete checkpoint: using the newest complete one",
                       latest, path)
    steps = _step_dirs(root)
    return steps[-1] if steps else None


def write_text_atomic(path: Path, text: str) -> None:
    """``path`` holds either its old content or ``text``, never a partial write (temp file + os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, model_chunks: list, optimizer=None, scheduler=None, *,
                    data_state: Optional[dict] = None, extra_state: Optional[dict] = None,
                    extra_models: Optional[dict] = None, config_dict: Optional[dict] = None,
                    keep_last: Optional[int] = None, optimizer_sharding: str = "dp_reshardable") -> Path:
    """Collective (all ranks): save ``root/step-<step>`` atomically and point ``root/latest`` at it.

    ``data_state`` / ``extra_state``: picklable dicts, identical on all ranks (rank 0's copy is saved).
    ``extra_models``: name -> model chunks (teacher, EMA) saved sharded like the student. ``config_dict`` is
    written as ``config.yaml`` inside the checkpoint. ``keep_last``: keep only the newest N checkpoints.
    ``optimizer_sharding``: one of OPTIMIZER_SHARDINGS (see there).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if optimizer_sharding not in OPTIMIZER_SHARDINGS:
        raise ValueError(f"optimizer_sharding must be one of {OPTIMIZER_SHARDINGS}, got {optimizer_sharding!r}")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"checkpoint.keep_last must be >= 1 (or None to keep all), got {keep_last}")
    _check_extra_models(extra_models)
    root = Path(root)
    final, tmp = root / f"{STEP_PREFIX}{step}", root / f"{TMP_PREFIX}{STEP_PREFIX}{step}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{TMP_PREFIX}*"):  # crashed earlier saves
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()

    if optimizer is not None:  # a save before the first step (e.g. nothing passed the filter yet)
        _ensure_optimizer_state(optimizer)  # never overwrites existing Adam state
    state = _sharded_state_dict(model_chunks, optimizer, extra_models, False, optimizer_sharding)
    state[_RNG_KEY] = _rng_object(_rng_state())
    state.update(step=step, world_size=torch.distributed.get_world_size(), format_version=FORMAT_VERSION,
                 scheduler=scheduler.state_dict() if scheduler is not None else None,
                 data_state=dict(data_state or {}), extra_state=dict(extra_state or {}))
    dist_checkpointing.save(state, str(tmp))
    _barrier()

    if _rank() == 0:
        if config_dict is not None:
            (tmp / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))
        (tmp / MARKER_FILE).write_text(json.dumps({"step": step, "format_version": FORMAT_VERSION,
                                                   "world_size": torch.distributed.get_world_size(),
                                                   "optimizer_sharding": optimizer_sharding}))
        replaced = root / f"{TMP_PREFIX}replaced-{final.name}"
        if final.exists():  # re-saving a step (e.g. after a resume): keep the old one until the new one is in
            os.replace(final, replaced)
        os.replace(tmp, final)
        write_text_atomic(root / LATEST_FILE, final.name)
        shutil.rmtree(replaced, ignore_errors=True)
        if keep_last is not None:
            for old in _step_dirs(root)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | Path, model_chunks: list, optimizer=None, scheduler=None, *,
                    extra_models: Optional[dict] = None, restore_rng: bool = True) -> LoadedCheckpoint:
    """Collective: restore the model chunks, optimizer, scheduler, extra models and (same world size only) the
    per-rank RNG states from the checkpoint directory ``path``; returns step, data and extra state."""
    path = Path(path)
    _check_extra_models(extra_models)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER_FILE}): pass a step-N directory "
                                "or use load_latest(root)")
    meta = json.loads((path / MARKER_FILE).read_text())
    same_world = meta["world_size"] == torch.distributed.get_world_size()
    if restore_rng and not same_world:
        logger.warning("checkpoint %s was saved by %d ranks, this run has %d: RNG states are not restored",
                       path, meta["world_size"], torch.distributed.get_world_size())
    restore_rng = restore_rng and same_world

    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
    state = _sharded_state_dict(model_chunks, optimizer, extra_models, True, meta["optimizer_sharding"])
    if restore_rng:
        state[_RNG_KEY] = _rng_object(_rng_state())
    loaded = dist_checkpointing.load(state, str(path))

    for i, chunk in enumerate(model_chunks):
        unwrap(chunk).load_state_dict(loaded[_chunk_key("model", i, len(model_chunks))], strict=True)
    for name, chunks in (extra_models or {}).items():
        for i, chunk in enumerate(chunks):
            prefixed = loaded[_chunk_key(name, i, len(chunks))]
            unwrap(chunk).load_state_dict({k[len(name) + 1:]: v for k, v in prefixed.items()}, strict=True)
    if optimizer is not None:
        with torch.no_grad(), _without_adam_steps(optimizer):  # main params may be views of model params
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if scheduler is not None:
        if loaded["scheduler"] is None:
            raise ValueError(f"{path} has no scheduler state (saved without a scheduler): pass scheduler=None")
        scheduler.load_state_dict(loaded["scheduler"])
    if restore_rng:
        _set_rng_state(loaded[_RNG_KEY])
    return LoadedCheckpoint(step=int(loaded["step"]), path=path, data_state=loaded["data_state"],
                            extra_state=loaded["extra_state"], rng_restored=restore_rng)


def load_latest(root: str | Path, model_chunks: list, optimizer=None, scheduler=None, *,
                extra_models: Optional[dict] = None, restore_rng: bool = True) -> Optional[LoadedCheckpoint]:
    """``load_checkpoint`` of ``latest_checkpoint(root)``; None (nothing restored) when there is none yet."""
    path = latest_checkpoint(root)
    if path is None:
        return None
    return load_checkpoint(path, model_chunks, optimizer, scheduler, extra_models=extra_models,
                           restore_rng=restore_rng)
