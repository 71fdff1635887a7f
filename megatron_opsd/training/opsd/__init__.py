"""OPSD, on-policy self-distillation: the step (``step.py`` ``opsd_step``), the trainer's state (``trainer.py``),
the LoRA teacher (``lora_teacher.py``) and `megatron-opsd train` (``cli.py``). Its config sections (``teacher``,
``loss``; the root ``OPSDConfig``) are in ``megatron_opsd/config.py``, the one dataclass tree."""
