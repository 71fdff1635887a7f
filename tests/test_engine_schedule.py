"""forward_backward / collect_logits / the SFT trainer's loss (sft.make_weighted_ce_loss_fn) at PP=2, interleaved
VPP, TP=2 and DP=2 vs one process and vs transformers; replica helpers (copy, EMA) vs a hand computation.

Every layout runs once (module fixture ``runs``); the tests compare its results with the single-process run.
"""
import pytest
import torch

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed, run_layouts

NUM_MB, MBS, SEQ = 4, 2, 12
LOSS_TOL = 1e-5


def make_microbatches() -> list:
    gen = torch.Generator().manual_seed(7)
    microbatches = []
    for i in range(NUM_MB):
        tokens = torch.randint(5, 379, (MBS, SEQ + 1), generator=gen)
        mask = torch.zeros(MBS, SEQ)
        mask[:, 4 + i:] = 1  # "response" tokens, a different count in each microbatch
        # weights = mask / tokens: the weighted CE sum is this microbatch's mean CE over its response tokens
        microbatches.append({"index": i, "tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": mask,
                             "weights": mask / mask.sum(), "response": mask.bool()})
    return microbatches


def global_layer_names(chunk) -> dict:
    """Local parameter name -> name with the global layer number, so PP stages can be merged and compared."""
    from megatron_opsd.models.gpt import unwrap

    model, names = unwrap(chunk), {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(model.decoder.layers[int(parts[2])].layer_number - 1)
        names[name] = ".".join(parts)
    return names


def local_grads(ddp_chunks) -> dict:
    from megatron_opsd.models.gpt import unwrap

    grads = {}
    for chunk in ddp_chunks:
        names = global_layer_names(chunk)
        for name, param in unwrap(chunk).named_parameters():
            grads[names[name]] = param.main_grad.detach().clone()
    return grads


def layout_worker(hf_dir: str, microbatches: list, sum_too: bool, replicas: bool) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.config import OptimConfig
    from megatron_opsd.training.engine import setup_training, zero_grads
    from megatron_opsd.training.schedule import collect_logits, forward_backward
    from megatron_opsd.training.sft.step import make_weighted_ce_loss_fn

    chunks = build_model(hf_dir)
    load_hf_checkpoint(chunks, hf_dir)
    ddp_chunks, optimizer, _ = setup_training(chunks, OptimConfig(lr=1e-5, use_distributed_optimizer=False), 1000)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_rank = len(microbatches) // dp
    mine = microbatches[dp_rank * per_rank:(dp_rank + 1) * per_rank]
    loss_fn = make_weighted_ce_loss_fn(chunks[0].real_vocab_size)
    kw = dict(seq_length=SEQ, micro_batch_size=MBS)

    zero_grads(ddp_chunks, optimizer)
    out = forward_backward(ddp_chunks, mine, loss_fn, **kw)
    result = {"loss": out.loss, "mb_losses": [float(m["loss"]) for m in out.metrics],
              "mb_tokens": [float(m["tokens"]) for m in out.metrics],
              "mb_ce_sums": [float(m["ce_sum"]) for m in out.metrics], "grads": local_grads(ddp_chunks),
              "vocab": chunks[0].real_vocab_size}
    if sum_too:
        zero_grads(ddp_chunks, optimizer)
        out = forward_backward(ddp_chunks, mine, loss_fn, loss_reduction="sum", **kw)
        result.update(sum_loss=out.loss, sum_grads=local_grads(ddp_chunks))
    logits = collect_logits(chunks, mine, **kw)
    picked = collect_logits(chunks, mine, gather_positions_key="response", **kw)
    if replicas:
        result.update(replica_checks(hf_dir, chunks))
    if logits is not None:
        result["logits"] = logits
        result["picked_equal"] = all(torch.equal(full[mb["response"]], part)
                                     for full, part, mb in zip(logits, picked, mine))
    return result


def replica_checks(hf_dir: str, student: list) -> dict:
    """copy_weights_ / FP32EMA.update_ between the loaded model and a differently initialised replica."""
    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.training.schedule import FP32EMA, copy_weights_

    ema = build_model(hf_dir)  # megatron's random init, not the HF weights
    pairs = lambda: list(zip(ema[0].parameters(), student[0].parameters()))  # noqa: E731
    before = [(e.detach().clone(), s.detach().clone()) for e, s in pairs()]
    assert any(not torch.equal(e, s) for e, s in before)
    average = FP32EMA(ema)  # fp32 replica: its own shadow
    average.update_(student, 0.9)
    ema_err = max((e - (0.9 * e0 + 0.1 * s0)).abs().max().item() for (e, _), (e0, s0) in zip(pairs(), before))
    snapshot = [e.detach().clone() for e, _ in pairs()]
    average.update_(student, 1.0)  # decay 1: a frozen teacher
    unchanged = all(torch.equal(e, e1) for (e, _), e1 in zip(pairs(), snapshot))
    copy_weights_(ema, student)
    copied = all(torch.equal(e, s) for e, s in pairs())
    tied = build_model(hf_dir.replace("qwen3_l4", "qwen3_tied"))
    try:
        copy_weights_(tied, student)
        mismatch_error = ""
    except ValueError as err:
        mismatch_error = str(err)
    return {"ema_err": ema_err, "unchanged": unchanged, "copied": copied, "mismatch_error": mismatch_error}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    root = tmp_path_factory.mktemp("sched")
    make_tiny_hf_checkpoint(root / "qwen3_tied", family="qwen3", tie_word_embeddings=True)
    # 4 layers: PP=2 x VPP=2 gives each virtual stage one layer.
    return str(make_tiny_hf_checkpoint(root / "qwen3_l4", family="qwen3", num_layers=4))


LAYOUTS = {
    "single": (1, ParallelConfig()),
    "pp2": (2, ParallelConfig(pipeline_model_parallel_size=2)),
    "pp2_vpp2": (2, ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
    "tp2": (2, ParallelConfig(tensor_model_parallel_size=2)),
    "dp2": (2, ParallelConfig()),
}


@pytest.fixture(scope="module")
def runs(hf_dir):
    """The single-process run, then every two-rank layout in one world of two ranks (``run_layouts``)."""
    mbs = make_microbatches()
    args = {name: (hf_dir, mbs, name in ("single", "dp2"), name == "tp2") for name in LAYOUTS}
    out = {"single": run_distributed(layout_worker, 1, LAYOUTS["single"][1], *args["single"])}
    pairs = [name for name, (world, _) in LAYOUTS.items() if world == 2]
    assert len(pairs) + 1 == len(LAYOUTS)
    out.update(zip(pairs, run_layouts(layout_worker, 2, [(LAYOUTS[name][1], args[name]) for name in pairs])))
    return out


def merged(results: list, key: str) -> dict:
    out = {}
    for r in results:
        out.update(r.get(key, {}))
    return out


def test_sft_weighted_ce_matches_transformers(runs, hf_dir):
    """The reference itself: the SFT trainer's loss (weights = response mask / its tokens) of each microbatch
    equals transformers' cross-entropy averaged over the response, and its logged CE sum and token count are
    the unweighted ones."""
    from transformers import AutoModelForCausalLM

    ref = runs["single"][0]
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    per_mb, ce_sums = [], []
    for mb in make_microbatches():
        logits = model(mb["tokens"]).logits
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), mb["labels"], reduction="none")
        ce_sums.append((ce * mb["loss_mask"]).sum().item())
        per_mb.append(ce_sums[-1] / mb["loss_mask"].sum().item())
    torch.testing.assert_close(torch.tensor(ref["mb_losses"]), torch.tensor(per_mb), rtol=LOSS_TOL, atol=0)
    torch.testing.assert_close(torch.tensor(ref["mb_ce_sums"]), torch.tensor(ce_sums), rtol=LOSS_TOL, atol=0)
    assert ref["mb_tokens"] == [mb["loss_mask"].sum().item() for mb in make_microbatches()]
    assert abs(ref["loss"] - sum(per_mb) / NUM_MB) < LOSS_TOL * abs(ref["loss"])


