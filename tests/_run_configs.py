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
