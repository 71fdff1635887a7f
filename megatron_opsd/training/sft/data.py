"""SFT data (its ``data`` section is ``sft/config.py`` ``SFTDataConfig``): chat rows tokenized with the model's chat
template (assistant tokens marked trainable), first-fit packing, and the step's micro-batches with exact
token-mean weights.

Rows are either chat conversations (``messages: [{role, content}, ...]``, e.g. the CPU demo's SFT mixture) or
prompt/response pairs. Each assistant turn k is tokenized as the model will see it at inference: the generation
prompt ``chat(messages[:k], add_generation_prompt=True)`` followed by the turn's text up to and including the
end-of-turn token; only the latter is trained on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.data.contexts import render_template
from megatron_opsd.data.datasets import read_rows
from megatron_opsd.errors import UsageError
from megatron_opsd.parallel.device import to_device
from megatron_opsd.training.sft.config import SFTDataConfig


@dataclass
class SFTExample:
    """One tokenized conversation: ``ids`` and ``trainable`` (1 where the token is an assistant token)."""

    id: str
    ids: list
    trainable: list


def row_messages(row: dict, d: SFTDataConfig, where: str) -> list[dict]:
    """The conversation of a dataset row: its ``messages_field``, or a chat built from prompt/response fields."""
    if d.messages_field in row:
        messages = row[d.messages_field]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: field {d.messages_field!r} (data.messages_field) must be a non-empty list of "
                             f"{{role, content}} objects, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"{where}: {d.messages_field}[{i}] must be an object with string 'role' and "
                                 f"'content', got {m!r}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: {d.messages_field!r} has no assistant turn, so there is nothing to train on")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    missing = [f for f in (d.prompt_field, d.response_field) if not isinstance(row.get(f), str)]
    if missing:
        raise ValueError(f"{where}: row has neither a {d.messages_field!r} list (data.messages_field) nor string "
                         f"fields {missing} (data.prompt_field / data.response_field); its keys are {sorted(row)}; "
                         "point those settings at the right columns")
    user = row[d.prompt_field]
    if d.prompt_template is not None:
        user = render_template(d.prompt_template, "data.prompt_template", prompt=user)
    system = [{"role": "system", "content": d.system_prompt}] if d.system_prompt else []
    return system + [{"role": "user", "content": user}, {"role": "assistant", "content": row[d.response_field]}]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokenize_conversation(tokenizer, messages: list[dict], enable_thinking: Optional[bool] = None
                          ) -> tuple[list, list]:
    """``(ids, trainable)``: every assistant turn after its generation prompt, the turn's tokens marked 1.

    The generation prompt is encoded on its own, exactly as the sidecar will see it, and the turn's text (content
    plus end-of-turn marker) is what the template appends after it. When the template's generation prompt is not a
    prefix of the rendered turn (Qwen3 with ``enable_thinking=False`` adds an empty think block), the turn's text is
    what follows their common prefix. Earlier assistant turns are kept in the context of later ones as the
    template renders them.
    """
    ids, trainable = [], []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text = tokenizer.render_chat(messages[:k], True, enable_thinking)
        full_text = tokenizer.render_chat(messages[: k + 1], False, enable_thinking)
        response_text = full_text[_common_prefix(prompt_text, full_text):]
        prompt_ids = tokenizer.encode(prompt_text)
        if ids and prompt_ids[: len(ids)] != ids:  # a template that rewrites history: train on this turn alone
            ids, trainable = [], []
        new = prompt_ids[len(ids):]
        response_ids = tokenizer.encode(response_text)
        ids = ids + new + response_ids
        trainable = trainable + [0] * len(new) + [1] * len(response_ids)
    return ids, trainable


def read_sft_conversations(d: SFTDataConfig) -> list[tuple[str, str, list[dict]]]:
    """Read ``data.train_path`` (after ``data.limit``): ``(id, where, messages)`` per row, every row's conversation
    checked; the file, row number and field are named on a bad row. Used by the loader and, before any rank
    starts, by the launcher's data check."""
    path = Path(d.train_path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT dataset {str(path)!r} does not exist (data.train_path)")
    rows = read_rows(path, d.format)
    if d.limit is not None:
        rows = rows[: d.limit]
    if not rows:
        raise ValueError(f"SFT dataset {str(path)!r} (data.train_path) has no rows: it is empty"
                         + (f" after data.limit={d.limit}" if d.limit is not None else ""))
    return [(str(row.get("id", i)), f"{path}: row {i + 1}", row_messages(row, d, f"{path}: row {i + 1}"))
            for i, row in enumerate(rows)]


def load_sft_dataset(d: SFTDataConfig, tokenizer, enable_thinking: Optional[bool] = None) -> list[SFTExample]:
    """Read and tokenize ``data.train_path``; bad rows fail with the file, row number and field named."""
    examples = []
    for example_id, where, messages in read_sft_conversations(d):
        ids, trainable = tokenize_conversation(tokenizer, messages, enable_thinking)
        if len(ids) > d.max_seq_len:
            raise UsageError(f"{where}: {len(ids)} tokens > data.max_seq_len={d.max_seq_len}; raise data.max_seq_len "
                             "or shorten the conversation")
        if sum(trainable) == 0:
            raise UsageError(f"{where}: the assistant turns tokenize to no tokens (empty responses?)")
        examples.append(SFTExample(example_id, ids, trainable))
    return examples


def pack_examples(examples: list[SFTExample], capacity: int) -> list[list[SFTExample]]:
    """First-fit packing in data order (deterministic): rows of conversations with at most ``capacity`` tokens."""
    rows: list[list[SFTExample]] = []
    sizes: list[int] = []
    for ex in examples:
        for i, size in enumerate(sizes):
            if size + len(ex.ids) <= capacity:
                rows[i].append(ex)
                sizes[i] += len(ex.ids)
                break
        else:
            rows.append([ex])
            sizes.append(len(ex.ids))
    return rows


def build_sft_microbatches(examples: list[SFTExample], *, micro_batch_size: int, pad_id: int, pad_multiple: int = 8,
                           microbatch_multiple: int = 1, dp_size: int = 1, dp_rank: int = 0,
                           pack_to: Optional[int] = None,
                           group_by_length: bool = False, one_length: bool = True) -> list[dict]:
    """This DP rank's micro-batches of one step (``examples`` is the whole global batch, the same on every rank).

    ``labels[p]`` is token p+1; ``weights[p]`` is 1/N where token p+1 is trainable (N: trainable tokens of the whole
    global batch), so summing ``weights * cross_entropy`` over every micro-batch and DP rank is the token mean.
    With ``pack_to`` several conversations share a row: positions restart at 0 for each, and an
    ``attention_mask`` [b, 1, L, L] (True = masked) keeps attention causal within each conversation, so the loss
    equals the unpacked one; rows are padded with empty ones to a multiple of micro_batch_size x DP, and to
    ``microbatch_multiple`` micro-batches per rank (an interleaved pipeline needs a multiple of PP); empty rows
    carry zero weight, so the step's loss is unchanged.

    ``group_by_length`` (unpacked rows) orders the step's conversations by length (ties in data order) before
    they are dealt to micro-batches and ranks, so each micro-batch holds similar lengths; with ``one_length=False``
    (PP=1: no point-to-point shapes to agree on) each micro-batch is padded to its own longest instead of the
    step's. Which conversation lands in which micro-batch changes, the step's loss does not (1/N weights).
    """
    group = micro_batch_size * dp_size
    if pack_to is None:
        if len(examples) % group:
            raise ValueError(f"data.global_batch_size={len(examples)} must be a multiple of optim.micro_batch_size x "
                             f"data-parallel size = {micro_batch_size} x {dp_size}")
        rows = [[ex] for ex in examples]
        if group_by_length:
            rows.sort(key=lambda row: len(row[0].ids))
    else:
        rows = pack_examples(examples, pack_to)
    rows += [[] for _ in range(-len(rows) % (group * microbatch_multiple))]
    total = sum(sum(ex.trainable[1:]) for ex in examples)

    def padded_length(some_rows: list) -> int:
        longest = max(sum(len(ex.ids) for ex in row) for row in some_rows)
        return max(-(-longest // pad_multiple) * pad_multiple, pad_multiple)

    step_length = padded_length(rows)
    microbatches = []
    for start in range(dp_rank * micro_batch_size, len(rows), group):
        length = step_length if one_length else padded_length(rows[start: start + micro_batch_size])
        tokens = torch.full((micro_batch_size, length), pad_id, dtype=torch.long)
        labels = torch.full((micro_batch_size, length), pad_id, dtype=torch.long)
        weights = torch.zeros((micro_batch_size, length), dtype=torch.float32)
        positions = torch.arange(length).unsqueeze(0).repeat(micro_batch_size, 1)
        segments = torch.full((micro_batch_size, length), -1, dtype=torch.long)
        for j, row in enumerate(rows[start: start + micro_batch_size]):
            offset = 0
            for k, ex in enumerate(row):
                n, span = len(ex.ids), slice(offset, offset + len(ex.ids))
                tokens[j, span] = torch.tensor(ex.ids)
                labels[j, offset: offset + n - 1] = torch.tensor(ex.ids[1:])
                weights[j, offset: offset + n - 1] = torch.tensor(ex.trainable[1:], dtype=torch.float32) / max(total, 1)
                positions[j, span] = torch.arange(n)
                segments[j, span] = k
                offset += n
        mb = {"tokens": tokens, "labels": labels, "weights": weights, "position_ids": positions}
        if pack_to is not None:
            same = (segments.unsqueeze(2) == segments.unsqueeze(1)) & (segments >= 0).unsqueeze(2)
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            mb["attention_mask"] = ~(same & causal).unsqueeze(1)
        microbatches.append(to_device(mb))  # the one place SFT batches reach the device
    return microbatches
