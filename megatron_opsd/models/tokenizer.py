"""One tokenizer interface over HF tokenizers (with chat templates) and sentencepiece models."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional


class Tokenizer:
    """encode/decode/apply_chat_template over an HF tokenizer directory or a sentencepiece ``.model`` file.

    Sentencepiece models carry no chat template, so they get a plain role-tagged one
    (``<role>\\ncontent\\n`` per turn, ``assistant\\n`` as the generation prompt).
    """

    def __init__(self, path_or_dir: str | Path):
        path = Path(path_or_dir)
        self.path = path
        self._hf = None
        self._sp = None
        if path.is_file() and path.suffix == ".model":
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(path))
            probe = "a\n  b\n"
            if self._sp.decode(self._sp.encode(probe)) != probe:
                warnings.warn(f"sentencepiece model {path} normalises whitespace (newlines become spaces), so text "
                              "and the role-tagged chat template do not round-trip; train it with "
                              "normalization_rule_name='identity', remove_extra_whitespaces=False, byte_fallback=True",
                              stacklevel=3)
        elif path.is_dir():
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            raise FileNotFoundError(f"tokenizer path {str(path)!r} is neither an HF directory nor a sentencepiece "
                                    ".model file")

    @property
    def vocab_size(self) -> int:
        return len(self._hf) if self._hf is not None else self._sp.get_piece_size()

    @property
    def eos_token_id(self) -> Optional[int]:
        return self._hf.eos_token_id if self._hf is not None else self._sp.eos_id()

    @property
    def pad_token_id(self) -> Optional[int]:
        if self._hf is not None:
            return self._hf.pad_token_id if self._hf.pad_token_id is not None else self._hf.eos_token_id
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self._sp.eos_id()

    def encode(self, text: str) -> list[int]:
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False)
        return self._sp.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if self._hf is not None:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: Optional[bool] = None) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, enable_thinking))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    enable_thinking: Optional[bool] = None) -> str:
        if self._hf is not None and self._hf.chat_template:
            kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
            return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                **kwargs)
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        return text + ("<assistant>\n" if add_generation_prompt else "")


def load_tokenizer(path_or_dir: str | Path) -> Tokenizer:
    return Tokenizer(path_or_dir)
