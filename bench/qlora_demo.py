"""QLoRA against fp32 LoRA on the built-in demo task, and what merging a QLoRA adapter costs.

    .venv/bin/python bench/qlora_demo.py [--out /tmp/qlora-bench] [--model smollm2-135m]

1. Trains the demo twice with the same settings — `lorakit train` (fp32 base) and
   `lorakit train --quantize nf4` — each in its own process, and reports held-out exact match and
   eval loss before/after, tokens/s, and the process's peak RSS (from wait4, the whole process).
2. Measures the quantized linear weights on the model's own tensors against their fp32 size.
3. Evaluates the QLoRA adapter four ways: unmerged over the 4-bit base (what training saw), merged
   into the dequantized base (lorakit merge), merged into the original fp32 weights, and merged then
   re-quantized to NF4 (lorakit merge --requantize) — plus the measured re-quantization error.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch


def run_train(out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--out", str(out), "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stdout[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    base = next(r for r in rows if r.get("model") == "base")
    after = [r for r in rows if r.get("model") == "adapter"][-1]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]
    return {"base": base, "after": after, "tokens_per_s": speed, "peak_rss_mib": usage.ru_maxrss / 1024,
            "wall_s": time.perf_counter() - t0}


def weight_memory(model_name: str) -> tuple[float, float, int]:
    from lorakit.models import load_model
    from lorakit.quant import quantized_layers, storage_bytes

    model, _ = load_model(model_name, "cpu", quantize="nf4")
    layers = [m for _, m in quantized_layers(model)]
    stored = sum(storage_bytes(m) for m in layers)
    fp32 = sum(4 * m.in_features * m.out_features for m in layers)
    return stored / 2**20, fp32 / 2**20, len(layers)


def merge_variants(run: Path) -> tuple[list[tuple[str, dict]], dict]:
    from lorakit.config import load_yaml, run_config_from_dict
    from lorakit.data.dataset import prepare_data
    from lorakit.model import LoraModel
    from lorakit.models import cache_root, load_model
    from lorakit.quant import QuantSpec, dequantize_model, quantize_model, requantize_error
    from lorakit.train import _evaluate

    cfg = run_config_from_dict(load_yaml(run / "config.yaml"))
    spec = QuantSpec("nf4", True, torch.float32)
    device = torch.device("cpu")
    results = []

    def evaluate(model, tok, label):
        prepared = prepare_data(cfg.data, tok, cfg.train.seed, cache_root() / "data")
        lm = LoraModel(model) if not hasattr(model, "disable_adapter") else model
        scores, _ = _evaluate(lm, tok, prepared, cfg, device, base=False)
        results.append((label, scores))
        print(f"  {label}: {scores}", flush=True)

    base, tok = load_model(cfg.model.name, "cpu", quantize="nf4")
    lm = LoraModel.from_pretrained(base, run / "adapter").eval()
    evaluate(lm, tok, "unmerged over the NF4 base (as trained)")
    dequantize_model(lm.model)
    err = requantize_error(lm, spec)
    merged = lm.merge_and_unload()
    evaluate(merged, tok, "merged into the dequantized base, fp32 (lorakit merge)")
    quantize_model(merged, spec)
    evaluate(merged, tok, "merged, then re-quantized to NF4 (merge --requantize)")
    del merged, lm, base
    plain, tok = load_model(cfg.model.name, "cpu")
    naive = LoraModel.from_pretrained(plain, run / "adapter").eval().merge_and_unload()
    evaluate(naive, tok, "merged into the original fp32 weights")
    return results, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/qlora-bench")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    out = Path(args.out)
    model_flag = ["--model", args.model]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}", flush=True)

    runs = {}
    for label, extra in (("LoRA, fp32 base", []), ("QLoRA, NF4 + double quant", ["--quantize", "nf4"])):
        print(f"training: {label} ...", flush=True)
        runs[label] = run_train(out / label.split(",")[0].lower(), model_flag + extra)
        print(f"  {runs[label]}", flush=True)

    stored, fp32, n = weight_memory(args.model)
    print(f"\nquantized linear weights: {n} layers, {stored:.1f} MiB vs {fp32:.1f} MiB fp32 = {stored / fp32:.3f}×")

    print("\n| run | exact match before → after | eval loss before → after | tokens/s | peak RSS MiB | whole run s |")
    print("|---|---|---|---|---|---|")
    for label, r in runs.items():
        b, a = r["base"], r["after"]
        print(f"| {label} | {b['exact_match']:.1f}% → {a['exact_match']:.1f}% | {b['eval_loss']:.4f} → "
              f"{a['eval_loss']:.4f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} |")
    lo, q = runs["LoRA, fp32 base"], runs["QLoRA, NF4 + double quant"]
    print(f"\nQLoRA/LoRA: eval loss {q['after']['eval_loss'] / lo['after']['eval_loss']:.3f}×, tokens/s "
          f"{q['tokens_per_s'] / lo['tokens_per_s']:.2f}×, peak RSS {q['peak_rss_mib'] / lo['peak_rss_mib']:.2f}×")

    print("\nmerging the QLoRA adapter:", flush=True)
    results, err = merge_variants(out / "qlora")
    print("\n| QLoRA adapter evaluated | eval loss | exact match |")
    print("|---|---|---|")
    for label, s in results:
        print(f"| {label} | {s['eval_loss']:.4f} | {s.get('exact_match', 0):.1f}% |")
    print(f"\nre-quantization error: {100 * err['update_error']:.1f}% of the update's norm, "
          f"{100 * err['weight_error']:.2f}% of the merged weights' norm")


if __name__ == "__main__":
    main()
