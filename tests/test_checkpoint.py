"""Checkpoints: resume equals an uninterrupted run bit for bit; a crashed save leaves the previous one loadable.

The training loop below consumes every RNG a checkpoint must restore (python, numpy, torch, megatron's tracker)
to build its batches, uses a warmup + cosine LR schedule, the distributed optimizer and an EMA replica saved as
an extra model, so a missing piece of state changes the losses after the resume.
"""
import random

import numpy as np
import pytest
import torch

from megatron_opsd.parallel import ParallelConfig
from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.checkpoint import LATEST_FILE, latest_checkpoint, load_checkpoint
from megatron_opsd.config import OptimConfig

SETTINGS = OptimConfig(lr=3e-3, min_lr=3e-4, weight_decay=0.1, warmup_steps=1, lr_decay_style="cosine", clip_grad=1.0)
TOTAL_STEPS = 5
MBS, SEQ, NUM_MB = 2, 10, 2
EMA_DECAY = 0.5


def random_microbatches(vocab: int) -> list:
    """Batches drawn from all four RNGs (in a multi-rank run each DP rank draws its own)."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    microbatches = []
    for i in range(NUM_MB):
        tokens = torch.randint(5, vocab, (MBS, SEQ + 1))
        start = int(np.random.randint(1, 4)) + random.randint(0, 2)
        with get_cuda_rng_tracker().fork():
            keep = (torch.rand(MBS, SEQ) > 0.2).float()
        mask = torch.zeros(MBS, SEQ)
        mask[:, start:] = 1
        weights = mask * keep  # the SFT trainer's loss: per-microbatch mean CE over the kept tokens
        microbatches.append({"index": i, "tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                             "weights": weights / weights.sum().clamp(min=1)})
    return microbatches


def local_state(chunks) -> dict:
    from megatron_opsd.models.gpt import unwrap

    return {f"{i}.{k}": v.detach().clone() for i, c in enumerate(chunks) for k, v in unwrap(c).named_parameters()}


def train_worker(hf_dir: str, root: str, resume: bool, last_step: int, save_at: tuple, crash_save_at: int = -1,
                 keep_last=None, optimizer_sharding: str = "dp_reshardable") -> dict:
    """Runs steps up to ``last_step`` (from the latest checkpoint if ``resume``), saving after ``save_at`` steps."""
    from megatron.core import dist_checkpointing

    from megatron_opsd.models.gpt import build_model
    from megatron_opsd.models.weights import load_hf_checkpoint
    from megatron_opsd.training.checkpoint import load_latest, save_checkpoint
    from megatron_opsd.training.engine import optimizer_step, setup_training, zero_grads
    from megatron_opsd.training.schedule import FP32EMA, copy_weights_, forward_backward
    from megatron_opsd.training.sft.step import make_weighted_ce_loss_fn

    chunks = build_model(hf_dir)
    load_hf_checkpoint(chunks, hf_dir)
    ddp_chunks, optimizer, scheduler = setup_training(chunks, SETTINGS, TOTAL_STEPS)
    ema = build_model(hf_dir)
    copy_weights_(ema, chunks)
    loss_fn = make_weighted_ce_loss_fn(chunks[0].real_vocab_size)
    step, out = 0, {"losses": {}, "saved": {}}
    if resume:
        loaded = load_latest(root, ddp_chunks, optimizer, scheduler, extra_models={"ema": ema})
        step = loaded.step
        out.update(resumed_step=step, data_state=loaded.data_state, extra_state=loaded.extra_state,
                   rng_restored=loaded.rng_restored, loaded_params=local_state(chunks), loaded_ema=local_state(ema))
    real_save = dist_checkpointing.save
    while step < last_step:
        microbatches = random_microbatches(chunks[0].real_vocab_size)
        zero_grads(ddp_chunks, optimizer)
        result = forward_backward(ddp_chunks, microbatches, loss_fn, seq_length=SEQ, micro_batch_size=MBS)
        stats = optimizer_step(optimizer, scheduler)
        FP32EMA(ema).update_(chunks, EMA_DECAY)  # fp32 replica: its own average
        step += 1
        out["losses"][step] = (result.loss, float(stats["grad_norm"]), stats["lr"])
        if step in save_at:
            if step == crash_save_at:
                def crashing_save(*args, **kwargs):
                    real_save(*args, **kwargs)
                    raise RuntimeError("simulated crash after the shards were written")

                dist_checkpointing.save = crashing_save
            try:
                save_checkpoint(root, step, ddp_chunks, optimizer, scheduler, data_state={"position": step * NUM_MB},
                                extra_state={"note": f"after step {step}"}, extra_models={"ema": ema},
                                config_dict={"optim": {"lr": SETTINGS.lr}, "step": step}, keep_last=keep_last,
                                optimizer_sharding=optimizer_sharding)
                out["saved"][step] = (local_state(chunks), local_state(ema))
            except RuntimeError as err:
                out["crash"] = str(err)
                break
            finally:
                dist_checkpointing.save = real_save
    out.update(final_params=local_state(chunks), final_ema=local_state(ema))
    return out


def assert_states_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("layout", ["dp2", pytest.param("pp2_vpp2", marks=pytest.mark.slow)])
def test_resume_equals_uninterrupted(tiny_checkpoints, tmp_path, layout):
    """DP=2 shards the distributed optimizer; PP=2 x VPP=2 (4 layers) saves the chunks as model0/model1."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    root = str(tmp_path / "ckpt")
    if layout == "dp2":
        hf_dir, cfg = tiny_checkpoints["qwen3"], ParallelConfig()
    else:
        hf_dir = str(make_tiny_hf_checkpoint(tmp_path / "l4", family="qwen3", num_layers=4))
        cfg = ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)
    full = run_distributed(train_worker, 2, cfg, hf_dir, root, False, 5, (2,))
    resumed = run_distributed(train_worker, 2, cfg, hf_dir, root, True, 5, ())
    for rank, (a, b) in enumerate(zip(full, resumed)):
        assert b["resumed_step"] == 2 and b["rng_restored"]
        assert b["data_state"] == {"position": 2 * NUM_MB} and b["extra_state"] == {"note": "after step 2"}
        assert_states_equal(b["loaded_params"], a["saved"][2][0])
        assert_states_equal(b["loaded_ema"], a["saved"][2][1])
        assert sorted(b["losses"]) == [3, 4, 5]
        for step in (3, 4, 5):  # loss, grad norm, lr: exactly equal on CPU
            assert b["losses"][step] == a["losses"][step], (rank, step, b["losses"][step], a["losses"][step])
        assert_states_equal(b["final_params"], a["final_params"])
        assert_states_equal(b["final_ema"], a["final_ema"])
    losses = [full[0]["losses"][s][0] for s in range(1, 6)]
    assert len(set(losses)) == 5  # the steps really differ (new batches, LR schedule)


