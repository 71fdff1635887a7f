"""The OPSD trainer, top to bottom: rollouts from the sidecar, verification and filtering, teacher forward,
student update, weight push, logging and checkpoints. Every rank runs this loop; global rank 0 talks to the
sidecar and broadcasts the rollouts, so all ranks build the same step.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_opsd.config import OPSDConfig, config_to_dict, distillation_warnings, save_config
from megatron_opsd.training.loop import run_steps


@dataclass
class StepRollouts:
    """What rank 0 gathered for one step (broadcast to every rank as a picklable object)."""

    student_prompts: list  # per prompt: token ids
    responses: list  # per prompt: list of n token-id lists
    correct: list  # per prompt: list of n bools (the weight versions are checked by check_on_policy)
    rewards: list = field(default_factory=list)  # per prompt: list of n float rewards (GRPO)
    logprobs: list = field(default_factory=list)  # per prompt: list of n sidecar log-prob lists (GRPO)
    # teacher context name -> per prompt -> per rollout: the teacher's prompt ids, or None where that rollout has
    # no teacher (a demonstration context and no other correct rollout in its group). One context, or three for
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
    distils = True  # the loss section is used (GRPO: False)

    def __init__(self, cfg: OPSDConfig):
        from megatron.core import parallel_state as ps

        from megatron_opsd.data.datasets import PromptSampler, load_prompt_dataset
        from megatron_opsd.models.gpt import build_model_from_config
        from megatron_opsd.models.tokenizer import load_tokenizer
        from megatron_opsd.models.weights import load_hf_checkpoint
        from megatron_opsd.parallel import init_distributed
        from megatron_opsd.rewards import build_reward
        from megatron_opsd.rollout.process import refuse_local_sidecar_on_gpu
        from megatron_opsd.training.engine import setup_training
        from megatron_opsd.training.schedule import FP32EMA, copy_weights_

        self.cfg = cfg
        refuse_local_sidecar_on_gpu(cfg.rollout.sidecar_urls)
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
        if cfg.model.lora.rank > 0:  # LoRA: the teacher is the student with its adapters switched (lora_teacher.py)
            from megatron_opsd.training.lora_teacher import add_teacher_adapters

            add_teacher_adapters(self.student, cfg.teacher)
        elif cfg.teacher.weights != "live":  # a second replica sharded like the student
            self.teacher = build_model_from_config(cfg, teacher=True)
            copy_weights_(self.teacher, self.student)
            if self.rank == 0:
                n = sum(p.numel() * p.element_size() for c in self.teacher for p in c.parameters())
                print(f"teacher ({cfg.teacher.weights}) holds {n / 2**20:.1f} MiB of weights on rank 0")
        self.ema = FP32EMA(self.teacher) if self.teacher is not None and cfg.teacher.weights == "ema" else None
        # Purified OPSD's reference-only and base forwards are the *initial* model (the PMI target contrasts the
        # teacher with what the model knew before training): a frozen copy unless the teacher already is one
        # (with LoRA: the base model, adapters off).
        self.initial = None
        if cfg.teacher.purified and cfg.teacher.weights != "frozen" and cfg.model.lora.rank == 0:
            self.initial = build_model_from_config(cfg)
            copy_weights_(self.initial, self.student)
        if self.rank == 0 and self.distils:
            for message in distillation_warnings(cfg):
                warnings.warn(message, stacklevel=2)
        self.ddp, self.optimizer, self.scheduler = setup_training(self.student, cfg.optim, cfg.train.steps)
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
                max_model_len=max_len, max_lora_rank=self._sidecar_lora_rank(),
                tensor_parallel_size=self.cfg.rollout.local_sidecar_tensor_parallel_size)
            urls = [self.sidecar.url]
        urls = _broadcast(urls)
        r = self.cfg.rollout
        self.client = SidecarClient(urls, transport=r.transport, collective_host=r.collective_host,
                                    sync_timeout_s=r.sync_timeout_s)
        if self.rank == 0:
            self.client.wait_healthy()

    # LoRA hooks: with model.lora.sync=adapter the sidecar serves base + adapter and each step pushes the adapter
    def _adapter_sync(self) -> bool:
        return self.cfg.model.lora.rank > 0 and self.cfg.model.lora.sync == "adapter"

    def _sidecar_lora_rank(self) -> Optional[int]:
        from megatron_opsd.rollout.lora import vllm_max_lora_rank

        return vllm_max_lora_rank(self.cfg.model.lora.rank) if self._adapter_sync() else None

    def _push_weights(self, version: int) -> None:
        """COLLECTIVE: the new weights to the sidecar: merged, or (LoRA, sync=adapter) only the adapter."""
        if self._adapter_sync():
            from megatron_opsd.models.lora import LoRASettings
            from megatron_opsd.rollout.lora import push_adapter_from_model

            push_adapter_from_model(self.client, self.student, LoRASettings.from_config(self.cfg.model.lora),
                                    version, self.cfg.model.path)
        else:
            self.client.push_weights(self.student, version=version)

    # ------------------------------------------------------------------------------------------ rollouts
    def _teacher_prompts(self, examples: list, texts: list, correct: list) -> dict:
        """``StepRollouts.teachers``: each teacher context's prompt ids per rollout (``texts``/``correct`` per
        prompt, per rollout). A demonstration context (``rollout``, DemoPSD; or a ``template`` reading
        ``{{ rollout }}``) sees another correct rollout of the same group (``filters.correct_demonstrations``), and
        may be up to ``data.max_prompt_tokens + rollout.max_tokens`` long; rollouts without one get None (they are
        left out of the step)."""
        from megatron_opsd.data.contexts import needs_demonstration, teacher_context_names, teacher_messages
        from megatron_opsd.data.sequences import encode_prompt
        from megatron_opsd.rewards.filters import correct_demonstrations

        cfg = self.cfg

        def encode(ex, ctx: str, demo: Optional[str] = None) -> list:
            limit = cfg.data.max_prompt_tokens + (cfg.rollout.max_tokens if demo is not None else 0)
            return encode_prompt(self.tokenizer, teacher_messages(ex, cfg.data, cfg.teacher, ctx, demo), limit, ex.id,
                                 f"teacher ({ctx})", cfg.model.enable_thinking)

        teachers = {}
        for ctx in teacher_context_names(cfg.teacher):
            teachers[ctx] = []
            for ex, group, demos in zip(examples, texts, correct_demonstrations(correct)):
                if not needs_demonstration(ctx, cfg.teacher):  # one prompt shared by the group
                    teachers[ctx].append([encode(ex, ctx)] * len(group))
                    continue
                teachers[ctx].append([None if k is None else encode(ex, ctx, group[k]) for k in demos])
        return teachers

    def _generation_limit(self) -> int:
        """Tokens to generate per rollout: ``rollout.max_tokens``, or only the step's horizon (truncated /
        progressive OPD) when nothing needs whole responses. Whole responses are needed to grade them for
        ``rollout.filter: correct | incorrect`` and to show a correct one to a demonstration teacher (DemoPSD);
        then they are generated in full and cut at the horizon for the forwards. With ``rollout.filter: all``
        the grading only feeds the logs, and ``rollout/accuracy`` then grades the first h tokens (near 0):
        measure accuracy with ``train.eval_every``, whose generation is not truncated."""
        from megatron_opsd.data.contexts import needs_demonstration, teacher_context_names
        from megatron_opsd.data.sequences import horizon_at_step

        cfg = self.cfg
        horizon = horizon_at_step(self.step, cfg.rollout)
        whole = cfg.rollout.filter != "all" or any(needs_demonstration(c, cfg.teacher)
                                                   for c in teacher_context_names(cfg.teacher))
        return cfg.rollout.max_tokens if horizon is None or whole else min(cfg.rollout.max_tokens, horizon)

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
                top_k=cfg.rollout.top_k if cfg.rollout.top_k > 0 else None, max_tokens=self._generation_limit(),
                stop_token_ids=[self.tokenizer.eos_token_id], seed=cfg.rollout.seed + 100_003 * self.step)
            check_on_policy(samples, self.step, cfg.rollout.max_staleness)
            texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in samples for s in g]
            owners = [ex for ex, g in zip(examples, samples) for _ in g]
            scores = iter(self.reward(texts, owners))  # one batched call: math-verify grades in a pool
            rewards = [[float(next(scores)) for _ in g] for g in samples]
            correct = [[r > 0.5 for r in g] for g in rewards]
            per_group = iter(texts)
            teachers = self._teacher_prompts(examples, [[next(per_group) for _ in g] for g in samples], correct)
            result = StepRollouts(student, [[s.token_ids for s in g] for g in samples], correct, rewards,
                                  [[s.logprobs for s in g] for g in samples], teachers)
        return _broadcast(result)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        from megatron_opsd.data.sequences import horizon_at_step
        from megatron_opsd.rewards.filters import group_filter
        from megatron_opsd.training.engine import optimizer_step, zero_grads
        from megatron_opsd.training.opsd import (build_microbatches, opsd_metrics, student_forward_backward,
                                                 teacher_signal_source, token_weights)
        from megatron_opsd.training.lora_teacher import step_teacher_adapters
        from megatron_opsd.training.schedule import copy_weights_

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
        metrics = {"loss": 0.0, "divergence": 0.0}  # + entropy/* when logged (loss.log_entropy)
        if keep:
            # truncated OPD: student and teacher sequences end at prompt + h (causal attention: the logits
            # before the cut do not depend on the tokens after it, so this is exact and saves the forwards)
            responses = [rollouts.responses[i][j][:horizon] for i, j in keep]
            weights = token_weights([len(r) for r in responses], cfg.loss.reduction)
            kw = self._batch_layout()
            student_mbs = build_microbatches([rollouts.student_prompts[i] for i, _ in keep], responses, weights, **kw)
            loss = cfg.loss
            t0 = time.perf_counter()
            teacher_mbs = {context: build_microbatches([prompts[i][j] for i, j in keep], responses, weights, **kw)
                           for context, prompts in rollouts.teachers.items()}  # three contexts for Purified OPSD
            # PP=1: teacher forwards run per micro-batch inside the student's step (time/student includes them)
            signals = teacher_signal_source(self._teacher_model, teacher_mbs, student_mbs, loss=loss,
                                            real_vocab_size=self.real_vocab, teacher_scope=self._teacher_scope)
            times["time/teacher"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            zero_grads(self.ddp, self.optimizer)
            out = student_forward_backward(self.ddp, student_mbs, signals, loss=loss, real_vocab_size=self.real_vocab)
            step_info = optimizer_step(self.optimizer, self.scheduler)
            times["time/student"] = time.perf_counter() - t0
            metrics.update(opsd_metrics(out.metrics, cfg.loss))
            metrics["loss"] = out.loss
            metrics["grad_norm"] = float(step_info["grad_norm"] or 0.0)
        if self.teacher is not None:
            if self.ema is not None:
                self.ema.update_(self.student, cfg.teacher.ema_decay)
            elif cfg.teacher.weights == "refresh" and (self.step + 1) % cfg.teacher.refresh_every == 0:
                copy_weights_(self.teacher, self.student)
        step_teacher_adapters(self.student, cfg.teacher, self.step)  # LoRA's EMA / refreshed adapters
        return self._finish_step(metrics, stats, times)

    def _batch_layout(self) -> dict:
        """``build_microbatches``' layout keywords for this rank (shared with GRPO)."""
        return dict(micro_batch_size=self.cfg.optim.micro_batch_size, pad_id=self.tokenizer.pad_token_id,
                    pad_multiple=self.cfg.parallel.sequence_multiple(self.cfg.data.pad_to_multiple_of),
                    dp_size=self.dp_size, dp_rank=self.dp_rank)

    def _teacher_model(self, context: str) -> list:
        """The chunks that run teacher context ``context``: the teacher replica (or the live student), except
        Purified OPSD's reference-only and base forwards, which are always the frozen initial model."""
        from megatron_opsd.data.contexts import PURIFIED_BASE_CONTEXTS

        if self.cfg.teacher.purified and context in PURIFIED_BASE_CONTEXTS:
            return self.initial or self.teacher or self.ddp
        return self.teacher or self.ddp

    def _teacher_scope(self, context: str):
        """Around each teacher forward: with LoRA, the adapters that context uses (``lora_teacher``); else a no-op."""
        from megatron_opsd.training.lora_teacher import teacher_adapters

        return teacher_adapters(self.ddp, self.cfg.teacher, context)

    def _finish_step(self, metrics: dict, stats: dict, times: dict) -> dict:
        """After the optimizer step: push the new weights (next rollouts come from them), count the step, and
        every ``train.eval_every`` steps evaluate the held-out set on the sidecar. Shared with GRPO."""
        t0 = time.perf_counter()
        self._push_weights(self.step + 1)
        times["time/sync"] = time.perf_counter() - t0
        self.step += 1
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        every = self.cfg.train.eval_every
        if every and self.step % every == 0 and self.rank == 0:
            from megatron_opsd.evaluation.runner import evaluate_for_training

            metrics.update(evaluate_for_training(self.client, self.tokenizer, self.cfg, self.step,
                                                 self.run_dir / "eval"))
        return {**metrics, **stats, **times}

    # ------------------------------------------------------------------------------------------ checkpoints
    def _extra_models(self) -> Optional[dict]:
        if self.teacher is None:
            return None
        if self.ema is not None and self.ema.has_copies:  # a bf16 EMA teacher's fp32 average
            return {"teacher": self.teacher, "teacher_ema_fp32": self.ema.checkpoint_chunks()}
        return {"teacher": self.teacher}

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
                self._push_weights(self.step)
            history = run_steps(self, self.progress_name, lambda m: dict(
                loss=f"{m['loss']:.4f}", kl=f"{m['divergence']:.4f}", acc=f"{m['rollout/accuracy']:.2f}",
                len=f"{m['rollout/mean_length']:.0f}", tok_s=f"{m['tokens_per_s']:.0f}"))
            self.save()
        finally:
            self.close()
        return history

    def close(self) -> None:
        """Close the metrics files and stop the local sidecar (if this rank started one)."""
        if self.logger is not None:
            self.logger.close()
        if self.sidecar is not None:
            self.sidecar.stop()


def train(cfg: OPSDConfig) -> list[dict]:
    """Run OPSD from ``cfg`` on this process (launched by torchrun, srun, or run_distributed)."""
    return OPSDTrainer(cfg).fit()
