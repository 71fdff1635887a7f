"""The OPSD trainer, top to bottom: rollouts from the sidecar, verification and filtering, teacher forward,
student update, weight push, logging and checkpoints. Every rank runs this loop; global rank 0 talks to the
sidecar and broadcasts the rollouts, so all ranks build the same step.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.config import OPSDConfig, config_to_dict, save_config
from megatron_opsd.training.loop import run_steps


@dataclass
class StepRollouts:
    """What rank 0 gathered for one step (broadcast to every rank as a picklable object)."""

    student_prompts: list  # per prompt: token ids
    teacher_prompts: list  # per prompt: token ids of teacher.context when the group shares it ([] otherwise)
    responses: list  # per prompt: list of n token-id lists
    correct: list  # per prompt: list of n bools
    versions: list  # per prompt: list of n weight versions
    rewards: list = field(default_factory=list)  # per prompt: list of n float rewards (GRPO)
    logprobs: list = field(default_factory=list)  # per prompt: list of n sidecar log-prob lists (GRPO)
    # teacher context name -> per prompt -> per rollout: the teacher's prompt ids, or None where that rollout has
    # no teacher (teacher.context=rollout and no other correct rollout in its group). One context, or three for
    # Purified OPSD (teacher.context, reference_only, base), in that order.
    teachers: dict = field(default_factory=dict)


def _broadcast(obj, src: int = 0):
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


class MetricsLogger:
    """JSONL metrics file always; TensorBoard and wandb when enabled (rank 0 only)."""

    def __init__(self, cfg: OPSDConfig, run_dir: Path):
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = self.wandb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: pip install tensorboard (continuing with metrics.jsonl)")
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(project=cfg.logging.wandb_project, config=config_to_dict(cfg), dir=str(run_dir))

    def log(self, step: int, metrics: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class OPSDTrainer:
    progress_name = "opsd"  # the progress bar's label

    def __init__(self, cfg: OPSDConfig):
        from megatron.core import parallel_state as ps

        from megatron_opsd.data.datasets import PromptSampler, load_prompt_dataset
        from megatron_opsd.models.gpt import build_model_from_config
        from megatron_opsd.models.tokenizer import load_tokenizer
        from megatron_opsd.models.weights import load_hf_checkpoint
        from megatron_opsd.parallel import init_distributed
        from megatron_opsd.rewards import build_reward
        from megatron_opsd.training.engine import OptimizerSettings, setup_training
        from megatron_opsd.training.schedule import copy_weights_

        self.cfg = cfg
        init_distributed(cfg.parallel)
        self.rank = torch.distributed.get_rank()
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.run_dir = Path(cfg.logging.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
        examples = load_prompt_dataset(cfg.data.train_path, cfg.data)
        self.sampler = PromptSampler(examples, cfg.rollout.prompts_per_step, cfg.data.shuffle, cfg.data.seed)
        self.reward = build_reward(cfg.reward)

        self.student = build_model_from_config(cfg)
        load_hf_checkpoint(self.student, cfg.model.path)
        self.real_vocab = self.student[0].real_vocab_size
        self.teacher = None
        if cfg.teacher.weights != "live":  # a second replica sharded like the student
            self.teacher = build_model_from_config(cfg)
            copy_weights_(self.teacher, self.student)
            if self.rank == 0:
                n = sum(p.numel() * p.element_size() for c in self.teacher for p in c.parameters())
                print(f"teacher ({cfg.teacher.weights}) holds {n / 2**20:.1f} MiB of weights on rank 0")
        settings = OptimizerSettings.from_config(cfg.optim, cfg.train.steps)
        self.ddp, self.optimizer, self.scheduler = setup_training(self.student, settings)
        self.step = 0
        self.sidecar = None
        self.client = None
        self.logger = MetricsLogger(cfg, self.run_dir) if self.rank == 0 else None

    # ------------------------------------------------------------------------------------------ sidecar
    def _connect_sidecar(self) -> None:
        from megatron_opsd.rollout.client import SidecarClient
        from megatron_opsd.rollout.process import start_sidecar_process

        urls = list(self.cfg.rollout.sidecar_urls)
        if not urls and self.rank == 0:
            max_len = self.cfg.data.max_prompt_tokens + self.cfg.rollout.max_tokens
            self.sidecar = start_sidecar_process(
                self.cfg.model.path, port=self.cfg.rollout.local_sidecar_port,
                log_path=self.run_dir / "sidecar.log", dtype=self.cfg.rollout.local_sidecar_dtype,
                max_model_len=max_len)
            urls = [self.sidecar.url]
        urls = _broadcast(urls)
        self.client = SidecarClient(urls)
        if self.rank == 0:
            self.client.wait_healthy()

    # ------------------------------------------------------------------------------------------ rollouts
    def _teacher_prompts(self, examples: list, texts: list, correct: list) -> dict:
        """``StepRollouts.teachers``: each teacher context's prompt ids per rollout (``texts``/``correct`` per
        prompt, per rollout). A ``rollout`` (DemoPSD) teacher sees the first *other* correct rollout of the same
        group, and may be up to ``data.max_prompt_tokens + rollout.max_tokens`` long; rollouts without one get
        None (they are left out of the step)."""
        from megatron_opsd.data.contexts import teacher_context_names, teacher_messages
        from megatron_opsd.data.sequences import encode_prompt

        cfg = self.cfg

        def encode(ex, ctx: str, demo: Optional[str] = None) -> list:
            limit = cfg.data.max_prompt_tokens + (cfg.rollout.max_tokens if ctx == "rollout" else 0)
            return encode_prompt(self.tokenizer, teacher_messages(ex, cfg.data, cfg.teacher, ctx, demo), limit, ex.id,
                                 f"teacher ({ctx})", cfg.model.enable_thinking)

        teachers = {}
        for ctx in teacher_context_names(cfg.teacher):
            teachers[ctx] = []
            for ex, group, ok in zip(examples, texts, correct):
                if ctx != "rollout":  # one prompt shared by the group
                    teachers[ctx].append([encode(ex, ctx)] * len(group))
                    continue
                demos = [next((k for k in range(len(group)) if ok[k] and k != j), None) for j in range(len(group))]
                teachers[ctx].append([None if k is None else encode(ex, ctx, group[k]) for k in demos])
        return teachers

    def _rollouts(self) -> StepRollouts:
        from megatron_opsd.data.sequences import student_prompt_ids
        from megatron_opsd.rollout.client import check_on_policy

        cfg, examples = self.cfg, self.sampler.next_batch()
        result = None
        if self.rank == 0:
            thinking = cfg.model.enable_thinking
            student = [student_prompt_ids(self.tokenizer, ex, cfg.data, thinking) for ex in examples]
            samples = self.client.generate(
                student, n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k if cfg.rollout.top_k > 0 else None, max_tokens=cfg.rollout.max_tokens,
                stop_token_ids=[self.tokenizer.eos_token_id], seed=cfg.rollout.seed + 100_003 * self.step)
            check_on_policy(samples, self.step, cfg.rollout.max_staleness)
            texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in samples for s in g]
            owners = [ex for ex, g in zip(examples, samples) for _ in g]
            scores = iter(self.reward(texts, owners))  # one batched call: math-verify grades in a pool
            rewards = [[float(next(scores)) for _ in g] for g in samples]
            correct = [[r > 0.5 for r in g] for g in rewards]
            per_group = iter(texts)
            teachers = self._teacher_prompts(examples, [[next(per_group) for _ in g] for g in samples], correct)
            shared = [] if cfg.teacher.context == "rollout" else [g[0] for g in teachers[cfg.teacher.context]]
            result = StepRollouts(student, shared, [[s.token_ids for s in g] for g in samples], correct,
                                  [[s.weight_version for s in g] for g in samples], rewards,
                                  [[s.logprobs for s in g] for g in samples], teachers)
        return _broadcast(result)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        from megatron.core import parallel_state as ps

        from megatron_opsd.data.sequences import horizon_at_step
        from megatron_opsd.rewards.filters import group_filter
        from megatron_opsd.training.engine import optimizer_step, zero_grads
        from megatron_opsd.training.opsd import (LossSettings, build_microbatches, collect_teacher_rows,
                                                 student_forward_backward, teacher_signals, token_weights)
        from megatron_opsd.training.schedule import copy_weights_, ema_update_

        cfg = self.cfg
        times = {}
        t0 = time.perf_counter()
        rollouts = self._rollouts()
        times["time/rollout"] = time.perf_counter() - t0
        filtered = group_filter(rollouts.responses, rollouts.correct, cfg.rollout.filter)
        # a rollout is distilled on if the filter keeps it and every teacher context exists for it (DemoPSD)
        has_teacher = [[all(t[i][j] is not None for t in rollouts.teachers.values()) for j in range(len(g))]
                       for i, g in enumerate(rollouts.responses)]
        keep = [(i, j) for i, idx in enumerate(filtered.kept_indices) for j in idx if has_teacher[i][j]]
        stats = {f"rollout/{k}": v for k, v in filtered.stats.items()}
        stats["rollout/no_teacher"] = float(sum(len(idx) for idx in filtered.kept_indices) - len(keep))
        lengths_all = sorted(len(r) for g in rollouts.responses for r in g)
        stats["rollout/length_p50"] = float(lengths_all[len(lengths_all) // 2])
        stats["rollout/length_p90"] = float(lengths_all[min(len(lengths_all) - 1, int(0.9 * len(lengths_all)))])
        horizon = horizon_at_step(self.step, cfg.rollout)  # truncated (fixed) or progressive (growing) OPD
        if horizon is not None:
            stats["rollout/horizon"] = float(horizon)
        metrics = {"loss": 0.0, "divergence": 0.0, "entropy/student": 0.0, "entropy/teacher": 0.0}
        if keep:
            responses = [rollouts.responses[i][j] for i, j in keep]
            lengths = [min(len(r), horizon) if horizon else len(r) for r in responses]
            weights = token_weights(lengths, cfg.loss.reduction)
            weights = [torch.cat([w, torch.zeros(len(r) - len(w))]) for w, r in zip(weights, responses)]
            kw = dict(micro_batch_size=cfg.optim.micro_batch_size, pad_id=self.tokenizer.pad_token_id,
                      dp_size=self.dp_size, dp_rank=self.dp_rank)
            student_mbs = build_microbatches([rollouts.student_prompts[i] for i, _ in keep], responses, weights, **kw)
            loss = LossSettings.from_config(cfg)
            t0 = time.perf_counter()
            teacher_rows = {}  # one forward per teacher context (three for Purified OPSD)
            for context, prompts in rollouts.teachers.items():
                teacher_mbs = build_microbatches([prompts[i][j] for i, j in keep], responses, weights, **kw)
                teacher_rows[context] = collect_teacher_rows(self.teacher or self.ddp, teacher_mbs)
            signals = teacher_signals(teacher_rows, student_mbs, loss=loss, real_vocab_size=self.real_vocab)
            del teacher_rows
            times["time/teacher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            zero_grads(self.ddp, self.optimizer)
            out = student_forward_backward(self.ddp, student_mbs, signals, loss=loss, real_vocab_size=self.real_vocab)
            step_info = optimizer_step(self.optimizer, self.scheduler)
            times["time/student"] = time.perf_counter() - t0
            metrics.update(self._reduce_metrics(out.metrics, ps))
            metrics["loss"] = out.loss
            metrics["grad_norm"] = float(step_info["grad_norm"] or 0.0)
        if self.teacher is not None:
            if cfg.teacher.weights == "ema":
                ema_update_(self.teacher, self.student, cfg.teacher.ema_decay)
            elif cfg.teacher.weights == "refresh" and (self.step + 1) % cfg.teacher.refresh_every == 0:
                copy_weights_(self.teacher, self.student)
        return self._finish_step(metrics, stats, times)

    def _finish_step(self, metrics: dict, stats: dict, times: dict) -> dict:
        """After the optimizer step: push the new weights (next rollouts come from them), count the step, and
        every ``train.eval_every`` steps evaluate the held-out set on the sidecar. Shared with GRPO."""
        t0 = time.perf_counter()
        self.client.push_weights(self.student, version=self.step + 1)
        times["time/sync"] = time.perf_counter() - t0
        self.step += 1
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        every = self.cfg.train.eval_every
        if every and self.step % every == 0 and self.rank == 0:
            from megatron_opsd.evaluation.runner import evaluate_for_training

            metrics.update(evaluate_for_training(self.client, self.tokenizer, self.cfg, self.step,
                                                 self.run_dir / "eval"))
        return {**metrics, **stats, **times}

    def _reduce_metrics(self, per_mb: list, ps) -> dict:
        """Sum the last stage's micro-batch metrics over DP (TP rank 0 only), so rank 0 can log them."""
        keys = ("divergence_sum", "student_entropy_sum", "teacher_entropy_sum", "tokens")
        sums = torch.zeros(len(keys), dtype=torch.float64)
        if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
            for m in per_mb:
                sums += torch.tensor([float(m[k]) for k in keys], dtype=torch.float64)
        if torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sums)
        tokens = max(sums[3].item(), 1.0)
        return {"divergence": sums[0].item() / tokens, "entropy/student": sums[1].item() / tokens,
                "entropy/teacher": sums[2].item() / tokens, "tokens": sums[3].item()}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _extra_models(self) -> Optional[dict]:
        return {"teacher": self.teacher} if self.teacher is not None else None

    def save(self) -> None:
        from megatron_opsd.training.checkpoint import save_checkpoint

        save_checkpoint(self.ckpt_dir, self.step, self.ddp, self.optimizer, self.scheduler,
                        data_state=self.sampler.state_dict(), extra_models=self._extra_models(),
                        config_dict=config_to_dict(self.cfg), keep_last=self.cfg.checkpoint.keep_last)

    def maybe_resume(self) -> None:
        from megatron_opsd.training.checkpoint import load_latest

        if not self.cfg.checkpoint.resume:
            return
        loaded = load_latest(self.ckpt_dir, self.ddp, self.optimizer, self.scheduler,
                             extra_models=self._extra_models())
        if loaded is not None:
            self.step = loaded.step
            self.sampler.load_state_dict(loaded.data_state)
            if self.rank == 0:
                print(f"resumed from {loaded.path} at step {self.step}")

    # ------------------------------------------------------------------------------------------ loop
    def fit(self) -> list[dict]:
        self.maybe_resume()
        try:  # SIGTERM (lifecycle.install_shutdown_handlers) raises SystemExit anywhere in here
            self._connect_sidecar()
            if self.step > 0:  # the sidecar starts from model.path: give it the resumed weights
                self.client.push_weights(self.student, version=self.step)
            history = run_steps(self, self.progress_name, lambda m: dict(
                loss=f"{m['loss']:.4f}", kl=f"{m['divergence']:.4f}", acc=f"{m['rollout/accuracy']:.2f}",
                len=f"{m['rollout/mean_length']:.0f}", tok_s=f"{m['tokens_per_s']:.0f}"))
            self.save()
        finally:
            if self.logger is not None:
                self.logger.close()
            if self.sidecar is not None:
                self.sidecar.stop()
        return history


def train(cfg: OPSDConfig) -> list[dict]:
    """Run OPSD from ``cfg`` on this process (launched by torchrun, srun, or run_distributed)."""
    return OPSDTrainer(cfg).fit()