def test_crashed_save_keeps_previous_checkpoint(tiny_checkpoints, tmp_path):
    """TP=2 with the fully_reshardable optimizer format (the resume test above uses dp_reshardable at DP=2)."""
    hf_dir, root = tiny_checkpoints["qwen3"], tmp_path / "ckpt"
    cfg = ParallelConfig(tensor_model_parallel_size=2)
    crashed = run_distributed(train_worker, 2, cfg, hf_dir, str(root), False, 4, (2, 4), 4, None,
                              "fully_reshardable")
    assert all("simulated crash" in r["crash"] for r in crashed)
    assert (root / "tmp-step-4").is_dir() and any((root / "tmp-step-4").iterdir())  # partially committed
    assert not (root / "step-4").exists()
    assert (root / LATEST_FILE).read_text() == "step-2" and latest_checkpoint(root) == root / "step-2"
    assert "lr: 0.003" in (root / "step-2" / "config.yaml").read_text()

    # Fresh processes: resume from step 2, save step 3 with keep_last=1 (cleans the crashed temp dir and step-2).
    resumed = run_distributed(train_worker, 2, cfg, hf_dir, str(root), True, 4, (3,), -1, 1, "fully_reshardable")
    for crashed_rank, resumed_rank in zip(crashed, resumed):
        assert resumed_rank["resumed_step"] == 2
        assert_states_equal(resumed_rank["loaded_params"], crashed_rank["saved"][2][0])
        assert_states_equal(resumed_rank["loaded_ema"], crashed_rank["saved"][2][1])
        for step in (3, 4):  # the crashed run had trained through step 4 before its save failed
            assert resumed_rank["losses"][step] == crashed_rank["losses"][step], step
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-3"]


def test_latest_falls_back_to_newest_complete_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 5, 10):
        (tmp_path / f"step-{step}").mkdir()
    for step in (1, 5):
        (tmp_path / f"step-{step}" / "opsd_checkpoint.json").write_text("{}")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-5"  # step-10 is incomplete
    (tmp_path / LATEST_FILE).write_text("step-1")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-1"
    (tmp_path / LATEST_FILE).write_text("step-10")  # names an incomplete one
    assert latest_checkpoint(tmp_path) == tmp_path / "step-5"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-10", [])


def test_bad_arguments_name_the_field(tmp_path):
    from megatron_opsd.training.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(ValueError, match="optimizer_sharding must be one of"):
        save_checkpoint(tmp_path, 1, [], optimizer_sharding="fully_sharded_model_space")
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 1, [], keep_last=0)
    for name in ("step", "model0", "optimizer"):
        with pytest.raises(ValueError, match=f"extra_models name '{name}' is reserved"):
            save_checkpoint(tmp_path, 1, [], extra_models={name: []})  # refused before any collective
        with pytest.raises(ValueError, match=f"extra_models name '{name}' is reserved"):
            load_checkpoint(tmp_path, [], extra_models={name: []})
