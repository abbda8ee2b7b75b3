"""Mistakes and accidents met by trying the commands: each runs the real command and checks its
message and exit code — no traceback, the words name the command's own flags, nothing half-written."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import adding_data, tiny_train_cmd
from lorakit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def _user_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr


def test_serve_without_its_extra_says_how_to_install_it(tiny_model_dir):
    code = ("import sys; sys.modules['uvicorn'] = None; sys.modules['fastapi'] = None; "  # as if not installed
            "from lorakit.cli import main; raise SystemExit(main(sys.argv[1:]))")
    err = _user_error(_run("-c", code, "serve", "--model", str(tiny_model_dir)))
    assert "lorakit serve needs fastapi and uvicorn" in err and "pip install 'lorakit[serve]'" in err


@pytest.mark.parametrize("name, content, message", [
    ("latin1.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"),
     r"latin1.jsonl:2: the file is not UTF-8 text .* at byte offset 56; save it as UTF-8"),
    ("latin1.csv", "instruction,output\nna\xefve,x\n".encode("latin-1"), r"latin1.csv:2: the file is not UTF-8 text"),
    ("binary.json", bytes(range(256)) * 4, r"binary.json:\d+: the file looks like a binary file"),
    ("binary.jsonl", b"\x00\x01\x02\x03 not text\n", r"binary.jsonl:1: this looks like a binary file"),
    ("cut.json", b'[{"instruction": "a", "output": "b"}, {"instruction": "c", "out', r"cut.json:1: not valid JSON .*truncated"),
    ("cut.parquet", b"PAR1\x15\x04\x15", r"cut.parquet: not a readable parquet file"),
    ("cells.csv", b'instruction,output\n"a, b",c,d\n', r"cells.csv:2: 3 cells but the header names 2 columns"),
])
def test_unreadable_data_files_are_named_with_the_place(tiny_model_dir, tmp_path, capsys, name, content, message):
    import re

    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    data = tmp_path / name
    data.write_bytes(content)
    for cmd in (["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "run")],
                ["data", "inspect", str(data), "--model", str(tiny_model_dir)]):
        assert main(cmd) == 2  # in-process: an unexpected exception would fail the test with its traceback
        err = capsys.readouterr().err
        assert str(data) in err and re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_data_file_that_is_not_utf8_in_a_real_process(tiny_model_dir, tmp_path):
    data = tmp_path / "notes.jsonl"
    data.write_bytes('{"instruction": "\xe9t\xe9", "output": "x"}\n'.encode("latin-1"))
    err = _user_error(_run("-m", "lorakit", "train", "--model", str(tiny_model_dir), "--data", str(data)))
    assert f"{data}:1: the file is not UTF-8 text" in err


def test_parquet_data_is_read(tiny_model_dir, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lorakit.data.formats import load_examples

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["add 1 and 1", "add 2 and 2"], "output": ["2", "4"]}), path)
    examples = load_examples([path])
    assert [e["messages"][-1]["content"] for _, e in examples] == ["2", "4"]
    assert examples[1][0] == f"{path}: row 2"


def _main_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_a_config_that_is_not_utf8_or_is_a_folder(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_bytes("train:\n  lr: 1e-3 # d\xe9j\xe0\n".encode("latin-1"))
    assert f"{bad}: not UTF-8 text" in _main_error(capsys, "train", "--config", str(bad))
    assert "is a folder" in _main_error(capsys, "train", "--config", str(tmp_path))


def test_inference_commands_name_their_own_flags(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import torch

    # a CUDA device on a machine without one: the advice is the command's --device, not train's --model.device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in ("generate", "merge"):
        extra = ["--prompt", "hi"] if cmd == "generate" else ["--adapter", str(tmp_path), "--out", str(tmp_path / "m")]
        err = _main_error(capsys, cmd, "--model", str(tiny_model_dir), "--device", "cuda", *extra)
        assert "use --device cpu" in err and "--model.device" not in err
    err = _main_error(capsys, "generate", "--model", str(tiny_model_dir), "--template", "nope", "--prompt", "x")
    assert "--template must be one of" in err and "data.template" not in err
    # the same words hold in train, which takes --device and --template too
    cmd, _ = tiny_train_cmd(tiny_model_dir, tmp_path, "--template", "nope")
    assert "--template must be one of" in _main_error(capsys, *cmd[3:])


def test_train_help_matches_what_auto_picks():
    out = _run("-m", "lorakit", "train", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "fp32 on CPU)" not in text and "fp32 elsewhere)" not in text
    assert "CPUs with native bf16 matmuls" in text  # train.precision auto
    assert "bf16 when training runs in bf16" in text  # model.dtype auto


def _full_disk_after(monkeypatch, target, name: str, calls_ok: int):
    """Make ``target.name`` write a few bytes and then fail as a full disk does, after ``calls_ok`` good calls."""
    original = getattr(target, name)
    count = {"n": 0}

    def write(*args, **kwargs):
        count["n"] += 1
        if count["n"] <= calls_ok:
            return original(*args, **kwargs)
        path = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, (str, os.PathLike))), None)
        if path is not None and not Path(path).is_dir():
            Path(path).write_bytes(b"\0" * 4096)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(target, name, write)


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import torch

    data = adding_data(tmp_path)
    run = tmp_path / "run"
    _full_disk_after(monkeypatch, torch, "save", calls_ok=1)  # the step-2 checkpoint is written, step 4 fails
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(run), "--data.max_len", "48",
                 "--data.val_size", "4", "--train.threads", "1", "--train.plot", "false", "--train.max_steps", "6",
                 "--train.save_every", "2", "--train.batch_size", "2"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the disk holding {run / 'checkpoints'} is full while writing step-00000004" in err
    assert "it needs about" in err and "MiB free there" in err
    ckpts = run / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["step-00000002"]  # intact, and no partial folder left
    assert json.loads((ckpts / "step-00000002" / "progress.json").read_text())["step"] == 2
    assert not (run / "adapter").exists()


def test_a_full_disk_during_merge_leaves_no_half_written_model(tiny_model_dir, two_adapters, tmp_path, monkeypatch, capsys):
    import transformers

    _full_disk_after(monkeypatch, transformers.PreTrainedModel, "save_pretrained", calls_ok=0)
    out = tmp_path / "merged"
    code = main(["merge", "--model", str(tiny_model_dir), "--adapter", str(two_adapters["alpha"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"the disk holding {tmp_path} is full while writing merged (it needs about" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the folder nor a temporary one
