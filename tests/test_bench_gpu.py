"""bench/gpu.py is ready for a CUDA machine: its --tiny form runs the same path (model folder,
lorakit train, PEFT + Trainer with and without checkpointing, MFU, the table) on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_bench_runs_its_tiny_form_on_cpu(tmp_path):
    pytest.importorskip("peft")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--tiny", "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "tokens/s" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| lorakit (packed, bf16)", "| PEFT + Trainer padding-free bf16",
                                                  "| PEFT + Trainer padding-free bf16, grad ckpt"]
    for row in rows:
        tokens_per_s, mfu = row.split(" | ")[1:3]
        assert float(tokens_per_s) > 0 and mfu.endswith("%")
    assert rows[0].endswith("| 1.00 | 1.00 |")  # lorakit against itself