@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2", "tp2", "dp2"])
def test_loss_matches_single_process(runs, layout):
    ref = runs["single"][0]
    for rank, result in enumerate(runs[layout]):  # every rank gets the reduced loss
        assert abs(result["loss"] - ref["loss"]) <= LOSS_TOL * abs(ref["loss"]), (layout, rank, result["loss"])
    if layout != "dp2":
        last = runs[layout][-1]
        torch.testing.assert_close(torch.tensor(last["mb_losses"]), torch.tensor(ref["mb_losses"]),
                                   rtol=LOSS_TOL, atol=0)


@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2", "dp2"])
def test_grads_match_single_process(runs, layout):
    ref, grads = runs["single"][0]["grads"], merged(runs[layout], "grads")
    assert sorted(grads) == sorted(ref)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=f"{layout} {name}")


def test_loss_reduction_sum_at_dp2(runs):
    ref, dp2 = runs["single"][0], runs["dp2"]
    expected = sum(ref["mb_losses"])
    assert abs(dp2[0]["sum_loss"] - expected) <= LOSS_TOL * expected
    assert abs(dp2[0]["sum_loss"] - ref["sum_loss"]) <= LOSS_TOL * expected
    for name, g in ref["grads"].items():
        torch.testing.assert_close(dp2[0]["sum_grads"][name], NUM_MB * g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("layout", ["pp2", "pp2_vpp2", "tp2"])
def test_collect_logits_matches_single_process(runs, layout):
    ref = runs["single"][0]
    assert ref["picked_equal"]
    results = runs[layout]
    has_logits = [r for r in results if "logits" in r]
    if layout == "tp2":  # each TP rank holds its vocabulary shard: concatenated they are the full logits
        assert len(has_logits) == 2 and all(r["picked_equal"] for r in has_logits)
        logits = [torch.cat(shards, dim=-1) for shards in zip(*(r["logits"] for r in has_logits))]
    else:  # only the last pipeline stage returns logits
        assert [("logits" in r) for r in results] == [False, True] and results[1]["picked_equal"]
        logits = results[1]["logits"]
    vocab = ref["vocab"]
    for mine, theirs in zip(logits, ref["logits"]):
        assert mine.shape[:2] == (MBS, SEQ)
        torch.testing.assert_close(mine[..., :vocab], theirs[..., :vocab], rtol=1e-5, atol=1e-5)


def test_copy_and_ema_helpers(runs):
    """At TP=2, after the forward/backward passes of that layout (the helpers copy shards, not gradients)."""
    for r in runs["tp2"]:
        assert r["ema_err"] < 5e-7  # fp32 rounding of the two formulas
        assert r["copied"] and r["unchanged"]
        assert "different parameters" in r["mismatch_error"] or "shard shapes" in r["mismatch_error"]
