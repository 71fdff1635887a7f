"""The step loop every trainer shares (OPSD, GRPO, SFT), torchtitan style: one readable function.

``run`` is the ``training.run.Run`` (cfg, step, rank, logger, save); ``trainer`` provides ``train_step()`` (one
optimizer step, returns its metrics with its ``time/*`` phases) and ``progress(metrics)`` (the bar's fields).
The final checkpoint is ``Run.fit``'s, after the loop.
"""
from __future__ import annotations

import time

from tqdm import tqdm


def run_steps(run, trainer) -> list[dict]:
    """``train_step()`` until ``train.steps``: ``time/step`` (the sum of the step's ``time/*`` phases, measured
    around the call) and tokens/s added to each step's metrics, metrics logged on rank 0 every
    ``logging.log_every`` steps (and the last), a tqdm bar, and a checkpoint every ``checkpoint.save_every``
    steps. Returns the metrics of the steps run here."""
    cfg = run.cfg
    history = []
    bar = None
    if run.rank == 0 and cfg.logging.progress:
        bar = tqdm(total=cfg.train.steps, initial=run.step, desc=run.desc, dynamic_ncols=True)
    try:
        while run.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            metrics["time/step"] = time.perf_counter() - t0
            metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / max(metrics["time/step"], 1e-9)
            history.append(metrics)
            if run.rank == 0:
                if run.step % cfg.logging.log_every == 0 or run.step == cfg.train.steps:
                    run.logger.log(run.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**trainer.progress(metrics))
            every = cfg.checkpoint.save_every
            if every and run.step % every == 0 and run.step < cfg.train.steps:
                run.save(trainer)
    finally:
        if bar is not None:
            bar.close()
    return history
