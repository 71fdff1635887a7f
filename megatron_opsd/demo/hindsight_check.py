"""The second compression ablation's mechanism check (issue 28, docs/ablation2.md): where does the reference
teacher's per-token divergence sit on a model's own rollouts?

For each sampled held-out response of a student model, the student (shown the problem) and the teacher (the
chain's frozen RLVR model shown the reference solution: the trainer's ``teacher.context: reference`` prompt) are
run over the same response tokens with plain torch forwards of their HF exports; the per-token JSD (beta = 0.5,
OPSD's) and reverse KL over the full vocabulary come from the trainer's own ``vocab_parallel_divergence``. Each
token gets a type from ``path_task.token_types`` (detour / value / answer / other) and, on incorrect rollouts,
the first wrong token (``path_task.first_wrong_char``). Reported: where the divergence peaks on incorrect
rollouts (at the first wrong token +-1, against chance; inside the boxed answer) and its mean per token type on
correct and incorrect rollouts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from megatron_opsd.data.sequences import encode_prompt
from megatron_opsd.demo import carry_task, path_task, task
from megatron_opsd.losses.divergence import vocab_parallel_divergence
from megatron_opsd.models.tokenizer import load_tokenizer

KINDS = {"jsd": dict(kind="jsd", beta=0.5), "reverse_kl": dict(kind="reverse_kl")}
PEAK_WINDOW = 1  # a peak within +-1 token of the first wrong token counts as "at" it


def load_model(model_dir: Path):
    from transformers import AutoModelForCausalLM  # heavy: only when the check runs

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def response_tokens(tokenizer, text: str, answer: str) -> tuple[list[int], list[str], Optional[int]]:
    """(token ids + end of turn, each token's type, the first wrong token's index or None) of a response."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = path_task.token_types(text)
    types = []
    for _, end in enc["offset_mapping"]:
        last = end - 1  # a token's last character decides its type (" Wait" is a detour token, " 12" a value)
        types.append(next((kind for a, b, kind in spans if a <= last < b), "other"))
    wrong_char = path_task.first_wrong_char(text, answer)
    first_wrong = None if wrong_char is None else next(
        (i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > wrong_char), None)
    return list(enc["input_ids"]) + [tokenizer.eos_token_id], types + ["other"], first_wrong


@torch.no_grad()
def response_logits(model, prompts: list[list[int]], responses: list[list[int]], batch: int = 32) -> torch.Tensor:
    """The next-token logits at every response token, all rollouts' rows concatenated: [sum of lengths, vocab].
    Right-padded batches (a causal model's logits at real tokens do not depend on the padding after them)."""
    rows = []
    for lo in range(0, len(prompts), batch):
        seqs = [p + r for p, r in zip(prompts[lo:lo + batch], responses[lo:lo + batch])]
        ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, seq in enumerate(seqs):
            ids[k, :len(seq)], mask[k, :len(seq)] = torch.tensor(seq), 1
        logits = model(input_ids=ids, attention_mask=mask).logits
        for k, (p, r) in enumerate(zip(prompts[lo:lo + batch], responses[lo:lo + batch])):
            rows.append(logits[k, len(p) - 1:len(p) - 1 + len(r)].float())
    return torch.cat(rows)


def per_token_divergences(student, teacher, student_prompts: list[list[int]], teacher_prompts: list[list[int]],
                          responses: list[list[int]]) -> dict[str, list[np.ndarray]]:
    """{kind: per rollout, the divergence at each response token} between the student's and the teacher's
    next-token distributions (full vocabulary, T = 1), as the trainer computes it."""
    s = response_logits(student, student_prompts, responses)
    t = response_logits(teacher, teacher_prompts, responses)
    cuts = np.cumsum([len(r) for r in responses])[:-1]
    return {name: np.split(vocab_parallel_divergence(s, t, **kw)[1].numpy(), cuts) for name, kw in KINDS.items()}


def rollout_records(eval_files: list[Path], examples: list[dict]) -> list[dict]:
    """(example, text, correct) of every sample in the evaluation runner's saved results of the JSONL whose rows
    are ``examples`` (the runner keeps the file's order; its ids are row numbers)."""
    out = []
    for path in eval_files:
        bench = next(iter(json.loads(Path(path).read_text())["benchmarks"].values()))
        if len(bench["prompts"]) != len(examples):
            raise ValueError(f"{path}: {len(bench['prompts'])} problems, the held-out file has {len(examples)}")
        for ex, rec in zip(examples, bench["prompts"]):
            if str(rec["gold"]) != str(ex["answer"]):
                raise ValueError(f"{path}: problem {rec['id']} has answer {rec['gold']!r}, the file {ex['answer']!r}")
            out += [{"example": ex, "text": s["text"], "correct": bool(s["correct"])} for s in rec["samples"]]
    return out


def analyse(student_dir: Path, teacher_dir: Path, records: list[dict]) -> dict:
    """The mechanism check of one student model's rollouts against the reference teacher (see the module doc)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))  # offsets: which characters each token covers
    chat = load_tokenizer(teacher_dir)  # the prompts exactly as the trainer encodes them
    student, teacher = load_model(student_dir), load_model(teacher_dir)
    by_type = {(kind, ok, t): [] for kind in KINDS for ok in (True, False) for t in path_task.TOKEN_TYPES}
    peaks = {"located": 0, "at_first_wrong": 0, "in_answer": 0, "chance": []}
    if not records:
        raise ValueError("the mechanism check got no rollouts")
    rows = [response_tokens(tokenizer, rec["text"], rec["example"]["answer"]) for rec in records]
    prompts = {who: [encode_prompt(chat, messages(rec["example"]), 10_000, rec["example"]["id"], who)
                     for rec in records]
               for who, messages in (("student", lambda ex: task.student_messages(ex["problem"])),
                                     ("teacher", carry_task.reference_messages))}
    div = per_token_divergences(student, teacher, prompts["student"], prompts["teacher"], [r[0] for r in rows])
    for k, (rec, (response, types, first_wrong)) in enumerate(zip(records, rows)):
        for kind in KINDS:
            for value, t in zip(div[kind][k], types):
                by_type[(kind, rec["correct"], t)].append(float(value))
        if not rec["correct"] and first_wrong is not None:
            peak = int(np.argmax(div["jsd"][k]))
            peaks["located"] += 1
            peaks["at_first_wrong"] += abs(peak - first_wrong) <= PEAK_WINDOW
            peaks["in_answer"] += types[peak] == "answer"
            peaks["chance"].append(min(1.0, (2 * PEAK_WINDOW + 1) / len(response)))
    n = peaks["located"]
    means = {kind: {("correct" if ok else "incorrect"): {t: (float(np.mean(by_type[(kind, ok, t)]))
                                                          if by_type[(kind, ok, t)] else None)
                                                      for t in path_task.TOKEN_TYPES} for ok in (True, False)}
             for kind in KINDS}
    counts = {("correct" if ok else "incorrect"): {t: len(by_type[("jsd", ok, t)]) for t in path_task.TOKEN_TYPES}
              for ok in (True, False)}
    return {"rollouts": len(records), "incorrect": sum(not r["correct"] for r in records),
            "incorrect_located": n,
            "peak_at_first_wrong": peaks["at_first_wrong"] / n if n else None,
            "peak_at_first_wrong_chance": float(np.mean(peaks["chance"])) if n else None,
            "peak_in_answer": peaks["in_answer"] / n if n else None,
            "mean_by_type": means, "tokens_by_type": counts}
