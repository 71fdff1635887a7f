"""Train small, real tokenizers locally (no hub access): byte-level BPE with a Qwen3-style chat template.

Used by the tests and by the CPU demo, whose tiny models need a tokenizer that behaves like the ones our
users run (special tokens, ``apply_chat_template`` with ``enable_thinking``), trained on the task's text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Qwen3's template, reduced to what our pipelines use: system/user/assistant turns and enable_thinking.
# With enable_thinking=False the generation prompt carries an empty think block, as Qwen3's does.
QWEN3_STYLE_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

_BASE_CORPUS = [
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) \\boxed{42}",
    "Let me think step by step. Wait, let me verify this. So the answer is \\boxed{7}.",
    "user assistant system Solve the problem. Be concise.",
]


def train_bpe_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512,
                        chat_template: str = QWEN3_STYLE_CHAT_TEMPLATE):
    """Train a byte-level BPE tokenizer on ``texts`` and save it as an HF ``PreTrainedTokenizerFast``.

    Returns the loaded ``transformers`` tokenizer. The vocabulary always holds every byte, so any text
    round-trips exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_BASE_CORPUS) + list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<think>", "</think>"],
    )
    fast.chat_template = chat_template
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast
