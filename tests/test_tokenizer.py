"""Tokenizer wrapper: HF chat template with enable_thinking, sentencepiece round-trip."""
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
                                   hard_vocab_limit=False, byte_fallback=True, model_type="bpe")
    tok = load_tokenizer(tmp_path / "sp.model")
    sample = "Wait, ünïcode 99 + 1 = 100 \\boxed{100}"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.render_chat(MESSAGES) == "<user>\nWhat is 2+3?\n<assistant>\n"
