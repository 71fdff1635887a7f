"""The console script: help, version, and a clear message for unknown commands."""
import subprocess
import sys


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "megatron_opsd.cli", *args], capture_output=True, text=True)


def test_help_lists_commands():
    out = run_cli("--help")
    assert out.returncode == 0
    for name in ("version", "train", "sidecar", "check-model"):
        assert name in out.stdout


def test_version_names_dependencies():
    out = run_cli("version")
    assert out.returncode == 0
    assert out.stdout.startswith("megatron-opsd ")
    assert "megatron-core 0.16" in out.stdout


def test_unknown_command_is_an_error():
    out = run_cli("distil")
    assert out.returncode == 2
    assert "unknown command 'distil'" in out.stderr
