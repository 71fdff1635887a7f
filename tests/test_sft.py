"""`megatron-opsd sft`: tokenization and masking, bad input, TP/PP/DP parity, memorisation + HF export."""
import json

import pytest
import torch

from megatron_opsd.config import ConfigError
from megatron_opsd.models.tokenizer import load_tokenizer
from megatron_opsd.parallel.launch import run_distributed, run_layouts
from megatron_opsd.training.sft.cli import run_sft
from megatron_opsd.training.sft.config import SFTDataConfig, load_sft_config
from megatron_opsd.training.sft.data import build_sft_microbatches, load_sft_dataset, tokenize_conversation
from megatron_opsd.training.sft.step import SFT_PHASES
from tests._run_configs import assert_phases_add_up

PAIRS = [(f"What is {a} + {b}?", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 1), (2, 7), (6, 2), (8, 1), (4, 4), (9, 3)]]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pair_rows(field_prompt="prompt", field_response="response"):
    return [{field_prompt: p, field_response: r} for p, r in PAIRS]


def run_config(tmp_path, model_dir, train_path, name, *overrides):
    return load_sft_config(None, [f"model.path={model_dir}", f"data.train_path={train_path}",
                                  f"logging.dir={tmp_path / name}", "logging.progress=false",
                                  "logging.tensorboard=false", *overrides])


