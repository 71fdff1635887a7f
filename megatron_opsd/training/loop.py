"""The step loop every trainer shares (OPSD, GRPO, SFT), torchtitan style: one readable function.

A trainer provides ``cfg`` (train.steps, logging, checkpoint), ``step``, ``rank``, ``logger``, ``train_step()``
(one optimizer step, returns its metrics) and ``save()``. The final checkpoint is the caller's, so a finished
run can also export or stop its sidecar in its own order.
"""
from __future__ import annotations

import time
from typing import Callable


def run_steps(trainer, desc: str, postfix: Callable[[dict], dict]) -> list[dict]:
    """``train_step()`` until ``train.steps``: time and tokens/s added to each step's metrics, metrics logged on
    rank 0 every ``logging.log_every`` steps (and the last), a tqdm bar (``postfix`` picks its fields), and a
    checkpoint every ``checkpoint.save_every`` steps. Returns the metrics of the steps run here."""
    cfg = trainer.cfg
    history = []
    bar = None
    if trainer.rank == 0 and cfg.logging.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.train.steps, initial=trainer.step, desc=desc, dynamic_ncols=True)
    try:
        while trainer.step < cfg.train.steps:
            t0 = time.perf_counter()
            metrics = trainer.train_step()
            metrics["time/step"] = time.perf_counter() - t0
            metrics["tokens_per_s"] = metrics.get("tokens", 0.0) / max(metrics["time/step"], 1e-9)
            history.append(metrics)
            if trainer.rank == 0:
                if trainer.step % cfg.logging.log_every == 0 or trainer.step == cfg.train.steps:
                    trainer.logger.log(trainer.step, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(**postfix(metrics))
            every = cfg.checkpoint.save_every
            if every and trainer.step % every == 0 and trainer.step < cfg.train.steps:
                trainer.save()
    finally:
        if bar is not None:
            bar.close()
    return history
