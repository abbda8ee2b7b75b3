"""lorakit train under a reusing malloc (lorakit.cli.allocator): which library is chosen, a wrong
choice refused with the variable named, the restarted process running under it and giving its
own children the user's environment back."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.cli import allocator
from lorakit.cli.allocator import ALLOCATOR_ENV, allocator_library, settle_restarted_process
from lorakit.errors import LorakitError

from conftest import tiny_train_cmd

linux_mimalloc = pytest.mark.skipif(allocator._bundled_mimalloc() is None, reason="the cmeel-mimalloc wheel is not installed")


def test_the_choice_of_library(tmp_path):
    assert allocator_library({ALLOCATOR_ENV: "system"}) is None
    lib = tmp_path / "libjemalloc.so.2"
    lib.write_bytes(b"\x7fELF")
    assert allocator_library({ALLOCATOR_ENV: str(lib)}) == str(lib.resolve())
    with pytest.raises(LorakitError, match=rf"{ALLOCATOR_ENV}=/no/such.so: no such file; .*'auto' or 'system'"):
        allocator_library({ALLOCATOR_ENV: "/no/such.so"})
    auto = allocator_library({})
    if sys.platform.startswith("linux") and allocator._bundled_mimalloc():
        assert Path(auto).name.startswith("libmimalloc.so") and Path(auto).is_file()


def test_the_restarted_process_puts_the_environment_back(monkeypatch):
    monkeypatch.setattr(allocator, "_STATE", {"restarted": False, "in_use": None})
    for previous, want in (("/opt/mine.so", "/opt/mine.so"), ("", None)):
        monkeypatch.setenv("LD_PRELOAD", f"/x/libmimalloc.so:{previous}" if previous else "/x/libmimalloc.so")
        monkeypatch.setenv("LORAKIT_ALLOCATOR_ACTIVE", "/x/libmimalloc.so")
        monkeypatch.setenv("LORAKIT_ALLOCATOR_PREVIOUS_PRELOAD", previous)
        monkeypatch.setenv("LORAKIT_ALLOCATOR_ADDED", "MIMALLOC_PURGE_DELAY")
        monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "-1")
        settle_restarted_process()
        assert os.environ.get("LD_PRELOAD") == want
        assert not any(k.startswith("LORAKIT_ALLOCATOR_") or k == "MIMALLOC_PURGE_DELAY" for k in os.environ)
        assert allocator.allocator_in_use() is None  # /x/libmimalloc.so is not mapped in this process
        assert allocator._STATE["restarted"]  # so it does not restart again


def test_a_file_the_loader_refuses_runs_once_with_the_c_library(tmp_path):
    bogus = tmp_path / "notalib.so"
    bogus.write_text("not a shared library\n")
    env = {**os.environ, ALLOCATOR_ENV: str(bogus)}
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--data", str(tmp_path / "none.jsonl")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "none.jsonl" in done.stderr  # the run's own error, after one restart
    assert f"warning: {ALLOCATOR_ENV}: {bogus} could not be preloaded" in done.stderr
    assert done.stderr.count("cannot be preloaded") == 1  # the loader's message, once: no restart loop


@linux_mimalloc
def test_a_training_process_runs_under_mimalloc_unless_told_otherwise(tiny_model_dir, tmp_path):
    cmd, _ = tiny_train_cmd(tiny_model_dir, tmp_path, "--train.max_steps", "1")
    env = {k: v for k, v in os.environ.items() if k != ALLOCATOR_ENV}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("memory: "))
    assert line.endswith("malloc: libmimalloc.so"), line
    off, _ = tiny_train_cmd(tiny_model_dir, tmp_path, "--train.max_steps", "1", "--out", str(tmp_path / "off"))
    done = subprocess.run(off, capture_output=True, text=True, env={**env, ALLOCATOR_ENV: "system"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "malloc: the C library's" in done.stdout
    bad = subprocess.run(off, capture_output=True, text=True, env={**env, ALLOCATOR_ENV: "/no/such.so"}, timeout=300)
    assert bad.returncode == 2 and f"{ALLOCATOR_ENV}=/no/such.so: no such file" in bad.stderr
    assert "Traceback" not in bad.stderr


@linux_mimalloc
def test_a_script_restarts_itself_with_its_own_arguments(tmp_path):
    """What the benchmarks do to run under the allocator `lorakit train` uses."""
    script = tmp_path / "bench_like.py"
    script.write_text("import sys\n"
                      "from lorakit.cli.allocator import allocator_in_use, restart_with_allocator, settle_restarted_process\n"
                      "restart_with_allocator(sys.argv[1:], program=[__file__])\n"
                      "settle_restarted_process()\n"
                      "import os\n"
                      "print(allocator_in_use(), sys.argv[1:], os.environ.get('LD_PRELOAD'))\n")
    env = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_ENV, "LD_PRELOAD")}
    done = subprocess.run([sys.executable, str(script), "--steps", "3"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["libmimalloc.so", "['--steps',", "'3']", "None"]
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**env, ALLOCATOR_ENV: "system"}, timeout=60)
    assert done.stdout.split() == ["None", "[]", "None"]