def step_losses(run_dir, key="loss"):
    return [json.loads(line)[key] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ data

@pytest.mark.parametrize("thinking", [None, False])
def test_demo_mixture_masks_exactly_the_assistant_turn(tiny_checkpoints, thinking):
    """The demo's SFT records load as they are; the trained tokens are the assistant turn + end of turn, and the
    context before them is exactly the generation prompt the sidecar will be given."""
    from megatron_opsd.demo.task import build_sft_mixture, generate_splits

    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    train, _ = generate_splits()
    for record in build_sft_mixture(train[:6]):
        ids, trainable = tokenize_conversation(tok, record["messages"], thinking)
        first = trainable.index(1)
        assert ids[:first] == tok.apply_chat_template(record["messages"][:-1], True, thinking)
        assert all(trainable[first:]) and len(ids) == len(trainable)
        assert tok.decode(ids[first:]) == record["messages"][-1]["content"] + "<|im_end|>\n"


def test_demo_mixture_file_loads_as_jsonl_and_parquet(tiny_checkpoints, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_opsd.demo.task import build_sft_mixture, generate_splits, write_jsonl as write_demo_jsonl

    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    records = build_sft_mixture(generate_splits()[0][:5])
    write_demo_jsonl(tmp_path / "mix.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), str(tmp_path / "mix.parquet"))
    from_jsonl = load_sft_dataset(SFTDataConfig(train_path=str(tmp_path / "mix.jsonl")), tok)
    from_parquet = load_sft_dataset(SFTDataConfig(train_path=str(tmp_path / "mix.parquet")), tok)
    assert [e.id for e in from_jsonl] == [r["id"] for r in records]
    assert [(e.ids, e.trainable) for e in from_jsonl] == [(e.ids, e.trainable) for e in from_parquet]


def test_multi_turn_trains_every_assistant_turn(tiny_checkpoints):
    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, trainable = tokenize_conversation(tok, messages)
    assert tok.decode(ids) == tok.render_chat(messages, add_generation_prompt=False)
    trained = tok.decode([i for i, t in zip(ids, trainable) if t])
    assert trained == "Hello<|im_end|>\n4<|im_end|>\n"


def test_pairs_with_configured_fields_system_and_template(tiny_checkpoints, tmp_path):
    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    path = write_jsonl(tmp_path / "p.jsonl", pair_rows("question", "answer"))
    d = SFTDataConfig(train_path=path, prompt_field="question", response_field="answer", system_prompt="Sys",
                      prompt_template="Q: {{ prompt }}")
    examples = load_sft_dataset(d, tok)
    assert len(examples) == 8
    expected = tok.apply_chat_template([{"role": "system", "content": "Sys"},
                                        {"role": "user", "content": "Q: " + PAIRS[0][0]}], True)
    first = examples[0].trainable.index(1)
    assert examples[0].ids[:first] == expected
    assert tok.decode(examples[0].ids[first:]) == PAIRS[0][1] + "<|im_end|>\n"


def test_microbatches_weight_every_trained_token_by_one_over_the_global_count(tiny_checkpoints, tmp_path):
    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    examples = load_sft_dataset(SFTDataConfig(train_path=write_jsonl(tmp_path / "p.jsonl", pair_rows())), tok)
    total = sum(sum(ex.trainable) for ex in examples)
    per_rank = [build_sft_microbatches(examples, micro_batch_size=2, pad_id=0, dp_size=2, dp_rank=r) for r in (0, 1)]
    weights = torch.cat([mb["weights"].flatten() for mbs in per_rank for mb in mbs])
    assert len(per_rank[0]) == 2 and torch.allclose(weights.sum(), torch.tensor(1.0))
    assert int((weights > 0).sum()) == total and torch.allclose(weights[weights > 0], torch.tensor(1.0 / total))
    mb = per_rank[1][0]  # rank 1 holds sequences 2 and 3; labels are the next tokens where weighted
    ex = examples[2]
    n = len(ex.ids)
    assert mb["tokens"][0, :n].tolist() == ex.ids and mb["labels"][0, : n - 1].tolist() == ex.ids[1:]
    assert mb["tokens"].shape[1] % 8 == 0
    with pytest.raises(ValueError, match="data.global_batch_size=8 must be a multiple"):
        build_sft_microbatches(examples, micro_batch_size=3, pad_id=0)
    # an interleaved pipeline at PP=3 needs 3 micro-batches per rank: a zero-weight one is added, the rest unchanged
    padded = build_sft_microbatches(examples, micro_batch_size=2, pad_id=0, dp_size=2, dp_rank=0, microbatch_multiple=3)
    assert len(padded) == 3 and not padded[2]["weights"].any()
    assert all(torch.equal(p["weights"], q["weights"]) and torch.equal(p["tokens"], q["tokens"])
               for p, q in zip(padded, per_rank[0]))


def test_bad_input_names_the_field(tiny_checkpoints, tmp_path):
    tok = load_tokenizer(tiny_checkpoints["qwen3"])
    bad_pair = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "x", "reply": "y"}])
    with pytest.raises(ValueError, match=r"row 1: .*'messages'.*\['response'\].*data.response_field"):
        load_sft_dataset(SFTDataConfig(train_path=bad_pair), tok)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"data.train_path.*empty"):
        load_sft_dataset(SFTDataConfig(train_path=str(tmp_path / "empty.jsonl")), tok)
    with pytest.raises(FileNotFoundError, match="data.train_path"):
        load_sft_dataset(SFTDataConfig(train_path=str(tmp_path / "missing.jsonl")), tok)
    no_assistant = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(ValueError, match="no assistant turn"):
        load_sft_dataset(SFTDataConfig(train_path=no_assistant), tok)
    bad_message = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(ValueError, match=r"messages\[0\] must be an object with string 'role' and 'content'"):
        load_sft_dataset(SFTDataConfig(train_path=bad_message), tok)
    too_long = write_jsonl(tmp_path / "d.jsonl", pair_rows())
    with pytest.raises(ValueError, match="data.max_seq_len=8"):
        load_sft_dataset(SFTDataConfig(train_path=too_long, max_seq_len=8), tok)
    with pytest.raises(ConfigError, match="data.train_path must be set"):
        load_sft_config(None, [f"model.path={tiny_checkpoints['qwen3']}"])
    with pytest.raises(ConfigError, match="unknown config key 'data.prompt_feld'"):
        load_sft_config(None, ["data.prompt_feld=q"])


# ------------------------------------------------------------------------------------------------ training

PACKED = {"data.packing": "true", "optim.micro_batch_size": 1}  # 4 conversations -> fewer, longer rows
# unpadded lengths: sequence parallelism must pad them to a multiple of TP itself
SEQUENCE_PARALLEL = {"parallel.tensor_model_parallel_size": 2, "parallel.sequence_parallel": "true",
                     "data.pad_to_multiple_of": 1}


LAYOUTS = {"tp1": ({}, 1), "tp2": ({"parallel.tensor_model_parallel_size": 2}, 2),
           "pp2": ({"parallel.pipeline_model_parallel_size": 2}, 2), "dp2": ({}, 2), "packed": (PACKED, 1),
           "packed_pp2": ({**PACKED, "parallel.pipeline_model_parallel_size": 2}, 2), "tp2_sp": (SEQUENCE_PARALLEL, 2)}


