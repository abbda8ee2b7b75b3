"""Data-parallel training with torchrun on CPU (gloo): two processes give the adapter a single
process gives with the same global batch, a 2-process run resumes to the uninterrupted result,
a changed world size is refused on resume, and `lorakit train --nproc` launches torchrun (the
two-process run of the first test is started that way)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"copy {i} {i % 7}", "output": f"{i % 7} {i}"}) + "\n"
                            for i in range(48)))
    return path


def _args(model_dir, data, out, *extra):
    return ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--lora.r", "4", "--lora.alpha", "8",
            "--data.max_len", "64", "--data.val_size", "8", "--train.lr", "3e-3", "--train.batch_size", "2",
            "--train.warmup", "1", "--train.threads", "1", "--train.plot", "false", "--train.eval_samples", "0", *extra]


def _run(args, nproc=1, timeout=300, env=None):
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorakit", "train", *args]
    else:
        cmd = [sys.executable, "-m", "lorakit", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def _adapter(folder):
    return load_file(folder / "adapter_model.safetensors")


def _assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    single = _run(_args(tiny_model_dir, data, tmp_path / "one", "--train.grad_accum", "2", "--train.max_steps", "4"))
    assert single.returncode == 0, single.stderr[-3000:]
    # `lorakit train --nproc 2` launches torchrun itself (what a user types)
    double = _run(_args(tiny_model_dir, data, tmp_path / "two", "--train.grad_accum", "1", "--train.max_steps", "4",
                        "--nproc", "2"))
    assert double.returncode == 0, double.stderr[-3000:]
    assert "distributed: 2 processes" in double.stdout and double.stdout.count("run folder:") == 1  # rank 0 prints
    _assert_same(_adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "two" / "adapter"))
    one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [round(r["loss"], 5) for r in one] == [round(r["loss"], 5) for r in two]
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]


def test_two_process_resume_matches_and_world_size_is_checked(tiny_model_dir, tmp_path):
    import shutil

    data = _data(tmp_path)
    args = _args(tiny_model_dir, data, tmp_path / "run", "--train.max_steps", "6", "--train.save_every", "3")
    full = _run(args, nproc=2)
    assert full.returncode == 0, full.stderr[-3000:]
    uninterrupted = _adapter(tmp_path / "run" / "adapter")
    # Go back to the step-3 checkpoint as if the run had stopped there, and resume it on 2 processes.
    checkpoints = sorted((tmp_path / "run" / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and checkpoints[0].name.endswith("03") and checkpoints[1].name.endswith("06")
    shutil.rmtree(checkpoints[1])
    shutil.rmtree(tmp_path / "run" / "adapter")
    again = _run(args + ["--resume", str(checkpoints[0])], nproc=2)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    _assert_same(uninterrupted, _adapter(tmp_path / "run" / "adapter"))
    refused = _run(args + ["--resume", str(checkpoints[0])], nproc=1)
    assert refused.returncode == 2 and "2 process(es)" in refused.stderr, refused.stderr[-2000:]


def test_fsdp2_run_writes_the_ddp_adapter(tiny_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    data = _data(tmp_path)
    ddp = _run(_args(tiny_model_dir, data, tmp_path / "ddp", "--train.max_steps", "4", "--train.grad_accum", "2"), nproc=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = _run(_args(tiny_model_dir, data, tmp_path / "fsdp", "--train.max_steps", "4", "--train.grad_accum", "2",
                      "--train.fsdp", "true"), nproc=2)
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "FSDP2: 2 decoder blocks sharded over 2 processes" in fsdp.stdout
    _assert_same(_adapter(tmp_path / "ddp" / "adapter"), _adapter(tmp_path / "fsdp" / "adapter"), atol=1e-5)
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "fsdp" / "adapter")
    assert loaded.peft_config["default"].r == 4
    single = _run(_args(tiny_model_dir, data, tmp_path / "x", "--train.fsdp", "true"))
    assert single.returncode == 2 and "start with --nproc N or torchrun" in single.stderr


@pytest.mark.slow  # three torchrun jobs and three single-process runs: ~1.5 min
@pytest.mark.parametrize("objective,fsdp", [("dpo", False), ("orpo", False), ("dpo", True)])
def test_a_preference_run_on_two_processes_equals_one_process(tiny_model_dir, tmp_path, objective, fsdp):
    """The objective's step mean (pairs and chosen-answer tokens summed over every rank) and its
    logged rewards are those of one process with the same global batch — also with the decoder
    blocks sharded (FSDP2), where DPO's reference forward runs through the shards too."""
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"add {i} and {i}", "chosen": str(2 * i),
                                        "rejected": f"the sum is {2 * i + i % 3}"}) + "\n" for i in range(40)))
    flags = ("--train.objective", objective, "--train.max_steps", "3", "--train.log_every", "1")
    single = _run(_args(tiny_model_dir, data, tmp_path / "one", "--train.grad_accum", "2", *flags))
    assert single.returncode == 0, single.stderr[-3000:]
    double = _run(_args(tiny_model_dir, data, tmp_path / "two", "--train.grad_accum", "1", *flags,
                        "--train.fsdp", str(fsdp).lower()), nproc=2)
    assert double.returncode == 0, double.stderr[-3000:]
    _assert_same(_adapter(tmp_path / "one" / "adapter"), _adapter(tmp_path / "two" / "adapter"))
    logged = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                          if '"loss"' in x]
    one, two = logged("one"), logged("two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for key in ("loss", "reward_acc", "reward_margin", "logp_chosen", "logp_rejected"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
