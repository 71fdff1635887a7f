"""The GRPO step on the OPSD trainer: rewards -> (overlong shaping) -> group advantages -> (dynamic sampling)
-> clipped policy loss [+ KL to the frozen reference] through megatron's schedule -> optimizer step -> weight push.
The maths is in ``training/grpo.py``; everything else (sidecar, broadcast, logging, checkpoints) is OPSDTrainer's.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_opsd.training.grpo import (RLTrainConfig, clipped_policy_loss, k3_kl, rollout_weights, step_rewards,
                                         validate_rl_config)
from megatron_opsd.training.opsd import response_token_ids, tp_group
from megatron_opsd.training.trainer import OPSDTrainer


class GRPOTrainer(OPSDTrainer):
    """The OPSD trainer's machinery (sidecar, rollouts broadcast from rank 0, weight push, logging,
    checkpoints, fit loop) with a GRPO step. No teacher: the replica slot holds the frozen reference model
    when ``rl.kl_coef > 0`` (and nothing otherwise).

    Log-probs are the raw model's (temperature 1), as the sidecar returns them, on both sides of the ratio.
    """

    progress_name = "grpo"
    distils = False  # no distillation loss: loss.* settings other than chunk_tokens are unused

    def __init__(self, cfg: RLTrainConfig):
        import copy

        cfg = copy.deepcopy(cfg)
        if cfg.model.lora.rank > 0 and cfg.rl.kl_coef > 0:  # LoRA hook: the reference would need the adapters off
            from megatron_opsd.config import ConfigError

            raise ConfigError("model.lora with rl.kl_coef > 0 is not supported yet; set rl.kl_coef=0 or "
                              "model.lora.rank=0")
        cfg.teacher.weights = "frozen" if cfg.rl.kl_coef > 0 else "live"  # frozen replica = the reference
        cfg.teacher.context = "base"  # the unused teacher prompt is the student's (no reference field needed)
        super().__init__(validate_rl_config(cfg))

    def _token_logprobs(self, chunks: list, mbs: list) -> Optional[list]:
        """Forward-only log-probs of each micro-batch's response tokens (last PP stage; None elsewhere)."""
        from megatron_opsd.losses import vocab_parallel_token_logprobs
        from megatron_opsd.training.opsd import collect_teacher_rows

        rows = collect_teacher_rows(chunks, mbs)
        if rows is None:
            return None
        return [vocab_parallel_token_logprobs(r, mb["targets"], group=tp_group(),
                                              vocab_range=(0, self.real_vocab)) for r, mb in zip(rows, mbs)]

    def _microbatches(self, rollouts, keep: list, advantages: list) -> list:
        from megatron_opsd.training.opsd import build_microbatches

        responses = [rollouts.responses[i][j] for i, j in keep]
        prompts = [rollouts.student_prompts[i] for i, _ in keep]
        old = [torch.tensor(rollouts.logprobs[i][j], dtype=torch.float32) for i, j in keep]
        for (i, j), lp, r in zip(keep, old, responses):
            if len(lp) != len(r):
                raise RuntimeError(f"rollout {i}/{j}: the sidecar returned {len(lp)} log-probs for {len(r)} tokens")
        per_token = {
            "weights": rollout_weights([len(r) for r in responses], self.cfg.rl.token_level_loss),
            "advantages": [torch.full((len(r),), float(advantages[i][j])) for (i, j), r in zip(keep, responses)],
            "old_logprobs": old,
        }
        kw = self._batch_layout()
        mbs = build_microbatches(prompts, responses, per_token["weights"], **kw)
        for key in ("advantages", "old_logprobs"):  # same layout as the weights: one value per response row
            for mb, other in zip(mbs, build_microbatches(prompts, responses, per_token[key], **kw)):
                mb[key] = other["weights"]
        for mb in mbs:
            mb["targets"] = response_token_ids(mb)
        return mbs

    def _loss_fn(self, ref_rows: Optional[dict]):
        from megatron_opsd.losses import vocab_parallel_divergence, vocab_parallel_entropy, vocab_parallel_token_logprobs

        rl, group, vocab_range = self.cfg.rl, tp_group(), (0, self.real_vocab)

        def loss_fn(logits: torch.Tensor, mb: dict):
            rows, mask, weights = logits[mb["row_mask"]], mb["weights"] > 0, mb["weights"]
            logp = vocab_parallel_token_logprobs(rows, mb["targets"], group=group, vocab_range=vocab_range)
            loss, clipped = clipped_policy_loss(logp, mb["old_logprobs"], mb["advantages"], weights,
                                                eps_low=rl.clip_eps_low, eps_high=rl.clip_eps_high)
            kl = torch.zeros_like(logp, dtype=torch.float32)
            if rl.kl_coef > 0 and rl.kl_estimator == "full":
                weighted, kl = vocab_parallel_divergence(
                    rows, ref_rows[id(mb)], kind="reverse_kl", group=group, loss_mask=mask,
                    chunk_tokens=self.cfg.loss.chunk_tokens, vocab_range=vocab_range, reduction="sum",
                    token_weights=weights)
                loss = loss + rl.kl_coef * weighted
            elif rl.kl_coef > 0:
                ref = mb["ref_logprobs"]
                kl = k3_kl(logp, ref) if rl.kl_estimator == "k3" else logp.float() - ref.float()
                loss = loss + rl.kl_coef * (kl * weights).sum()
            with torch.no_grad():
                entropy = vocab_parallel_entropy(rows.detach(), group=group, vocab_range=vocab_range,
                                                 chunk_tokens=self.cfg.loss.chunk_tokens)
                ratio = torch.exp(logp.detach().float() - mb["old_logprobs"].float())
                m = mask.float()
                return loss, {"tokens": m.sum(), "clipped": (clipped.float() * m).sum(),
                              "ratio_sum": (ratio * m).sum(), "kl_sum": (kl.detach().float() * m).sum(),
                              "entropy_sum": (entropy.float() * m).sum()}

        return loss_fn

    def _sum_over_ranks(self, values: dict) -> dict:
        """Sum per-rank partial sums over every rank (callers pass zeros where they do not own the numbers)."""
        from megatron_opsd.parallel.device import sum_over_ranks

        return sum_over_ranks([values], sorted(values))

    def train_step(self) -> dict:
        import time
        from statistics import fmean

        from megatron.core import parallel_state as ps

        from megatron_opsd.rewards.filters import group_filter
        from megatron_opsd.training.engine import optimizer_step, zero_grads
        from megatron_opsd.training.schedule import forward_backward

        cfg, rl = self.cfg, self.cfg.rl
        times = {}
        t0 = time.perf_counter()
        rollouts = self._rollouts()
        times["time/rollout"] = time.perf_counter() - t0
        lengths = [[len(y) for y in ys] for ys in rollouts.responses]
        grouped = step_rewards(rollouts.rewards, rollouts.correct, lengths, rl, cfg.rollout.max_tokens)
        shaped, advantages, use = grouped.shaped, grouped.advantages, grouped.used
        keep = [(i, j) for i, ok in enumerate(use) if ok for j in range(len(rollouts.responses[i]))]
        stats = {f"rollout/{k}": v for k, v in group_filter(rollouts.responses, rollouts.correct, "all").stats.items()}
        stats.update({"reward/mean": fmean(r for g in rollouts.rewards for r in g),
                      "reward/shaped_mean": fmean(r for g in shaped for r in g),
                      "rl/groups_kept": sum(use) / len(use), "rl/num_trained": float(len(keep))})
        metrics = {"loss": 0.0, "divergence": 0.0, "tokens": 0.0}
        if keep:
            mbs = self._microbatches(rollouts, keep, advantages)
            t0 = time.perf_counter()
            last = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
            behaviour = {"logprob_diff_sum": 0.0}
            if rl.recompute_old_logprobs:  # megatron's log-probs under the weights that sampled (pre-update)
                recomputed = self._token_logprobs(self.ddp, mbs)
                for mb, lp in zip(mbs, recomputed or []):
                    if last:
                        behaviour["logprob_diff_sum"] += float(((lp - mb["old_logprobs"]).abs() * (mb["weights"] > 0)).sum())
                    mb["old_logprobs"] = lp
            ref_rows = None
            if rl.kl_coef > 0 and rl.kl_estimator == "full":
                from megatron_opsd.training.opsd import collect_teacher_rows

                ref_rows = {id(mb): rows for mb, rows in zip(mbs, collect_teacher_rows(self.teacher, mbs) or [])}
            elif rl.kl_coef > 0:
                for mb, lp in zip(mbs, self._token_logprobs(self.teacher, mbs) or []):
                    mb["ref_logprobs"] = lp
            times["time/old_and_ref"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            for chunk in self.ddp:
                chunk.train()
            zero_grads(self.ddp, self.optimizer)
            tokens = mbs[0]["tokens"]
            out = forward_backward(self.ddp, mbs, self._loss_fn(ref_rows), seq_length=tokens.shape[1],
                                   micro_batch_size=tokens.shape[0], loss_reduction="sum")
            step_info = optimizer_step(self.optimizer, self.scheduler)
            times["time/policy"] = time.perf_counter() - t0
            local = {k: 0.0 for k in ("tokens", "clipped", "ratio_sum", "kl_sum", "entropy_sum")}
            if last:
                for m in out.metrics:
                    for k in local:
                        local[k] += float(m[k])
            sums = self._sum_over_ranks({**local, **behaviour})
            n = max(sums["tokens"], 1.0)
            metrics.update({"loss": out.loss, "tokens": sums["tokens"], "divergence": sums["kl_sum"] / n,
                            "rl/clip_fraction": sums["clipped"] / n, "rl/ratio_mean": sums["ratio_sum"] / n,
                            "entropy/student": sums["entropy_sum"] / n,
                            "grad_norm": float(step_info["grad_norm"] or 0.0)})
            if rl.recompute_old_logprobs:
                metrics["rl/sidecar_logprob_abs_diff"] = sums["logprob_diff_sum"] / n
        return self._finish_step(metrics, stats, times)


def train_grpo(cfg: RLTrainConfig) -> list[dict]:
    """Run GRPO from ``cfg`` on this process (launched by torchrun, srun, or run_distributed)."""
    return GRPOTrainer(cfg).fit()
