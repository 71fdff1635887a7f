"""What a run directory may hold when a run starts again, so nothing is overwritten silently.

A run resumes by default (``checkpoint.resume: true``) from the newest complete checkpoint of its directory, as
Megatron-LM's ``--load`` and NeMo-RL's checkpoint directory do: a crashed, killed or slurm-requeued job continues
when the same command runs again. ``checkpoint.resume: false`` over a directory that holds a checkpoint is refused
(it would replace that run's checkpoints and mix two runs' metrics). Either way ``metrics.jsonl`` keeps one row
per step: rows past the step the run starts from (a killed step, or a run without a checkpoint) are dropped.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_opsd.errors import UsageError
from megatron_opsd.training.checkpoint import latest_checkpoint

METRICS_FILE = "metrics.jsonl"


def checkpoint_root(cfg) -> Path:
    """Where the run's checkpoints go: ``checkpoint.dir``, else ``<logging.dir>/checkpoints``."""
    return Path(cfg.checkpoint.dir or Path(cfg.logging.dir) / "checkpoints")


def refuse_overwrite(cfg) -> None:
    """Raise UsageError when ``checkpoint.resume`` is off and the checkpoint directory already holds a checkpoint."""
    root = checkpoint_root(cfg)
    found = None if cfg.checkpoint.resume else latest_checkpoint(root)
    if found is not None:
        raise UsageError(f"checkpoint.resume: false, but {root} holds {found.name} of an earlier run; resume it "
                         "(drop checkpoint.resume=false: resuming is the default), or choose a new logging.dir / "
                         "checkpoint.dir")


def _row_step(line: str) -> float:
    """A row's step; a torn last line (the process was killed mid-write) or a blank one counts as past any step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return float("inf")


def drop_metrics_after(run_dir: Path, step: int) -> int:
    """Keep the rows of ``run_dir/metrics.jsonl`` with ``step <= step`` (rewritten in place, so an append handle
    already open on the file stays valid); returns how many rows were dropped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _row_step(line) <= step]
    if len(kept) != len(lines):
        with open(path, "r+") as f:
            f.write("".join(kept))
            f.truncate()
    return len(lines) - len(kept)