@pytest.fixture(scope="module")
def layout_runs(tiny_checkpoints, tmp_path_factory):
    """Three optimizer steps on the same data at every layout of ``LAYOUTS``, each in its own run directory under
    the returned root: the one-rank layouts in one world, the two-rank ones in another (``run_layouts``: the ranks
    start once per world, not once per layout)."""
    root = tmp_path_factory.getbasetemp() / "sft_parity"
    root.mkdir(exist_ok=True)
    train = write_jsonl(root / "train.jsonl", pair_rows())
    for world in (1, 2):
        cfgs = [run_config(root, tiny_checkpoints["qwen3"], train, name, "train.steps=3", "optim.lr=3e-3",
                           "data.global_batch_size=4", "data.shuffle=false", *(f"{k}={v}" for k, v in layout.items()))
                for name, (layout, size) in LAYOUTS.items() if size == world]
        run_layouts(run_sft, world, [(cfg.parallel, (cfg,)) for cfg in cfgs])
    return root


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sft_losses_match_across_layouts(layout_runs, name):
    """Three optimizer steps on the same data: the token-mean loss at TP=2 (also with sequence parallelism),
    PP=2 and DP=2, and with packed rows (block-diagonal causal attention, positions restarting per
    conversation), equals TP=1 unpacked (step 1 checks the forward, steps 2-3 the gradients and the optimizer)."""
    losses, reference = step_losses(layout_runs / name), layout_runs / "tp1"
    assert len(losses) == 3 and losses[2] < losses[0]
    assert losses == pytest.approx(step_losses(reference), rel=1e-5)  # measured: <= 2.4e-8 (tp1: itself)
    if name == "tp2_sp":  # the norms' gradients are summed over TP (finalize_model_grads) or the norm is off
        assert step_losses(layout_runs / name, "grad_norm") == pytest.approx(step_losses(reference, "grad_norm"),
                                                                            rel=1e-5)


@pytest.mark.slow  # ~25 s alone; keeps the default area under ~3 min
def test_sft_resume_continues_exactly(tiny_checkpoints, layout_runs):
    """2 steps, stop, resume to 3 (model, Adam state, LR schedule and data position from the checkpoint): the
    losses equal the uninterrupted TP=1 run of the parity test."""
    root = layout_runs
    reference = root / "tp1"
    common = ["optim.lr=3e-3", "data.global_batch_size=4", "data.shuffle=false"]  # resuming is the default
    for steps in (2, 3):
        cfg = run_config(root, tiny_checkpoints["qwen3"], root / "train.jsonl", "resumed", f"train.steps={steps}",
                         *common)
        run_distributed(run_sft, 1, cfg.parallel, cfg)
        if steps == 2:  # the row of a step killed before its checkpoint: dropped by the resume
            with open(root / "resumed" / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    assert sorted(p.name for p in (root / "resumed" / "checkpoints").glob("step-*")) == ["step-2", "step-3"]
    assert step_losses(root / "resumed") == pytest.approx(step_losses(reference), rel=1e-6)  # one row per step


def test_sft_cli_memorises_and_exports_hf(tiny_checkpoints, tmp_path):
    """`megatron-opsd sft` on 8 short examples: the loss falls by > 50% in 30 steps, and the exported HF model,
    loaded with transformers, greedily answers every training prompt with its trained response."""
    from transformers import AutoModelForCausalLM

    from megatron_opsd.cli import main

    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": p},
                                                                 {"role": "assistant", "content": r}]}
                                                   for p, r in PAIRS])
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {{path: {tiny_checkpoints['qwen3']}}}\ndata: {{train_path: {train}}}\n")
    out = tmp_path / "exported"
    rc = main(["sft", "--config", str(config), "--export-hf", str(out), "--nproc", "1", "optim.lr=5e-3",
               "train.steps=40", "optim.micro_batch_size=4", f"logging.dir={tmp_path / 'run'}",
               "logging.progress=false"])
    assert rc == 0
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 40 and losses[29] < 0.5 * losses[0]
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        assert_phases_add_up(json.loads(line), SFT_PHASES)
    assert (tmp_path / "run" / "checkpoints" / "latest").exists() and list((tmp_path / "run" / "tensorboard").iterdir())

    tok = load_tokenizer(out)  # the tokenizer travelled with the export
    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    for prompt, response in PAIRS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], True)
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        new = gen[0, len(ids):].tolist()
        assert new[-1] == tok.eos_token_id and tok.decode(new, skip_special_tokens=True) == response, prompt


