"""Every command the docs show works as written (issue 32). The shell blocks of README.md, examples/README.md and
docs/*.md are collected line by line (continuations joined, heredoc bodies skipped); each command is

- run, where that is cheap on CPU: `megatron-opsd version`, `megatron-opsd plan ...` (exit 0: the layout fits),
  `--help`, the launch scripts with DRY_RUN=1, `python tools/X.py --help`; in a scratch directory whose
  examples/, megatron_opsd/ and tools/ link to the checkout, so repository-relative paths resolve as they do for
  a user in the checkout root;
- or checked statically: a `megatron-opsd` command's subcommand, flags and values through the command's own
  argparse parser (`parse_intermixed_args`, as the CLI does; an abbreviated line, with `...`, only its flags),
  its `key=value` overrides against the config tree, the repository files it names, `make` targets, modules
  run with `-m`, scripts. Heavy commands (train, sft, rl, pipeline, demo, eval, sidecar, check-model, export)
  are static here; tests/test_demo_e2e.py, test_pipeline.py, test_trainer_e2e.py and test_eval_e2e.py run them.

A command of a kind not listed fails the test, so a new doc block is classified when it is written. Inline
`megatron-opsd ...` spans in the prose get the flags check too. The shipped configs' paths under runs/demo/ are
checked against what `megatron-opsd demo` writes."""
import argparse
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_opsd.cli import SUBCOMMANDS
from megatron_opsd.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "examples" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
# The first word of a line in an untagged block that makes the block a shell block (others are diagrams, formulas)
COMMAND_WORDS = {"megatron-opsd", "make", "python", "python3", "torchrun", "sbatch", "bash", "curl", "pip", "git",
                 "source", "srun"}
EXTERNAL = {"pip", "git", "curl", "cd", "source", "apt-get"}  # documented tools of the user's own system
HEAVY = {"train", "sft", "rl", "pipeline", "demo", "eval", "sidecar", "check-model", "export"}
REPO_DIRS = ("examples/", "docs/", "megatron_opsd/", "tools/", "scripts/", "tests/")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


def shell_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(first line number, lines) of each fenced block that holds shell commands."""
    found, lang, lines, start = [], None, [], 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if lang is None and stripped.startswith("```"):
            lang, lines, start = stripped[3:].strip(), [], number + 1
        elif lang is not None and stripped == "```":
            words = [ln.split()[0] for ln in lines if ln.strip() and not ln.strip().startswith("#")]
            first = next((w for w in words if not ENV_ASSIGNMENT.match(w)), "")
            if lang in SHELL_LANGS or (lang == "" and first in COMMAND_WORDS):
                found.append((start, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
    return found


def commands(path: Path) -> list[tuple[str, str]]:
    """(where, command line) of every command in the file's shell blocks."""
    out = []
    for start, lines in shell_blocks(path):
        heredoc, pending, first = None, "", 0
        for offset, line in enumerate(lines):
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            text = line.rstrip()
            if not pending:
                first = start + offset
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            text, pending = (pending + text).strip(), ""
            marker = re.search(r"<<-?'?(\w+)'?", text)
            if marker:
                heredoc = marker.group(1)
            if text and not text.startswith("#"):
                out.append((f"{path.relative_to(REPO)}:{first}", text))
    return out


ALL = [(where, cmd) for path in DOCS for where, cmd in commands(path)]


def words(command: str) -> list[str]:
    """The words of a command (comments dropped); doc notation for optional parts, ``[--flag X]``, kept as is."""
    argv = [w.strip("[]") for w in shlex.split(command, comments=True) if w.strip("[]")]
    return argv[:-1] if argv and argv[-1] == "&" else argv


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # K, N, HF_DIR: the docs' names for a value the user picks


