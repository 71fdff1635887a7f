"""Supervised fine-tuning (the pipeline's first stage): its config (``config.py``: ``SFTConfig``, whose ``data``
section is conversations, not prompts), the chat data (``data.py``), the step (``step.py`` ``sft_step``), the
trainer's state (``trainer.py``) and `megatron-opsd sft` (``cli.py``)."""
