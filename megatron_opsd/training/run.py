"""The run machinery every trainer composes (OPSD, GRPO, SFT): distributed init, run directory and saved config,
tokenizer, the student built and loaded from HF, optimizer and scheduler, checkpoint save/resume, the metrics
logger, the sidecar connection and weight push, and ``fit`` (resume -> sidecar -> step loop -> final save -> HF
export).

A trainer is a small object holding what its method needs on top (teacher replicas, a reward, a reference model)
and a ``train_step(timer)``; it never subclasses another trainer. ``Run.fit(trainer)`` and the step loop
(``training/loop.py``) drive it; they are the only code that reads the trainer: the machinery below (``save``,
``resume``, ``push_weights``, ...) takes plain state and never calls back into it.

    trainer.sampler        the PromptSampler whose position is checkpointed
    trainer.phases         the step's ``time/*`` keys
    trainer.train_step(t)  one optimizer step (the method), its phases charged to the ``PhaseTimer`` t; the
                           loop (``training/loop.py``) then pushes the weights, counts and evaluates
    trainer.extra_models() name -> model chunks saved with the student (teacher, EMA, reference), or None;
                           asked by fit/the loop and passed to ``save`` / ``resume``
    trainer.progress(m)    the progress bar's fields for step metrics ``m``

End-of-run save rule (one for every trainer): the final step is saved unless the newest checkpoint on disk
already holds it (a finished run started again, which resumes by default, or ``save_every`` landing on it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import parallel_state as ps

from megatron_opsd.config import ConfigError, config_to_dict, save_config
from megatron_opsd.models.gpt import PARAMS_DTYPES, build_model_from_config, sequence_multiple
from megatron_opsd.models.lora import LoRASettings
from megatron_opsd.models.tokenizer import load_tokenizer
from megatron_opsd.models.weights import load_hf_checkpoint, save_hf_checkpoint
from megatron_opsd.parallel import init_distributed
from megatron_opsd.parallel.control import broadcast_object  # on the control group: others wait out rank 0's work
from megatron_opsd.rollout.client import SidecarClient
from megatron_opsd.rollout.client.auth import find_secret
from megatron_opsd.rollout.client.lora import push_adapter_from_model, vllm_max_lora_rank
from megatron_opsd.rollout.client.process import refuse_local_sidecar_on_gpu, start_sidecar_process
from megatron_opsd.training.checkpoint import LoadedCheckpoint, load_latest, save_checkpoint
from megatron_opsd.training.engine import setup_training
from megatron_opsd.training.loop import run_steps
from megatron_opsd.training.rundir import checkpoint_root, drop_metrics_after, refuse_overwrite
from megatron_opsd.training.schedule import copy_weights_

# ``evaluate(client, tokenizer, cfg, step, out_dir) -> {"eval/...": float}``: injected by the CLI layer
# (``evaluation.runner.evaluate_for_training``), so training never imports evaluation.
EvaluateHook = Callable[..., dict]


class MetricsLogger:
    """JSONL metrics file always; TensorBoard and wandb when enabled (rank 0 only)."""

    def __init__(self, cfg, run_dir: Path):
        self.jsonl = open(run_dir / "metrics.jsonl", "a")
        self.tb = self.wandb = None
        if cfg.logging.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional package

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed: pip install tensorboard (continuing with metrics.jsonl)")
        if cfg.logging.wandb:
            import wandb  # optional package

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


def local_sidecar_options(cfg) -> dict:
    """The flags of the local sidecar a run starts on ``model.path`` (no ``rollout.sidecar_urls``); a pipeline's
    shared sidecar offers them to every stage it serves (pipeline/runner.py)."""
    r, lora = cfg.rollout, cfg.model.lora
    return dict(dtype=r.local_sidecar_dtype, max_model_len=cfg.data.max_prompt_tokens + r.max_tokens,
                max_lora_rank=vllm_max_lora_rank(lora.rank) if lora.adapter_sync() else None,
                tensor_parallel_size=r.local_sidecar_tensor_parallel_size)


class Run:
    """One training run's machinery. Built in two calls so a trainer can add to the student before the
    optimizer wraps it (LoRA teacher adapters, replicas copied from the initial weights):
    ``run = Run(cfg, ...)`` (distributed, run dir, tokenizer, student) then ``run.build_optimizer()``."""

    def __init__(self, cfg, *, desc: str, uses_sidecar: bool, evaluate: Optional[EvaluateHook] = None):
        self.cfg, self.desc, self.uses_sidecar, self.evaluate = cfg, desc, uses_sidecar, evaluate
        if uses_sidecar:
            refuse_local_sidecar_on_gpu(cfg.rollout.sidecar_urls)
        init_distributed(cfg.parallel)
        self.rank = torch.distributed.get_rank()
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.run_dir = Path(cfg.logging.dir)
        self.ckpt_dir = checkpoint_root(cfg)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.tokenizer_dir = cfg.model.tokenizer or cfg.model.path
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.student = build_model_from_config(cfg)
        load_hf_checkpoint(self.student, cfg.model.path)
        self.real_vocab = self.student[0].real_vocab_size
        self.ddp = self.optimizer = self.scheduler = self.logger = None
        self.step = 0
        self.saved_step = -1  # the step of the newest checkpoint on disk (the end-of-run save rule)
        self.sidecar = None  # the local sidecar process, when this rank started one
        self.client: Optional[SidecarClient] = None
        self.rollout_queue = None  # the trainer's training.rollout_queue.RolloutQueue (rollouts.rollout_queue)

    def replica(self, *, teacher: bool = False) -> list:
        """A second model sharded like the student, holding the student's current (initial) weights: a teacher
        (``teacher=True``: its own FP8 format), Purified OPSD's initial model, or GRPO's reference."""
        chunks = build_model_from_config(self.cfg, teacher=teacher)
        copy_weights_(chunks, self.student)
        return chunks

    def build_optimizer(self) -> None:
        """DDP, distributed optimizer and LR scheduler around the student; then the metrics logger (rank 0)."""
        self.ddp, self.optimizer, self.scheduler = setup_training(self.student, self.cfg.optim, self.cfg.train.steps)
        self.logger = MetricsLogger(self.cfg, self.run_dir) if self.rank == 0 else None

    def batch_layout(self, pad_to_multiple_of: int) -> dict:
        """This rank's micro-batch layout keywords (``batches.response_microbatches``)."""
        return dict(micro_batch_size=self.cfg.optim.micro_batch_size, pad_id=self.tokenizer.pad_token_id,
                    pad_multiple=sequence_multiple(self.cfg, pad_to_multiple_of),
                    microbatch_multiple=self.cfg.parallel.microbatch_multiple(),
                    dp_size=self.dp_size, dp_rank=self.dp_rank)

    # ------------------------------------------------------------------------------------------ sidecar
    def connect_sidecar(self) -> None:
        """Start a local sidecar on rank 0 (no ``rollout.sidecar_urls``) or connect to the given ones; every rank
        gets a client (weight pushes are collective)."""
        cfg = self.cfg
        if cfg.train.eval_every and self.evaluate is None:
            raise ConfigError("train.eval_every > 0 needs an evaluation hook: run through the CLI, or pass "
                              "evaluate=evaluation.runner.evaluate_for_training to train()/train_grpo()")
        urls, r = list(cfg.rollout.sidecar_urls), cfg.rollout
        secret = find_secret(env=r.secret_env, file=r.secret_file) if self.rank == 0 else None  # only rank 0 calls
        if not urls and self.rank == 0:
            self.sidecar = start_sidecar_process(cfg.model.path, port=cfg.rollout.local_sidecar_port,
                                                 log_path=self.run_dir / "sidecar.log", secret=secret,
                                                 **local_sidecar_options(cfg))
            urls, secret = [self.sidecar.url], self.sidecar.secret
        urls = broadcast_object(urls)
        self.client = SidecarClient(urls, transport=r.transport, collective_host=r.collective_host,
                                    sync_timeout_s=r.sync_timeout_s, push_retries=r.push_retries,
                                    bucket_bytes=r.push_bucket_mb << 20 if r.transport == "collective" else None,
                                    secret=secret)
        if self.rank == 0:
            self.client.wait_healthy()

    def push_weights(self, version: int, restore: bool = False) -> None:
        """COLLECTIVE: the new weights to the sidecar: merged, or (LoRA, sync=adapter) only the adapter.
        ``restore``: a resume's checkpoint weights, taken by a sidecar that already served this step or a later
        one (``SidecarClient.push_weights``)."""
        if self.cfg.model.lora.adapter_sync():
            push_adapter_from_model(self.client, self.student, LoRASettings.from_config(self.cfg.model.lora),
                                    version, self.cfg.model.path, restore=restore)
        else:
            self.client.push_weights(self.student, version=version, restore=restore)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, sampler, extra_models: Optional[dict] = None) -> None:
        """COLLECTIVE: checkpoint the student, optimizer, scheduler, ``sampler``'s position and ``extra_models``
        (the trainer's, which the caller asks it for: name -> model chunks)."""
        self.saved_step = self.step
        extra_state = None
        if self.rollout_queue is not None and self.rollout_queue.staleness > 0:  # batches generated ahead
            extra_state = {"rollout_queue": broadcast_object(self.rollout_queue.state_dict())}
        save_checkpoint(self.ckpt_dir, self.step, self.ddp, self.optimizer, self.scheduler,
                        data_state=sampler.state_dict(), extra_state=extra_state, extra_models=extra_models,
                        config_dict=config_to_dict(self.cfg), keep_last=self.cfg.checkpoint.keep_last)

    def resume(self, sampler, extra_models: Optional[dict] = None) -> Optional[LoadedCheckpoint]:
        """With ``checkpoint.resume`` (the default): restore the newest checkpoint (if any), with ``extra_models``,
        and ``sampler``'s position; without it, refuse a directory that holds one (``training/rundir.py``). Then
        drop the ``metrics.jsonl`` rows past the step the run starts from (one row per step)."""
        refuse_overwrite(self.cfg)
        loaded = None
        if self.cfg.checkpoint.resume:
            loaded = load_latest(self.ckpt_dir, self.ddp, self.optimizer, self.scheduler, extra_models=extra_models)
        if loaded is not None:
            self.step = self.saved_step = loaded.step
            sampler.load_state_dict(loaded.data_state)
            if self.rollout_queue is not None:
                self.rollout_queue.load_state_dict(loaded.extra_state.get("rollout_queue"), self.step)
            if self.rank == 0:
                print(f"resumed from {loaded.path} at step {self.step}")
        if self.rank == 0 and (dropped := drop_metrics_after(self.run_dir, self.step)):
            print(f"{self.run_dir}/metrics.jsonl: dropped {dropped} rows past step {self.step} (not checkpointed)")
        return loaded

    def export(self) -> Optional[Path]:
        """COLLECTIVE: the student as an HF directory (``export.hf_dir``; LoRA merged), tokenizer files included,
        written atomically. The same writer as ``megatron-opsd export``, without its second job."""
        export = self.cfg.export
        if not export.hf_dir:
            return None
        out = Path(export.hf_dir)
        save_hf_checkpoint(self.student, out, source_dir=self.tokenizer_dir,
                           dtype=PARAMS_DTYPES[export.dtype] if export.dtype else None)
        if self.rank == 0:
            print(f"exported the {self.desc} model at step {self.step} to {out}", flush=True)
        return out

    # ------------------------------------------------------------------------------------------ the run
    def fit(self, trainer) -> list[dict]:
        """Resume, connect the sidecar (and give it resumed weights), run the steps, save the last one (the
        rule in the module docstring), export (``export.hf_dir``), and close. Returns the metrics of the steps
        run here."""
        self.resume(trainer.sampler, trainer.extra_models())
        try:  # SIGTERM (lifecycle.install_shutdown_handlers) raises SystemExit anywhere in here
            if self.uses_sidecar:
                self.connect_sidecar()
                if self.step > 0:  # a fresh sidecar serves model.path, a running one later weights: restore
                    self.push_weights(self.step, restore=True)
            history = run_steps(self, trainer)
            if self.saved_step != self.step:
                self.save(trainer.sampler, trainer.extra_models())
            self.export()
        finally:
            self.close()
        return history

    def close(self) -> None:
        """Close the metrics files and stop the local sidecar (if this rank started one)."""
        if self.logger is not None:
            self.logger.close()
        if self.rollout_queue is not None:
            self.rollout_queue.close()
        if self.sidecar is not None:
            self.sidecar.stop()
