"""One way for tests to write a training run: the problems as train.jsonl and a config.yaml built from a
test's base sections with per-test section overrides merged in."""
from pathlib import Path

import yaml

from megatron_opsd.demo.task import write_jsonl


def write_run_config(tmp_path: Path, rows: list[dict], base: dict, sections: dict) -> Path:
    """``rows`` -> ``tmp_path/train.jsonl`` (the base config's data.train_path points there);
    ``base`` updated section by section with ``sections`` -> ``tmp_path/config.yaml``; returns that path."""
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = {name: dict(values) for name, values in base.items()}
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_phases_add_up(metrics: dict, expected: tuple) -> None:
    """A logged step's ``time/*`` phases: every one in ``expected`` present, and together they account for
    ``time/step`` (within 5 ms + 2%: the step loop's own call around the step function)."""
    phases = {k: v for k, v in metrics.items() if k.startswith("time/") and k != "time/step"}
    assert set(expected) <= set(phases), sorted(set(expected) - set(phases))
    total, step = sum(phases.values()), metrics["time/step"]
    assert all(v >= 0 for v in phases.values()) and total <= step, (total, step)
    assert step - total < 0.005 + 0.02 * step, f"phases {total:.4f} s of a {step:.4f} s step: {phases}"
