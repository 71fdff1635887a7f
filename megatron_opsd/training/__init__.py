"""Training: the run machinery every method composes (``run.py``, ``loop.py``, ``schedule.py``, ``engine.py``,
``checkpoint.py``, ``batches.py``, ``response_rows.py``, the rollouts OPSD and GRPO share) and one subpackage per
method: ``opsd/``, ``grpo/``, ``sft/``."""
