"""GRPO's config: the ``rl`` section and the root ``RLTrainConfig`` are in ``megatron_opsd/config.py`` (the one
dataclass tree); here are GRPO's checks across sections, made after the shared ones, and its loader."""
from __future__ import annotations

from typing import Optional, Sequence

from megatron_opsd.config import (K1_REFUSAL, ConfigError, RLConfig, RLTrainConfig, load_config, resolve_config,
                                  validate_run_config)

__all__ = ["load_rl_config", "reference_model", "validate_rl_config"]


def reference_model(rl: RLConfig) -> str:
    """``rl.reference`` resolved: ``frozen`` (a replica of the initial weights) or ``none``."""
    if rl.reference == "auto":
        return "frozen" if rl.kl_coef > 0 else "none"
    return rl.reference


def validate_rl_config(cfg: RLTrainConfig) -> RLTrainConfig:
    """The shared sections' checks (``config.validate_run_config``), ``logging.dir`` resolved, and GRPO's own."""
    validate_run_config(resolve_config(cfg))
    rl = cfg.rl
    checks = [
        (rl.clip_eps_low >= 0 and rl.clip_eps_high >= 0, f"rl.clip_eps_low/high must be >= 0, got "
                                                          f"{rl.clip_eps_low}/{rl.clip_eps_high}"),
        (rl.clip_eps_low < 1, f"rl.clip_eps_low must be < 1 (ratio floor 1 - eps > 0), got {rl.clip_eps_low}"),
        (rl.kl_coef >= 0, f"rl.kl_coef must be >= 0, got {rl.kl_coef}"),
        (rl.kl_coef == 0 or rl.kl_estimator != "k1" or rl.allow_k1_kl,
         K1_REFUSAL.format(key="rl.kl_estimator=k1", fix="rl.kl_estimator=full (exact reverse KL) or k3",
                           opt_in="rl.allow_k1_kl=true")),
        (rl.adv_eps > 0, f"rl.adv_eps must be > 0, got {rl.adv_eps}"),
        (0 <= rl.overlong_buffer < cfg.rollout.max_tokens,
         f"rl.overlong_buffer must be in [0, rollout.max_tokens={cfg.rollout.max_tokens}), got {rl.overlong_buffer}"),
        (rl.overlong_penalty >= 0, f"rl.overlong_penalty must be >= 0, got {rl.overlong_penalty}"),
        (cfg.rollout.n >= 2, f"rollout.n={cfg.rollout.n}: GRPO needs groups of at least 2 rollouts per prompt "
                             "(set rollout.n=4 or more)"),
        (cfg.rollout.filter == "all", f"rollout.filter={cfg.rollout.filter!r}: GRPO trains on every rollout "
                                      "(use rl.dynamic_sampling to drop uninformative groups); set rollout.filter=all"),
        (cfg.rollout.horizon is None and cfg.rollout.horizon_growth is None and cfg.rollout.max_kept is None,
         "rollout.horizon/horizon_growth/max_kept are OPSD options; GRPO trains on whole responses of every "
         "rollout: leave them null"),
        (rl.kl_coef <= 0 or reference_model(rl) == "frozen",
         f"rl.kl_coef={rl.kl_coef} needs a reference model: set rl.reference=frozen (or auto), or rl.kl_coef=0"),
        (cfg.model.lora.rank == 0 or reference_model(rl) == "none",  # LoRA hook: the reference = adapters off
         "model.lora with a reference model (rl.kl_coef > 0 or rl.reference=frozen) is not supported yet; set "
         "rl.kl_coef=0 rl.reference=auto or model.lora.rank=0"),
        (rl.chunk_tokens >= 1, f"rl.chunk_tokens must be >= 1, got {rl.chunk_tokens}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def load_rl_config(path: Optional[str] = None, overrides: Optional[Sequence[str]] = None) -> RLTrainConfig:
    """``load_config`` with the ``rl:`` section, validated."""
    return validate_rl_config(load_config(path, overrides, cls=RLTrainConfig))
