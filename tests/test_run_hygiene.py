"""Data safety of a run started again: a checkpointed run directory is never overwritten silently (resumed by
default, refused with checkpoint.resume=false), metrics.jsonl keeps one row per step, exports get the user's umask,
`export --peft-out` on a non-LoRA checkpoint is a one-line error, and what a killed run left in /dev/shm is removed
only when its owner is dead. Unit tests through the functions the trainer, the exporter and the sidecar call."""
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_opsd.cli import main as cli_main
from megatron_opsd.config import load_config
from megatron_opsd.errors import UsageError
from megatron_opsd.models.weights import replace_dir
from megatron_opsd.rollout.sidecar.leftovers import (SHM_BUCKET_PREFIX, STAGING_DIR_PREFIX, clean_dead_leftovers,
                                                     owner_pid)
from megatron_opsd.training.export_cli import refuse_peft_without_lora
from megatron_opsd.training.rundir import drop_metrics_after, refuse_overwrite


def fake_checkpoint(root: Path, step: int, lora_rank: int = 0) -> Path:
    path = root / f"step-{step}"
    path.mkdir(parents=True)
    (path / "opsd_checkpoint.json").write_text("{}")
    (path / "config.yaml").write_text(f"model:\n  path: /nowhere\n  lora:\n    rank: {lora_rank}\n")
    return path


def test_resume_is_the_default_and_no_resume_refuses_a_checkpointed_dir(tmp_path):
    fresh = load_config(None, [f"logging.dir={tmp_path / 'run'}", "checkpoint.resume=false"])
    refuse_overwrite(fresh)  # nothing there yet: a fresh start is fine
    fake_checkpoint(tmp_path / "run" / "checkpoints", 4)
    assert load_config(None, [f"logging.dir={tmp_path / 'run'}"]).checkpoint.resume is True
    refuse_overwrite(load_config(None, [f"logging.dir={tmp_path / 'run'}"]))
    with pytest.raises(UsageError, match=r"checkpoint.resume: false, but .*checkpoints holds step-4 of an earlier "
                                         r"run; resume it \(drop checkpoint.resume=false"):
        refuse_overwrite(fresh)


def test_metrics_keep_one_row_per_step(tmp_path):
    """Rows past the step a run starts from go (the killed step's row, a torn last line); an append handle opened
    before the truncation (the logger's) keeps writing after the kept rows."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    with open(path, "a") as handle:
        assert drop_metrics_after(tmp_path, 2) == 3
        handle.write(json.dumps({"step": 3, "loss": 30.0}) + "\n")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2] + [{"step": 3, "loss": 30.0}]
    assert drop_metrics_after(tmp_path, 3) == 0 and drop_metrics_after(tmp_path / "none", 0) == 0


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_exports_get_the_users_umask(tmp_path, umask):
    """The HF and PEFT writers finish through ``replace_dir``: mkdtemp's 0700 and a copied 0600 file become what
    mkdir/open give under the umask."""
    tmp = Path(tempfile.mkdtemp(dir=tmp_path))
    (tmp / "model.safetensors").write_bytes(b"x")
    (tmp / "model.safetensors").chmod(0o600)
    old = os.umask(umask)
    try:
        replace_dir(tmp, tmp_path / "hf")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "hf").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "hf" / "model.safetensors").stat().st_mode) == 0o666 & ~umask


def test_export_peft_out_needs_a_lora_run(tmp_path, capsys):
    fake_checkpoint(tmp_path / "checkpoints", 2)
    rc = cli_main(["export", "--checkpoint", str(tmp_path / "checkpoints"), "--out", str(tmp_path / "hf"),
                   "--peft-out", str(tmp_path / "adapter")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--peft-out: " in err and "is not a LoRA run" in err, err
    assert not (tmp_path / "hf").exists()
    refuse_peft_without_lora(fake_checkpoint(tmp_path / "lora", 3, lora_rank=16))  # a LoRA run passes the check


def test_leftovers_of_dead_runs_go_live_ones_stay(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staging = tmp_path / "staging"
        staging.mkdir()
        for pid in (dead.pid, live.pid):
            (staging / f"{STAGING_DIR_PREFIX}{pid}-0-abcd1234-xyz").mkdir()
            (staging / f"{SHM_BUCKET_PREFIX}{pid}-abcd1234-0.safetensors").write_bytes(b"x")
        (staging / "opsd-update-0-abcd1234-xyz").mkdir()  # the old name without a pid: not attributable, kept
        shm = tmp_path / "shm"
        shm.mkdir()
        for name in ("psm_orphan", "psm_held", "psm_new", "other_file"):
            (shm / name).write_bytes(b"x")
        hour_ago = os.stat(shm / "psm_orphan").st_mtime - 3600
        for name in ("psm_orphan", "psm_held", "other_file"):
            os.utime(shm / name, (hour_ago, hour_ago))
        with open(shm / "psm_held"):  # a live process holds it open (as vLLM's workers map their queues)
            removed = clean_dead_leftovers([staging], shm_dir=shm)
        assert sorted(p.name for p in removed) == sorted([f"{STAGING_DIR_PREFIX}{dead.pid}-0-abcd1234-xyz",
                                                          f"{SHM_BUCKET_PREFIX}{dead.pid}-abcd1234-0.safetensors",
                                                          "psm_orphan"])
        assert sorted(p.name for p in shm.iterdir()) == ["other_file", "psm_held", "psm_new"]
        assert len(list(staging.iterdir())) == 3
        assert owner_pid(f"{STAGING_DIR_PREFIX}{live.pid}-0-x") == live.pid and owner_pid("opsd-update-0-x") is None
    finally:
        live.kill()
        live.wait()
