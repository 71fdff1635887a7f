"""One GRPO step through megatron on fixed rollouts (transformers' log-probs as the behaviour policy):
on-policy loss equals the hand formula, TP=2 equals TP=1, the reference KL, and recomputed old log-probs."""
import math

import pytest

from megatron_opsd.parallel.launch import run_distributed
from megatron_opsd.training.grpo.algorithm import group_advantages
from tests._workers_grpo import LENGTHS, REWARDS, grpo_steps, grpo_steps_counting_rows
from tests.test_grpo_e2e import grpo_config


def _cfg(tmp_path, model_dir, tp, **rl):
    tmp_path.mkdir(parents=True, exist_ok=True)
    return grpo_config(tmp_path, model_dir, steps=2, parallel={"tensor_model_parallel_size": tp},
                       rollout={"n": 3}, rl={"overlong_buffer": 0, **rl})


def test_grpo_step_tp2_matches_tp1_and_hand_loss(tiny_checkpoints, tmp_path):
    model = tiny_checkpoints["qwen3"]
    rl = {"kl_coef": 0.1, "kl_estimator": "full"}
    cfg1 = _cfg(tmp_path / "tp1", model, 1, **rl)
    one = run_distributed(grpo_steps, 1, cfg1.parallel, cfg1, 2)[0]
    cfg2 = _cfg(tmp_path / "tp2", model, 2, **rl)
    two = run_distributed(grpo_steps, 2, cfg2.parallel, cfg2, 2)
    # Step 1 is on-policy (sidecar log-probs = transformers' = megatron's): ratio 1, nothing clipped, KL to the
    # (identical) reference 0, so the loss is -sum_t w_t A_t with token-level weights 1 / all tokens.
    adv = group_advantages(REWARDS)
    total = sum(map(sum, LENGTHS))
    expected = -sum(n * a for lg, ag in zip(LENGTHS, adv) for n, a in zip(lg, ag)) / total
    first = one[0]
    assert first["tokens"] == total
    assert first["loss"] == pytest.approx(expected, abs=1e-5)
    assert first["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["rl/clip_fraction"] == 0.0
    assert abs(first["divergence"]) < 1e-6
    # Step 2: the policy moved away from the frozen reference, and from the (fixed) behaviour log-probs.
    second = one[1]
    assert second["divergence"] > 1e-4 and abs(second["rl/ratio_mean"] - 1.0) > 1e-4
    for rank in range(2):  # every rank reports the same reduced numbers, equal to TP=1
        for a, b in zip(one, two[rank]):
            for key in ("loss", "divergence", "grad_norm", "rl/ratio_mean", "rl/clip_fraction", "entropy/student"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (rank, key)


def test_grpo_recomputed_old_logprobs_and_k3(tiny_checkpoints, tmp_path):
    cfg = _cfg(tmp_path, tiny_checkpoints["qwen3"], 1, kl_coef=0.1, kl_estimator="k3", recompute_old_logprobs=True,
               std_normalize=False, token_level_loss=False)
    first, second = run_distributed(grpo_steps, 1, cfg.parallel, cfg, 2)[0]
    # Recomputed behaviour log-probs: megatron's own pre-update forward, so the ratio is exactly 1 at every step;
    # at step 1 they equal transformers' (the sidecar stand-in), at step 2 the fixed rollouts' are stale.
    assert first["rl/sidecar_logprob_abs_diff"] < 1e-4 and second["rl/sidecar_logprob_abs_diff"] > 1e-4
    assert first["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and second["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    # Sequence-level weights 1 / (|y_i| * rollouts) and A = r - mean: loss = -(1/6) sum_i A_i; k3 = 0 at step 1.
    adv = group_advantages(REWARDS, std_normalize=False)
    assert first["loss"] == pytest.approx(-sum(map(sum, adv)) / 6, abs=1e-5)
    assert abs(first["divergence"]) < 1e-6 and second["divergence"] > 0


def test_grpo_truncated_importance_ratio(tiny_checkpoints, tmp_path):
    """rollout.importance_ratio=truncated (decoupled PPO): the ratio is taken to megatron's recomputed log-probs and
    each token weighted by min(recomputed / behaviour, clip). Behaviour log-probs 4x too low (log 4 below
    transformers'): every weight is capped at 2, so step 1's on-policy hand loss doubles."""
    cfg = _cfg(tmp_path, tiny_checkpoints["qwen3"], 1, kl_coef=0.0)
    cfg.rollout.importance_ratio, cfg.rollout.importance_ratio_clip = "truncated", 2.0
    (first,) = run_distributed(grpo_steps, 1, cfg.parallel, cfg, 1, -math.log(4.0))[0]
    adv = group_advantages(REWARDS)
    expected = -sum(n * a for lg, ag in zip(LENGTHS, adv) for n, a in zip(lg, ag)) / sum(map(sum, LENGTHS))
    assert first["rollout/importance_ratio"] == pytest.approx(2.0, rel=1e-6)
    assert first["rl/ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # to the recomputed log-probs, not the sidecar's
    assert first["rl/sidecar_logprob_abs_diff"] == pytest.approx(math.log(4.0), abs=1e-4)
    assert first["loss"] == pytest.approx(2 * expected, abs=2e-5)


def test_grpo_holds_one_micro_batch_of_rows_at_pp1(tiny_checkpoints, tmp_path):
    """Issue 31 9d: at PP=1 the reference's full-vocabulary rows (kl_estimator=full) are computed inside each
    micro-batch's loss and the recomputed log-probs' rows one micro-batch at a time, so at most one micro-batch's
    rows are alive at once (counted through weak references); collecting them all up front, as PP > 1 must, holds
    all six. Loss, KL, ratio and gradient norm are the same either way over two steps."""
    rl = {"kl_coef": 0.1, "kl_estimator": "full", "recompute_old_logprobs": True}
    runs = {}
    for up_front in (False, True):
        cfg = _cfg(tmp_path / str(up_front), tiny_checkpoints["qwen3"], 1, **rl)
        runs[up_front] = run_distributed(grpo_steps_counting_rows, 1, cfg.parallel, cfg, 2, up_front)[0]
    (per_mb, peak), (collected, peak_up_front) = runs[False], runs[True]
    micro_batches = sum(map(len, LENGTHS))  # micro_batch_size 1, every rollout kept
    assert peak == 1 and peak_up_front == micro_batches
    assert per_mb[1]["divergence"] > 1e-4  # step 2: the policy moved away from the reference
    for a, b in zip(per_mb, collected):
        for key in ("loss", "divergence", "grad_norm", "rl/ratio_mean", "rl/sidecar_logprob_abs_diff"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
