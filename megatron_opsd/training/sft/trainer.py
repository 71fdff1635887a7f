"""The SFT trainer: ``SFTTrainer`` holds what the method (``sft/step.py`` ``sft_step``) needs on top of the shared
run machinery (``training/run.py``: the same megatron model, optimizer, checkpoints and logging as OPSD): the
tokenized dataset's sampler (``sft/data.py``) and the weighted cross-entropy loss.
"""
from __future__ import annotations

from megatron_opsd.config import ConfigError
from megatron_opsd.data.datasets import PromptSampler
from megatron_opsd.models.families import have_transformer_engine
from megatron_opsd.training.run import Run
from megatron_opsd.training.sft.config import SFTConfig, validate_sft_config
from megatron_opsd.training.sft.data import load_sft_dataset
from megatron_opsd.training.sft.step import SFT_PHASES, make_weighted_ce_loss_fn, sft_step

__all__ = ["SFTTrainer", "train_sft"]


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