def fill_placeholders(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """A placeholder given to a numeric option becomes 1, so argparse can check the rest of the line."""
    typed = {s: a.type for a in parser._actions for s in a.option_strings if a.type in (int, float)}
    return [("1" if PLACEHOLDER.match(w) and i and argv[i - 1] in typed else w) for i, w in enumerate(argv)]


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    """The parser ``megatron-opsd <name>`` uses (cli.main builds it the same way)."""
    parser = argparse.ArgumentParser(prog=f"megatron-opsd {name}", exit_on_error=False)
    importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
    parser.add_argument("--debug", action="store_true")
    return parser


def check_repo_paths(argv: list[str]) -> None:
    for word in argv:
        for value in word.split("=", 1)[-1].split(","):
            if value.startswith(REPO_DIRS) and not any(c in value for c in "*$<>"):
                assert (REPO / value).exists(), f"{value} does not exist in the repository"


CONFIG_LOADERS = {"train": "megatron_opsd.config:load_config", "sft": "megatron_opsd.training.sft.config:load_sft_config",
                  "rl": "megatron_opsd.training.grpo.config:load_rl_config"}


def check_megatron_opsd(argv: list[str]) -> None:
    """Statically: the subcommand, every flag, and (unless abbreviated) a full parse plus the config overrides."""
    assert argv and argv[0] in SUBCOMMANDS, f"unknown command {argv[:1]}"
    name, rest = argv[0], argv[1:]
    parser = subcommand_parser(name)
    options = {s for action in parser._actions for s in action.option_strings}
    flags = [w.split("=", 1)[0] for w in rest if w.startswith("--")]
    assert not [f for f in flags if f not in options], f"megatron-opsd {name}: unknown flags"
    check_repo_paths(rest)
    if "..." in rest or "(same)" in rest:
        return  # abbreviated in the docs: the flags above are what can be checked
    try:
        args = parser.parse_intermixed_args(fill_placeholders(parser, rest))
    except (argparse.ArgumentError, SystemExit) as err:
        raise AssertionError(f"megatron-opsd {name} {' '.join(rest)}: {err}") from None
    if name in CONFIG_LOADERS and args.overrides + args.sets:
        module, fn = CONFIG_LOADERS[name].split(":")
        config = args.config if args.config and (REPO / args.config).exists() else None
        getattr(importlib.import_module(module), fn)(config and str(REPO / config), args.sets + args.overrides)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """An empty working directory whose examples/, megatron_opsd/ and tools/ are the checkout's."""
    root = tmp_path_factory.mktemp("docs_commands")
    for name in ("examples", "megatron_opsd", "tools"):
        (root / name).symlink_to(REPO / name)
    return root


def run_megatron_opsd(argv: list[str], scratch: Path, monkeypatch) -> str:
    monkeypatch.chdir(scratch)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = cli_main(argv)
    assert rc == 0, f"exit {rc}:\n{out.getvalue()[-2000:]}"
    return out.getvalue()


def run_process(argv: list[str], env: dict, scratch: Path) -> str:
    proc = subprocess.run(argv, cwd=scratch, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert "Warning" not in proc.stderr, proc.stderr  # item 9: no warnings before the output
    return proc.stdout


def makefile_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([\w-]+):", (REPO / "Makefile").read_text(), re.M)}


@pytest.mark.parametrize("where,command", ALL, ids=[w for w, _ in ALL])
def test_documented_command(where, command, scratch, monkeypatch):
    argv = words(command)
    env = {}
    while argv and ENV_ASSIGNMENT.match(argv[0]):
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    head = argv[0]
    if head == "megatron-opsd":
        check_megatron_opsd(argv[1:])
        sub = argv[1]
        if "..." in argv:
            return  # abbreviated ("the same, plus ..."): its flags are what can be checked
        if sub in ("version", "plan"):
            run_megatron_opsd(argv[1:], scratch, monkeypatch)
        else:
            assert sub in HEAVY, f"{sub}: classify it (run it here, or name the test that runs it)"
    elif head == "make":
        assert set(argv[1:]) <= makefile_targets(), f"no such make target: {argv[1:]}"
    elif head in ("python", "python3") and argv[1:3] == ["-m", "pip"] or head in EXTERNAL:
        return  # the user's own tools (pip, git, curl ...): nothing of ours to check
    elif head in ("python", "python3") and argv[1] == "-m":
        assert importlib.util.find_spec(argv[2]) is not None, f"no module {argv[2]}"
    elif head in ("python", "python3") and argv[1] == "-":
        return  # a heredoc script for a GPU machine (docs/gpu.md); its calls are tested in tests/test_gpu_*.py
    elif head in ("python", "python3"):
        assert argv[1].startswith("tools/") and (REPO / argv[1]).is_file(), f"{argv[1]} does not exist"
        run_process([sys.executable, argv[1], "--help"], {}, scratch)
    elif head == "bash" or head.startswith("examples/launch/"):
        script = argv[1] if head == "bash" else head
        assert (REPO / script).is_file(), f"{script} does not exist"
        check_repo_paths(argv + list(env.values()))
        inner = argv.index("megatron-opsd") if "megatron-opsd" in argv else None
        if inner is not None:
            check_megatron_opsd(argv[inner + 1:])
        out = run_process(["bash", *argv[argv.index(script):]], {**env, "DRY_RUN": "1"}, scratch)
        assert "DRY_RUN" in out or "megatron-opsd" in out, out
    elif head == "torchrun":  # torchrun [its flags] SCRIPT [the script's flags]: the script is ours and exists
        script = next(a for a in argv[1:] if a.endswith(".py"))
        assert (REPO / script).is_file(), f"{script} does not exist"
        run_process([sys.executable, script, "--help"], {}, scratch)
    elif head == "export":  # an environment variable of ours: the package or a launch script must read it
        for name in (w.split("=", 1)[0] for w in argv[1:] if "=" in w):
            readers = [f for f in [*(REPO / "megatron_opsd").rglob("*.py"), *(REPO / "examples/launch").iterdir()]
                       if f.is_file() and name in f.read_text()]
            assert name.startswith(("OPSD_", "HF_", "CUDA_", "VLLM_")) and readers, f"nothing of ours reads ${name}"
    elif head == "sbatch":
        script = argv[-1]
        assert script.endswith(".sbatch") and (REPO / script).is_file(), f"{script} does not exist"
        exports = dict(kv.split("=", 1) for kv in argv[[a.startswith("--export=") for a in argv].index(True)]
                       .removeprefix("--export=").split(",") if "=" in kv)
        check_repo_paths(list(exports.values()))
    else:
        pytest.fail(f"{where}: `{command}`: a command of a kind this test does not know; classify it here")


INLINE = re.compile(r"`(megatron-opsd [^`]+)`")


def test_inline_megatron_opsd_spans_name_real_flags():
    """`megatron-opsd <command> --flag` in the prose: the command and its flags exist (values are often elided)."""
    seen = 0
    for path in DOCS:
        for span in INLINE.findall(path.read_text()):
            argv = words(span.replace("|", " "))
            if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
                assert len(argv) < 2 or not argv[1].islower() or argv[1].startswith(("<", "-")), (path, span)
                continue
            options = {s for a in subcommand_parser(argv[1])._actions for s in a.option_strings}
            unknown = [w.split("=", 1)[0] for w in argv[2:] if w.startswith("--") and w.split("=", 1)[0] not in options]
            assert not unknown, f"{path.name}: `{span}`: unknown flags {unknown}"
            seen += 1
    assert seen > 10


def test_shipped_configs_point_at_what_the_demo_writes(tmp_path):
    """runs/demo/... paths in examples/*.yaml and the demo's stage configs exist after `megatron-opsd demo`."""
    from megatron_opsd.demo.prepare import DemoInputs
    from megatron_opsd.demo.recipe import DemoRecipe
    from megatron_opsd.demo.run import demo_pipeline

    run_dir = Path("runs/demo")
    inputs = DemoInputs.under(run_dir)
    pipeline = demo_pipeline(DemoRecipe(), run_dir, REPO / "megatron_opsd" / "demo" / "configs", seed=0)
    written = {str(p) for p in (inputs.train, inputs.test, inputs.curve, inputs.sft, inputs.init_model)}
    written |= {str(Path(pipeline.out_dir) / stage.name / "hf") for stage in pipeline.stages}
    configs = [*sorted((REPO / "examples").glob("*.yaml")), *sorted((REPO / "megatron_opsd/demo/configs").glob("*.yaml"))]
    referenced = set()
    for config in configs:
        text = config.read_text()
        referenced |= {m for m in re.findall(r"runs/demo/[\w./-]+", text)}
        yaml.safe_load(text)
    assert referenced and referenced <= written, sorted(referenced - written)


# The developers' notes and data beside the checkout (../shared/), which users do not have
OUTSIDE_THE_REPOSITORY = re.compile(r"(\bshared/|\b(?:METHODS|ENVIRONMENT|PEERS|STYLE)\.md)")


def outside_references(text: str) -> list[str]:
    """The lines of a doc that point at a file outside the repository."""
    return [line.strip() for line in text.splitlines() if OUTSIDE_THE_REPOSITORY.search(line)]


def test_docs_name_no_file_outside_the_repository():
    """A user has the repository, not the developers' notes beside it (issue 32 item 7)."""
    assert outside_references("as measured (/work/shared/METHODS.md)\nsee ../shared/ENVIRONMENT.md\nfine docs/x.md") \
        == ["as measured (/work/shared/METHODS.md)", "see ../shared/ENVIRONMENT.md"]
    found = {str(doc.relative_to(REPO)): lines for doc in DOCS if (lines := outside_references(doc.read_text()))}
    assert not found, found


def test_commands_that_need_more_say_what(scratch, capsys, monkeypatch):
    """The smoke job at TP=2 in one process names torchrun; `plan` of a shipped config without its model on this
    machine names --model-config and the shipped model configs (both one line, exit 2, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "megatron_opsd.models.smoke", "--tp", "2"], cwd=scratch,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "torchrun --nproc-per-node 2 -m megatron_opsd.models.smoke --tp 2" in proc.stderr

    monkeypatch.chdir(scratch)
    assert cli_main(["plan", "--config", "examples/configs/qwen3-32b_opsdc.yaml", "--gpu-memory", "80GB"]) == 2
    err = capsys.readouterr().err
    assert "model.path: /checkpoints/Qwen3-32B not found; pass --model-config" in err and "qwen3-32b" in err


def test_generated_plan_table_is_what_plan_prints_now(monkeypatch):
    """docs/benchmarks.md's LoRA plan section equals what tools/plan_tables.py writes from `megatron-opsd plan`."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    plan_tables = importlib.import_module("plan_tables")
    text = (REPO / "docs" / "benchmarks.md").read_text()
    documented = text[text.index(plan_tables.BEGIN): text.index(plan_tables.END) + len(plan_tables.END)] + "\n"
    assert documented == plan_tables.section(), "rerun: python tools/plan_tables.py --markdown docs/benchmarks.md"


def test_scale_table_peaks_are_what_plan_prints(monkeypatch, capsys):
    """docs/scale.md's example-config table: each row's "plan peak" is its configs' `# plan:` line's peak."""
    monkeypatch.chdir(REPO)
    rows = re.findall(r"^\| `([\w.-]+)_opsdc\.yaml`, `[\w.-]+_correct_only\.yaml` \|.*\| ([\d.]+) GiB \|$",
                      (REPO / "docs" / "scale.md").read_text(), re.M)
    assert len(rows) == len(list((REPO / "examples" / "configs").glob("*_opsdc.yaml")))
    for model, documented in rows:
        for variant in ("opsdc", "correct_only"):
            config = REPO / "examples" / "configs" / f"{model}_{variant}.yaml"
            line = re.search(r"^# plan: megatron-opsd (.+)$", config.read_text(), re.M).group(1)
            assert cli_main(shlex.split(line)) == 0
            peak = float(re.search(r"peak stage \d+: ([\d.]+) GiB", capsys.readouterr().out).group(1))
            assert f"{peak:.1f}" == documented, (config.name, peak, documented)


def test_help_of_every_command_prints_no_warnings(scratch):
    """`megatron-opsd <command> --help` in a fresh process: help on stdout, nothing on stderr (issue 32 item 9:
    megatron-core's expected import warnings are filtered in megatron_opsd/__init__.py)."""
    helps = ("import contextlib, sys\nfrom megatron_opsd.cli import SUBCOMMANDS, main\n"
             "for name in SUBCOMMANDS:\n"
             "    with contextlib.suppress(SystemExit):\n"
             "        main([name, '--help'])\n")
    proc = subprocess.run([sys.executable, "-c", helps], cwd=scratch, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert all(f"megatron-opsd {name}" in proc.stdout for name in SUBCOMMANDS if name != "version")
