"""Tokenizer wrapper: HF chat template with enable_thinking, sentencepiece round-trip."""
import pytest

from megatron_opsd.models.tokenizer import load_tokenizer

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]


def test_hf_chat_template_thinking_switch(tiny_checkpoints):
    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    off = tok.render_chat(MESSAGES, enable_thinking=False)
    on = tok.render_chat(MESSAGES, enable_thinking=True)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert on.endswith("<|im_start|>assistant\n")
    ids = tok.apply_chat_template(MESSAGES, enable_thinking=False)
    assert tok.decode(ids) == off
    assert tok.eos_token_id == tok.encode("<|im_end|>")[0]


def test_sentencepiece_round_trip(tmp_path):
    import sentencepiece as spm

    text = ["Let me verify: 12 + 30 = 42, so the answer is \\boxed{42}.", "Wait, 7 * 6 = 42 too."] * 50
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400,
                                   hard_vocab_limit=False, byte_fallback=True, model_type="bpe",
                                   normalization_rule_name="identity", remove_extra_whitespaces=False)
    tok = load_tokenizer(tmp_path / "sp.model")
    sample = "Wait,  ünïcode 99 + 1 = 100\n\\boxed{100} 漢字 \U0001F600\n"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.render_chat(MESSAGES) == "<user>\nWhat is 2+3?\n<assistant>\n"


def test_sentencepiece_chat_template_and_ids(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the answer is 42", "user asks, assistant answers"] * 40))
    common = dict(input=str(corpus), vocab_size=300, hard_vocab_limit=False, byte_fallback=True)
    spm.SentencePieceTrainer.train(model_prefix=str(tmp_path / "sp"), normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, **common)
    tok = load_tokenizer(str(tmp_path / "sp.model"))
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
    assert tok.decode(ids) == "<user>\nWhat is 2+3?\n"
    # a default (NFKC, whitespace-collapsing) model cannot round-trip the template: the wrapper says so
    spm.SentencePieceTrainer.train(model_prefix=str(tmp_path / "nfkc"), **common)
    with pytest.warns(UserWarning, match="normalises whitespace .* normalization_rule_name='identity'"):
        load_tokenizer(str(tmp_path / "nfkc.model"))
    assert max(ids) < tok.vocab_size and tok.eos_token_id == 2 and tok.pad_token_id == tok.eos_token_id


def test_hf_tokenizer_ids(tiny_checkpoints):
    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    assert tok.vocab_size == 379  # the tiny model's vocabulary equals the tokenizer's
    assert tok.pad_token_id is not None
    text = "Compute 12*7 = 84."
    assert tok.decode(tok.encode(text)) == text


def test_bad_tokenizer_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an HF directory nor a sentencepiece .model file"):
        load_tokenizer(tmp_path / "nope.bin")
