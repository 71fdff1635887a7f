"""Supervised fine-tuning (the pipeline's first stage): chat data, the model's chat template, cross-entropy on
assistant tokens only, through the same megatron model, schedules, optimizer, checkpoints and logging as OPSD.

Rows are either chat conversations (``messages: [{role, content}, ...]``, e.g. the CPU demo's SFT mixture) or
prompt/response pairs. Each assistant turn k is tokenized as the model will see it at inference: the generation
prompt ``chat(messages[:k], add_generation_prompt=True)`` followed by the turn's text up to and including the
end-of-turn token; only the latter is trained on. The step's loss is the exact mean over all trainable tokens of
the step (all micro-batches and data-parallel ranks): per-token weights 1/N with ``loss_reduction="sum"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch

from megatron_opsd.config import (CheckpointConfig, ConfigError, LoggingConfig, ModelConfig, OptimConfig,
                                  TrainConfig, config_to_dict, save_config)
from megatron_opsd.parallel.device import sum_over_ranks, to_device
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.training.loop import run_steps


@dataclass
class SFTDataConfig:
    train_path: str = ""  # JSONL or Parquet
    format: Literal["auto", "jsonl", "parquet"] = "auto"  # auto: from the file suffix
    messages_field: str = "messages"  # a chat row: list of {role, content}; the assistant turns are trained on
    prompt_field: str = "prompt"  # a pair row (used when the row has no messages_field)
    response_field: str = "response"
    system_prompt: Optional[str] = None  # a system turn for pair rows
    prompt_template: Optional[str] = None  # Jinja user turn for pair rows with {{ prompt }}; null: the prompt as is
    max_seq_len: int = 2048  # a longer tokenized conversation is an error (no silent truncation)
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    shuffle: bool = True
    seed: int = 0
    limit: Optional[int] = None  # keep only the first N rows
    pad_to_multiple_of: int = 8
    packing: bool = False  # several conversations per row up to max_seq_len (block-diagonal causal attention)


@dataclass
class SFTLoggingConfig(LoggingConfig):
    name: str = "sft"  # logging.dir defaults to runs/<name>


@dataclass
class SFTExportConfig:
    hf_dir: Optional[str] = None  # write the final model as an HF directory here (for the OPSD sidecar)
    dtype: Optional[Literal["float32", "bfloat16"]] = None  # None: the training dtype


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: SFTLoggingConfig = field(default_factory=SFTLoggingConfig)
    export: SFTExportConfig = field(default_factory=SFTExportConfig)


def validate_sft_config(cfg: SFTConfig) -> SFTConfig:
    """Cross-field checks, and ``logging.dir`` defaulting to runs/<name>."""
    d = cfg.data
    checks = [
        (bool(cfg.model.path), "model.path must be set to an HF model directory (config.json + safetensors)"),
        (bool(d.train_path), "data.train_path must be set to a JSONL or Parquet file of conversations"),
        (d.max_seq_len >= 2, f"data.max_seq_len must be >= 2, got {d.max_seq_len}"),
        (d.global_batch_size >= 1, f"data.global_batch_size must be >= 1, got {d.global_batch_size}"),
        (d.pad_to_multiple_of >= 1, f"data.pad_to_multiple_of must be >= 1, got {d.pad_to_multiple_of}"),
        (cfg.optim.micro_batch_size >= 1, f"optim.micro_batch_size must be >= 1, got {cfg.optim.micro_batch_size}"),
        (cfg.train.steps >= 1, f"train.steps must be >= 1, got {cfg.train.steps}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if cfg.logging.dir is None:
        cfg.logging.dir = str(Path("runs") / cfg.logging.name)
    return cfg


def load_sft_config(path: Optional[str] = None, overrides: Optional[list] = None) -> SFTConfig:
    from megatron_opsd.config import load_config

    return validate_sft_config(load_config(path, overrides, cls=SFTConfig))


# ------------------------------------------------------------------------------------------------ data

@dataclass
class SFTExample:
    """One tokenized conversation: ``ids`` and ``trainable`` (1 where the token is an assistant token)."""

    id: str
    ids: list
    trainable: list


def row_messages(row: dict, d: SFTDataConfig, where: str) -> list[dict]:
    """The conversation of a dataset row: its ``messages_field``, or a chat built from prompt/response fields."""
    from megatron_opsd.data.contexts import render_template

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


def load_sft_dataset(d: SFTDataConfig, tokenizer, enable_thinking: Optional[bool] = None) -> list[SFTExample]:
    """Read and tokenize ``data.train_path``; bad rows fail with the file, row number and field named."""
    from megatron_opsd.data.datasets import _read_rows

    path = Path(d.train_path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT dataset {str(path)!r} does not exist (data.train_path)")
    rows = _read_rows(path, d.format)
    if d.limit is not None:
        rows = rows[: d.limit]
    if not rows:
        raise ValueError(f"SFT dataset {str(path)!r} (data.train_path) has no rows: it is empty"
                         + (f" after data.limit={d.limit}" if d.limit is not None else ""))
    examples = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 1}"
        ids, trainable = tokenize_conversation(tokenizer, row_messages(row, d, where), enable_thinking)
        if len(ids) > d.max_seq_len:
            raise ValueError(f"{where}: {len(ids)} tokens > data.max_seq_len={d.max_seq_len}; raise data.max_seq_len "
                             "or shorten the conversation")
        if sum(trainable) == 0:
            raise ValueError(f"{where}: the assistant turns tokenize to no tokens (empty responses?)")
        examples.append(SFTExample(str(row.get("id", i)), ids, trainable))
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
                           dp_size: int = 1, dp_rank: int = 0, pack_to: Optional[int] = None) -> list[dict]:
    """This DP rank's micro-batches of one step (``examples`` is the whole global batch, the same on every rank).

    ``labels[p]`` is token p+1; ``weights[p]`` is 1/N where token p+1 is trainable (N: trainable tokens of the whole
    global batch), so summing ``weights * cross_entropy`` over every micro-batch and DP rank is the token mean.
    With ``pack_to`` several conversations share a row: positions restart at 0 for each, and an
    ``attention_mask`` [b, 1, L, L] (True = masked) keeps attention causal within each conversation, so the loss
    equals the unpacked one; rows are padded with empty ones to a multiple of micro_batch_size x DP.
    """
    group = micro_batch_size * dp_size
    if pack_to is None:
        if len(examples) % group:
            raise ValueError(f"data.global_batch_size={len(examples)} must be a multiple of optim.micro_batch_size x "
                             f"data-parallel size = {micro_batch_size} x {dp_size}")
        rows = [[ex] for ex in examples]
    else:
        rows = pack_examples(examples, pack_to)
        rows += [[] for _ in range(-len(rows) % group)]
    total = sum(sum(ex.trainable[1:]) for ex in examples)
    longest = max(sum(len(ex.ids) for ex in row) for row in rows)
    length = -(-longest // pad_multiple) * pad_multiple
    microbatches = []
    for start in range(dp_rank * micro_batch_size, len(rows), group):
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


def make_weighted_ce_loss_fn(real_vocab_size: int):
    """``loss_fn(logits, mb)`` for ``forward_backward(loss_reduction="sum")``: ``sum(weights * CE)``, vocab-parallel
    (megatron's kernel), padded vocabulary rows excluded."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_opsd.training.engine import mask_padded_vocab

    def loss_fn(logits: torch.Tensor, mb: dict):
        per_token = vocab_parallel_cross_entropy(mask_padded_vocab(logits.float(), real_vocab_size), mb["labels"])
        mask = mb["weights"] > 0
        return (per_token * mb["weights"]).sum(), {"tokens": mask.sum().float(),
                                                   "ce_sum": (per_token.detach() * mask).sum()}

    return loss_fn


# ------------------------------------------------------------------------------------------------ trainer

class SFTTrainer:
    def __init__(self, cfg: SFTConfig):
        from megatron.core import parallel_state as ps

        from megatron_opsd.data.datasets import PromptSampler
        from megatron_opsd.models.families import have_transformer_engine
        from megatron_opsd.models.gpt import build_model_from_config
        from megatron_opsd.models.tokenizer import load_tokenizer
        from megatron_opsd.models.weights import load_hf_checkpoint
        from megatron_opsd.parallel import init_distributed
        from megatron_opsd.training.engine import setup_training
        from megatron_opsd.training.trainer import MetricsLogger

        self.cfg = validate_sft_config(cfg)
        if cfg.data.packing and have_transformer_engine():
            raise ConfigError("data.packing=true needs megatron's local attention spec (block-diagonal mask); with "
                              "Transformer Engine installed the packed (THD) path is not implemented: set "
                              "data.packing=false")
        init_distributed(cfg.parallel)
        self.rank = torch.distributed.get_rank()
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        group = cfg.optim.micro_batch_size * self.dp_size
        if cfg.data.global_batch_size % group:
            raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of "
                              f"optim.micro_batch_size x data-parallel size = {cfg.optim.micro_batch_size} x "
                              f"{self.dp_size}")
        self.run_dir = Path(cfg.logging.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.tokenizer_dir = cfg.model.tokenizer or cfg.model.path
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        examples = load_sft_dataset(cfg.data, self.tokenizer, cfg.model.enable_thinking)
        self.sampler = PromptSampler(examples, cfg.data.global_batch_size, cfg.data.shuffle, cfg.data.seed)

        self.model = build_model_from_config(cfg)
        load_hf_checkpoint(self.model, cfg.model.path)
        self.ddp, self.optimizer, self.scheduler = setup_training(self.model, cfg.optim, cfg.train.steps)
        self.loss_fn = make_weighted_ce_loss_fn(self.model[0].real_vocab_size)
        self.step = 0
        self.saved_step = -1  # the step of the newest checkpoint on disk (a finished run re-run: no new save)
        self.logger = MetricsLogger(cfg, self.run_dir) if self.rank == 0 else None

    def train_step(self) -> dict:
        from megatron.core import parallel_state as ps

        from megatron_opsd.training.engine import optimizer_step, zero_grads
        from megatron_opsd.training.schedule import forward_backward

        cfg = self.cfg
        mbs = build_sft_microbatches(self.sampler.next_batch(), micro_batch_size=cfg.optim.micro_batch_size,
                                     pad_id=self.tokenizer.pad_token_id,
                                     pad_multiple=cfg.parallel.sequence_multiple(cfg.data.pad_to_multiple_of),
                                     dp_size=self.dp_size, dp_rank=self.dp_rank,
                                     pack_to=cfg.data.max_seq_len if cfg.data.packing else None)
        zero_grads(self.ddp, self.optimizer)
        for chunk in self.ddp:
            chunk.train()
        out = forward_backward(self.ddp, mbs, self.loss_fn, seq_length=mbs[0]["tokens"].shape[1],
                               micro_batch_size=cfg.optim.micro_batch_size, loss_reduction="sum")
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step used
        info = optimizer_step(self.optimizer, self.scheduler)
        owner = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
        tokens = sum_over_ranks(out.metrics, ["tokens"], owner=owner)["tokens"]
        self.step += 1
        return {"loss": out.loss, "tokens": tokens, "grad_norm": float(info["grad_norm"] or 0.0), "lr": lr}

    def save(self) -> None:
        from megatron_opsd.training.checkpoint import save_checkpoint

        self.saved_step = self.step
        save_checkpoint(self.ckpt_dir, self.step, self.ddp, self.optimizer, self.scheduler,
                        data_state=self.sampler.state_dict(), config_dict=config_to_dict(self.cfg),
                        keep_last=self.cfg.checkpoint.keep_last)

    def maybe_resume(self) -> None:
        from megatron_opsd.training.checkpoint import load_latest

        if not self.cfg.checkpoint.resume:
            return
        loaded = load_latest(self.ckpt_dir, self.ddp, self.optimizer, self.scheduler)
        if loaded is not None:
            self.step = self.saved_step = loaded.step
            self.sampler.load_state_dict(loaded.data_state)
            if self.rank == 0:
                print(f"resumed from {loaded.path} at step {self.step}")

    def export(self) -> Optional[Path]:
        """COLLECTIVE: the current weights as an HF directory (``export.hf_dir``), tokenizer files included."""
        from megatron_opsd.models.gpt import PARAMS_DTYPES
        from megatron_opsd.models.weights import save_hf_checkpoint

        if not self.cfg.export.hf_dir:
            return None
        dtype = PARAMS_DTYPES[self.cfg.export.dtype] if self.cfg.export.dtype else None
        out = Path(self.cfg.export.hf_dir)
        save_hf_checkpoint(self.model, out, source_dir=self.tokenizer_dir, dtype=dtype)
        if self.rank == 0:
            print(f"exported the SFT model to {out}")
        return out

    def fit(self) -> list[dict]:
        self.maybe_resume()
        try:
            history = run_steps(self, "sft", lambda m: dict(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}"))
            if self.saved_step != self.step:
                self.save()
            self.export()
        finally:
            if self.logger is not None:
                self.logger.close()
        return history


def train_sft(cfg: SFTConfig) -> list[dict]:
    """Run SFT from ``cfg`` on this process (launched by torchrun, srun, or run_distributed)."""
    return SFTTrainer(cfg).fit()
