"""Supervised fine-tuning (the pipeline's first stage): chat data (``training/sft_data.py``), cross-entropy on
assistant tokens only, through the same megatron model, schedules, optimizer, checkpoints and logging as OPSD
(``training/run.py``). ``sft_step`` is the method, one optimizer step.

The step's loss is the exact mean over all trainable tokens of the step (all micro-batches and data-parallel
ranks): per-token weights 1/N with ``loss_reduction="sum"``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_opsd.config import (CheckpointConfig, ConfigError, ExportConfig, LoggingConfig, ModelConfig, OptimConfig,
                                  TrainConfig, load_config)
from megatron_opsd.data.datasets import PromptSampler
from megatron_opsd.losses.vocab_parallel import mask_padded_vocab
from megatron_opsd.models.families import have_transformer_engine
from megatron_opsd.models.gpt import sequence_multiple
from megatron_opsd.parallel.device import sum_over_ranks
from megatron_opsd.parallel.distributed import ParallelConfig
from megatron_opsd.training.engine import optimizer_step, zero_grads
from megatron_opsd.training.loop import PhaseTimer
from megatron_opsd.training.run import Run
from megatron_opsd.training.schedule import forward_backward
from megatron_opsd.training.sft_data import SFTDataConfig, build_sft_microbatches, load_sft_dataset

SFT_PHASES = ("time/batch", "time/student", "time/optimizer", "time/eval")


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)  # logging.dir defaults to runs/<name or sft>
    export: ExportConfig = field(default_factory=ExportConfig)


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
        cfg.logging.dir = str(Path("runs") / (cfg.logging.name or "sft"))
    return cfg


def load_sft_config(path: Optional[str] = None, overrides: Optional[list] = None) -> SFTConfig:
    return validate_sft_config(load_config(path, overrides, cls=SFTConfig))


def make_weighted_ce_loss_fn(real_vocab_size: int):
    """``loss_fn(logits, mb)`` for ``forward_backward(loss_reduction="sum")``: ``sum(weights * CE)``, vocab-parallel
    (megatron's kernel), padded vocabulary rows excluded."""
    def loss_fn(logits: torch.Tensor, mb: dict):
        logits = mask_padded_vocab(logits.float(), real_vocab_size, ps.get_tensor_model_parallel_group())
        per_token = vocab_parallel_cross_entropy(logits, mb["labels"])
        mask = mb["weights"] > 0
        return (per_token * mb["weights"]).sum(), {"tokens": mask.sum().float(),
                                                   "ce_sum": (per_token.detach() * mask).sum()}

    return loss_fn


def sft_step(t: "SFTTrainer", timer: PhaseTimer) -> dict:
    """One SFT step: the global batch's micro-batches -> forward/backward (weighted CE) -> optimizer."""
    cfg, run = t.cfg, t.run
    mbs = build_sft_microbatches(t.sampler.next_batch(), micro_batch_size=cfg.optim.micro_batch_size,
                                 pad_id=run.tokenizer.pad_token_id,
                                 pad_multiple=sequence_multiple(cfg, cfg.data.pad_to_multiple_of),
                                 microbatch_multiple=cfg.parallel.microbatch_multiple(),
                                 dp_size=run.dp_size, dp_rank=run.dp_rank,
                                 pack_to=cfg.data.max_seq_len if cfg.data.packing else None,
                                 group_by_length=cfg.data.group_by_length,
                                 one_length=cfg.parallel.pipeline_model_parallel_size > 1)
    timer.lap("time/batch")
    zero_grads(run.ddp, run.optimizer)
    for chunk in run.ddp:
        chunk.train()
    out = forward_backward(run.ddp, mbs, t.loss_fn, seq_length=max(mb["tokens"].shape[1] for mb in mbs),
                           micro_batch_size=cfg.optim.micro_batch_size, loss_reduction="sum")
    owner = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
    tokens = sum_over_ranks(out.metrics, ["tokens"], owner=owner)["tokens"]
    timer.lap("time/student")
    lr = run.optimizer.param_groups[0]["lr"]  # the LR this step used
    info = optimizer_step(run.optimizer, run.scheduler)
    timer.lap("time/optimizer")
    metrics = {"loss": out.loss, "tokens": tokens, "grad_norm": float(info["grad_norm"] or 0.0), "lr": lr}
    return metrics  # the loop counts the step


class SFTTrainer:
    """SFT on the shared run machinery: the tokenized dataset's sampler and the weighted CE loss."""

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg = validate_sft_config(cfg)
        if cfg.data.packing and have_transformer_engine():
            raise ConfigError("data.packing=true needs megatron's local attention spec (block-diagonal mask); with "
                              "Transformer Engine installed the packed (THD) path is not implemented: set "
                              "data.packing=false")
        self.run = run = Run(cfg, desc="sft", uses_sidecar=False)
        group = cfg.optim.micro_batch_size * run.dp_size
        if cfg.data.global_batch_size % group:
            raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} must be a multiple of "
                              f"optim.micro_batch_size x data-parallel size = {cfg.optim.micro_batch_size} x "
                              f"{run.dp_size}")
        examples = load_sft_dataset(cfg.data, run.tokenizer, cfg.model.enable_thinking)
        self.sampler = PromptSampler(examples, cfg.data.global_batch_size, cfg.data.shuffle, cfg.data.seed)
        run.build_optimizer()
        self.loss_fn = make_weighted_ce_loss_fn(run.real_vocab)

    phases = SFT_PHASES
    train_step = sft_step

    def progress(self, m: dict) -> dict:
        return dict(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:.0f}")

    def extra_models(self) -> None:
        return None

    def fit(self) -> list[dict]:
        return self.run.fit(self)


def train_sft(cfg: SFTConfig) -> list[dict]:
    """Run SFT from ``cfg`` on this process (launched by torchrun, srun, or run_distributed)."""
    return SFTTrainer(cfg).fit()
