"""GRPO with verifiable rewards (and the DAPO options): the maths as pure functions (``algorithm.py``), the step
(``step.py`` ``grpo_step``), the trainer's state (``trainer.py``), the config's checks and loader (``config.py``;
the ``rl`` section and the root ``RLTrainConfig`` are in ``megatron_opsd/config.py``) and `megatron-opsd rl`
(``cli.py``)."""
