"""tools/bench_peer.py's prompt bridge to TRL (the peer's venv is never needed here): TRL's SDFT teacher prompt,
built from our student prompt and the concise instruction by ``TEACHER_TEMPLATE``, must be exactly our
``teacher.context: concise`` user turn, or the step-0 loss parity and the step-time comparison are of different
prompts. The bench checks the token ids again in the peer's process; this catches a change to our contexts
without TRL installed."""
import importlib
from pathlib import Path

import pytest

from megatron_opsd.config import load_config
from megatron_opsd.data.datasets import rows_to_examples
from megatron_opsd.demo import task

ROOT = Path(__file__).resolve().parents[1]


def test_the_peers_teacher_prompt_is_our_concise_teacher_prompt(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    bench_peer = importlib.import_module("bench_peer")
    cfg = load_config(str(ROOT / bench_peer.CONFIG), ["model.path=unused", "data.train_path=unused.jsonl"])
    train, _ = task.generate_splits(task.TaskConfig(n_train=4, n_test=1, seed=0))
    texts = bench_peer.prompt_texts(rows_to_examples(train, cfg.data), cfg)
    rows = bench_peer.peer_rows([texts[:2], texts[2:]], cfg.teacher.concise_instruction)
    assert [r["prompt"][0]["content"] for r in rows] == [t["student"] for t in texts]
    assert all(t["teacher"] != t["student"] and cfg.teacher.concise_instruction in t["teacher"] for t in texts)
    # a teacher turn the template does not rebuild (another instruction) is refused, not silently compared
    with pytest.raises(ValueError, match="teacher prompt would differ"):
        bench_peer.peer_rows([texts], "Be brief.")
