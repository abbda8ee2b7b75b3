"""The console entry point: --help, --version, errors without tracebacks; the README's demo."""

import subprocess
import sys
from pathlib import Path

import pytest

import lorakit

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_version_and_help():
    out = _run("-m", "lorakit", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"lorakit {lorakit.__version__}"
    out = _run("-m", "lorakit", "--help")
    assert out.returncode == 0 and "info" in out.stdout


def test_unknown_command_is_a_usage_error():
    out = _run("-m", "lorakit", "frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_readme_quickstart_demo_learns_the_new_task():
    out = _run("examples/quickstart.py", timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "with the adapter: task B accuracy 100.0%; adapter disabled: task A still 100.0%" in out.stdout
    assert "merged model (plain LlamaForCausalLM): task B accuracy 100.0%" in out.stdout


def test_unknown_flag_suggests_the_closest():
    out = _run("-m", "lorakit", "train", "--lora.rr", "4")
    assert out.returncode == 2 and "unrecognized argument --lora.rr; did you mean --lora.r?" in out.stderr
