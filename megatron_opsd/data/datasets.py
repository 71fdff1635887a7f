"""Prompt datasets from JSONL or Parquet, with field names from the config.

Only the prompt field is required for every row; the reference solution, the final answer and a
per-example teacher prompt are optional here, and the context builder that needs one of them raises a
clear error when it is missing (AMC 2023, for instance, ships answers but no solutions).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from megatron_opsd.config import DataConfig


@dataclass
class PromptExample:
    id: str
    prompt: str
    reference: Optional[str] = None
    answer: Optional[str] = None
    teacher_prompt: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # every other column (e.g. MATH level, subject)


def _answer_text(value: Any) -> Optional[str]:
    """Answers may be stored as numbers (AMC 2023 has 27.0): integral floats become '27'."""
    if value is None:
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def read_rows(path: Path, fmt: str) -> list[dict]:
    if fmt == "auto":
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json", ".ndjson"):
            fmt = "jsonl"
        elif suffix in (".parquet", ".pq"):
            fmt = "parquet"
        else:
            raise ValueError(f"cannot tell the format of {str(path)!r} from its suffix; set data.format to jsonl or "
                             "parquet")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(str(path)).to_pylist()
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}); data.format=jsonl expects one object "
                                 "per line") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def rows_to_examples(rows: list[dict], data_cfg: DataConfig, source: str = "<rows>") -> list[PromptExample]:
    """Map raw rows to PromptExamples using the configured field names."""
    if not rows:
        raise ValueError(f"dataset {source!r} is empty")
    used = {data_cfg.prompt_field, data_cfg.reference_field, data_cfg.answer_field, data_cfg.teacher_prompt_field}
    if data_cfg.id_field:
        used.add(data_cfg.id_field)
    examples = []
    for i, row in enumerate(rows):
        prompt = row.get(data_cfg.prompt_field)
        if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
            raise ValueError(f"{source}: row {i} has no {data_cfg.prompt_field!r} (data.prompt_field); available "
                             f"fields: {sorted(row)}")
        if data_cfg.id_field:
            if row.get(data_cfg.id_field) is None:
                raise ValueError(f"{source}: row {i} has no {data_cfg.id_field!r} (data.id_field); available fields: "
                                 f"{sorted(row)}")
            ex_id = str(row[data_cfg.id_field])
        else:
            ex_id = str(i)
        examples.append(PromptExample(
            id=ex_id,
            prompt=str(prompt),
            reference=None if row.get(data_cfg.reference_field) is None else str(row[data_cfg.reference_field]),
            answer=_answer_text(row.get(data_cfg.answer_field)),
            teacher_prompt=(None if row.get(data_cfg.teacher_prompt_field) is None
                            else str(row[data_cfg.teacher_prompt_field])),
            extra={k: v for k, v in row.items() if k not in used},
        ))
    return examples


def load_prompt_dataset(path: str | Path, data_cfg: Optional[DataConfig] = None) -> list[PromptExample]:
    """Read ``path`` (JSONL or Parquet) into PromptExamples; ``data.limit`` keeps the first N rows."""
    data_cfg = data_cfg or DataConfig()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file {str(p)!r} does not exist (data.train_path / data.eval_path)")
    examples = rows_to_examples(read_rows(p, data_cfg.format), data_cfg, source=str(p))
    if data_cfg.limit is not None:
        examples = examples[: data_cfg.limit]
    return examples


class PromptSampler:
    """Epoch-wise shuffled batches of prompts, resumable from (epoch, position)."""

    def __init__(self, examples: list[PromptExample], batch_size: int, shuffle: bool = True, seed: int = 1234):
        if batch_size < 1:
            raise ValueError("rollout.prompts_per_step must be >= 1")
        self.examples, self.batch_size, self.shuffle, self.seed = examples, batch_size, shuffle, seed
        self.epoch, self.pos = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[PromptExample]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._make_order()
            batch.append(self.examples[self._order[self.pos]])
            self.pos += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.pos = state["seed"], state["epoch"], state["pos"]
        self._order = self._make_order()
