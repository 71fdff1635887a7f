"""The step loop every trainer shares (OPSD, GRPO, SFT), torchtitan style: the loop owns the bookkeeping.

``run`` is the ``training.run.Run`` (cfg, step, rank, logger, sidecar client, save); ``trainer`` provides
``phases`` (its ``time/*`` keys), ``train_step(timer)`` (the method: one optimizer step, charging its phases to
``timer``, returns its metrics) and ``progress(metrics)`` (the bar's fields). Everything between two method steps
happens here, in this order: the weight push, the step count, the evaluation, the log line and the checkpoint;
the method never calls back into the run for them. The final checkpoint is ``Run.fit``'s, after the loop.
"""
from __future__ import annotations

import time
from typing import Iterable

from tqdm import tqdm


class PhaseTimer:
    """Consecutive phase timers of one step: ``lap(key)`` charges the time since the previous lap (or the timer's
    start) to ``key``, so the phases add up to the step by construction. Keys named at construction are present
    (0.0) even when a rank or a step skips their phase, so every rank reports the same keys."""

    def __init__(self, keys: Iterable[str] = ()):
        self.times = {key: 0.0 for key in keys}
        self.start = self._last = time.perf_counter()

    def lap(self, key: str) -> None:
        now = time.perf_counter()
        self.times[key] = self.times.get(key, 0.0) + now - self._last
        self._last = now


def train_one_step(run, trainer) -> dict:
    """COLLECTIVE: one step as the loop drives it: the method's ``train_step(timer)`` (rollouts ... optimizer ...
    teacher update), then on the same timer the weight push (the next rollouts come from it; with overlapped
    rollouts first the wait until no generation request is in flight, ``rollout_queue.py``), the step count, and
    every ``train.eval_every`` steps an evaluation on the sidecar (rank 0). Returns the step's metrics with its
    ``time/*`` phases, ``time/step`` (their sum) and tokens/s."""
    timer = PhaseTimer(trainer.phases)
    metrics = trainer.train_step(timer)
    if run.uses_sidecar:
        if run.rollout_queue is not None and run.rollout_queue.staleness > 0:
            run.rollout_queue.wait_idle()  # push between generation requests (rollout_queue.py)
            timer.lap("time/rollout_wait")
        run.push_weights(run.step + 1)
        timer.lap("time/sync")
    run.step += 1
    metrics.setdefault("lr", run.optimizer.param_groups[0]["lr"])
    every = run.cfg.train.eval_every
    if run.evaluate is not None and every and run.step % every == 0 and run.rank == 0:
        metrics.update(run.evaluate(run.client, run.tokenizer, run.cfg, run.step, run.run_dir / "eval"))
    timer.lap("time/eval")  # the evaluation, and the step's bookkeeping when there is none
    metrics.update(timer.times)
    metrics["time/step"] = time.perf_counter() - timer.start
    metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / max(metrics["time/step"], 1e-9)
    return metrics


def run_steps(run, trainer) -> list[dict]:
    """``train_one_step`` until ``train.steps``, its metrics logged on rank 0 every ``logging.log_every`` steps
    (and the last), a tqdm bar, and a checkpoint every ``checkpoint.save_every`` steps. Returns the metrics of
    the steps run here."""
    cfg = run.cfg
    history = []
    bar = None
    if run.rank == 0 and cfg.logging.progress:
        bar = tqdm(total=cfg.train.steps, initial=run.step, desc=run.desc, dynamic_ncols=True)
    try:
        while run.step < cfg.train.steps:
            metrics = train_one_step(run, trainer)
            history.append(metrics)
            if run.rank == 0:
                if run.step % cfg.logging.log_every == 0 or run.step == cfg.train.steps:
                    run.logger.log(run.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**trainer.progress(metrics))
            every = cfg.checkpoint.save_every
            if every and run.step % every == 0 and run.step < cfg.train.steps:
                run.save(trainer.sampler, trainer.extra_models())
    finally:
        if bar is not None:
            bar.close()
    return history