def test_example_config_loads():
    from pathlib import Path

    cfg = load_sft_config(str(Path(__file__).parent.parent / "examples" / "sft_tiny.yaml"))
    assert cfg.logging.dir == "runs/sft_tiny" and cfg.export.hf_dir == "runs/sft_tiny/hf"
    assert cfg.data.global_batch_size % (cfg.optim.micro_batch_size) == 0


def test_packed_microbatch_layout():
    """Packing puts conversations side by side: positions restart, labels never cross a boundary, attention
    is causal inside each conversation only, and the token weights are the same as unpacked."""
    from megatron_opsd.training.sft.data import SFTExample, build_sft_microbatches

    examples = [SFTExample("a", [1, 2, 3], [0, 1, 1]), SFTExample("b", [4, 5], [0, 1]),
                SFTExample("c", [6, 7, 8, 9], [0, 0, 1, 1])]
    rows = build_sft_microbatches(examples, micro_batch_size=1, pad_id=0, pad_multiple=4, pack_to=8)
    assert len(rows) == 2 and rows[1]["tokens"].tolist() == [[6, 7, 8, 9, 0, 0, 0, 0]]
    mb = rows[0]
    assert mb["tokens"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0]]  # c (4 tokens) does not fit: next row
    assert mb["position_ids"].tolist()[0][:5] == [0, 1, 2, 0, 1]
    assert mb["labels"].tolist()[0][:5] == [2, 3, 0, 5, 0]
    assert [round(w * 5) for w in mb["weights"].tolist()[0][:5]] == [1, 1, 0, 1, 0]  # 5 trainable tokens in all
    visible = ~mb["attention_mask"][0, 0]
    assert visible[4].tolist() == [False, False, False, True, True, False, False, False]
    assert visible[2].tolist() == [True, True, True, False, False, False, False, False]
    assert not visible[6].any()  # padding attends to nothing (its loss weight is 0)


def test_grouped_microbatches_hold_the_same_rows_with_less_padding():
    """data.group_by_length: the step's conversations sorted by length and dealt to micro-batches and DP ranks,
    each micro-batch padded to its own longest (PP=1) or the step's (PP>1). Every conversation appears once with
    the same tokens, labels and 1/N weights as ungrouped, so the step's loss is the same (the layout tests
    compare the training losses too: tp1 pads per micro-batch, pp2 per step, packed rows are not grouped)."""
    from megatron_opsd.training.sft.data import SFTExample

    lengths = [9, 3, 17, 5, 12, 4, 30, 6]
    examples = [SFTExample(str(i), list(range(1, n + 1)), [0] + [1] * (n - 1)) for i, n in enumerate(lengths)]

    def layout(**kw) -> list:
        return [build_sft_microbatches(examples, micro_batch_size=2, pad_id=0, pad_multiple=4, dp_size=2, dp_rank=r,
                                       **kw) for r in (0, 1)]

    def rows(per_rank: list) -> list:  # (tokens, labels, weights) of every real row, without its padding
        out = []
        for mbs in per_rank:
            for mb in mbs:
                for t, lab, w in zip(mb["tokens"], mb["labels"], mb["weights"]):
                    n = int((t != 0).sum())
                    assert not w[n:].any()  # padding carries no weight
                    out.append((t[:n].tolist(), lab[:n - 1].tolist(), w[:n].tolist()))
        return sorted(out)

    plain, grouped, grouped_pp = layout(), layout(group_by_length=True, one_length=False), \
        layout(group_by_length=True, one_length=True)
    assert rows(grouped) == rows(plain) == rows(grouped_pp)
    widths = [[mb["tokens"].shape[1] for mb in mbs] for mbs in grouped]
    assert widths == [[4, 12], [8, 32]]  # rank 0: (3, 4), (9, 12); rank 1: (5, 6), (17, 30); multiples of 4
    assert all(mb["tokens"].shape[1] == 32 for mbs in plain + grouped_pp for mb in mbs)
    padded = lambda per_rank: sum(mb["tokens"].numel() for mbs in per_rank for mb in mbs)
    assert padded(grouped) == 2 * (4 + 12 + 8 + 32) < padded(plain) == 8 * 32
