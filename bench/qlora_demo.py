"""QLoRA against fp32 LoRA on the built-in demo task, and what merging a QLoRA adapter costs.

    .venv/bin/python bench/qlora_demo.py [--out /tmp/qlora-bench] [--model smollm2-135m] [--seeds 42 1]
                                         [--variants nearest gptq eora gptq-eora]

1. Trains the demo with the same settings as `lorakit train` (fp32 base, fp32 compute) and as the
   chosen QLoRA variants — `--quantize nf4`, with `--quant-rounding gptq`, with `--lora.init eora`,
   with both — each in its own process, once per seed, and reports held-out exact match and eval
   loss before/after, tokens/s, and the process's peak RSS (from wait4, the whole process).
2. Measures the quantized linear weights on the model's own tensors against their fp32 size.
3. Evaluates the GPTQ run's adapter over the float base, a nearest-rounded base and the 4-bit
   base the run saved (what `--quantize nf4` loads for it), and the QLoRA adapter four ways: unmerged over the 4-bit base (what training saw), merged
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


RUNS = {  # variant -> (label, extra flags)
    "lora": ("LoRA, fp32 base", ["--train.precision", "fp32", "--model.dtype", "float32"]),
    "nearest": ("QLoRA, NF4 + double quant", ["--quantize", "nf4"]),
    "gptq": ("QLoRA, NF4 + double quant, GPTQ rounding", ["--quantize", "nf4", "--quant-rounding", "gptq"]),
    "eora": ("QLoRA, NF4 + double quant, EoRA init", ["--quantize", "nf4", "--lora.init", "eora"]),
    "gptq-eora": ("QLoRA, NF4 + double quant, GPTQ rounding + EoRA init",
                  ["--quantize", "nf4", "--quant-rounding", "gptq", "--lora.init", "eora"]),
}


def run_train(out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--out", str(out), "--overwrite", *extra]
    t0 = time.perf_counter()
    env = {**os.environ, "LORAKIT_CPU_BF16": "0"}  # the comparison is against fp32 LoRA on any CPU
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
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
    from lorakit.base import load_model
    from lorakit.quant.bnb import quantized_layers, storage_bytes

    model, _ = load_model(model_name, "cpu", quantize="nf4")
    layers = [m for _, m in quantized_layers(model)]
    stored = sum(storage_bytes(m) for m in layers)
    fp32 = sum(4 * m.in_features * m.out_features for m in layers)
    return stored / 2**20, fp32 / 2**20, len(layers)


def merge_variants(run: Path) -> tuple[list[tuple[str, dict]], dict]:
    from lorakit.config import load_yaml, run_config_from_dict
    from lorakit.data.dataset import prepare_data
    from lorakit.core.lora_model import LoraModel
    from lorakit.base import cache_root, load_model
    from lorakit.quant.bnb import QuantSpec, dequantize_model, quantize_model, requantize_error
    from lorakit.training.evaluate import evaluate_adapter

    cfg = run_config_from_dict(load_yaml(run / "config.yaml"))
    spec = QuantSpec("nf4", True, torch.float32)
    device = torch.device("cpu")
    results = []

    def evaluate(model, tok, label):
        prepared = prepare_data(cfg.data, tok, cfg.train.seed, cache_root() / "data")
        lm = LoraModel(model) if not hasattr(model, "disable_adapter") else model
        scores, _ = evaluate_adapter(lm, tok, prepared, cfg.data.max_len, cfg.train.batch_size, cfg.train.eval_samples,
                                    device, base=False)
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


def adapter_scores(run: Path, quantize: str, quantized_base: Path | None = None) -> dict:
    """Held-out scores of ``run``'s adapter over the base loaded with ``quantize`` (nearest rounding,
    or the 4-bit layers saved in ``quantized_base``)."""
    from lorakit.config import load_yaml, run_config_from_dict
    from lorakit.data.dataset import prepare_data
    from lorakit.core.lora_model import LoraModel
    from lorakit.base import cache_root, load_model
    from lorakit.training.evaluate import evaluate_adapter

    cfg = run_config_from_dict(load_yaml(run / "config.yaml"))
    base, tok = load_model(cfg.model.name, "cpu", "float32", quantize=quantize, quantized_base=quantized_base)
    lm = LoraModel.from_pretrained(base, run / "adapter").eval()
    prepared = prepare_data(cfg.data, tok, cfg.train.seed, cache_root() / "data")
    return evaluate_adapter(lm, tok, prepared, cfg.data.max_len, cfg.train.batch_size, cfg.train.eval_samples,
                            torch.device("cpu"), base=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/qlora-bench")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1], help="train.seed of each run (the demo's default is 42)")
    ap.add_argument("--variants", nargs="+", choices=list(RUNS)[1:], default=["nearest", "gptq", "eora", "gptq-eora"],
                    help="which QLoRA runs to train (LoRA is the reference and always runs); merging needs nearest")
    args = ap.parse_args()
    out = Path(args.out)
    model_flag = ["--model", args.model]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}", flush=True)

    chosen = {RUNS[v][0]: (v, RUNS[v][1]) for v in ["lora", *args.variants]}
    runs: dict[str, list[dict]] = {label: [] for label in chosen}
    for seed in args.seeds:
        for label, (variant, extra) in chosen.items():
            print(f"training: {label}, seed {seed} ...", flush=True)
            runs[label].append(run_train(out / f"{variant}-seed{seed}", model_flag + extra + ["--train.seed", str(seed)]))
            print(f"  {runs[label][-1]}", flush=True)

    stored, fp32, n = weight_memory(args.model)
    print(f"\nquantized linear weights: {n} layers, {stored:.1f} MiB vs {fp32:.1f} MiB fp32 = {stored / fp32:.3f}×")

    print("\n| run | seed | exact match before → after | eval loss before → after | tokens/s | peak RSS MiB | whole run s |")
    print("|---|---|---|---|---|---|---|")
    for label, rs in runs.items():
        for seed, r in zip(args.seeds, rs):
            b, a = r["base"], r["after"]
            print(f"| {label} | {seed} | {b['exact_match']:.1f}% → {a['exact_match']:.1f}% | {b['eval_loss']:.4f} → "
                  f"{a['eval_loss']:.4f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {r['wall_s']:.0f} |")

    def mean(label, key):
        return sum(key(r) for r in runs[label]) / len(runs[label])

    ref = "LoRA, fp32 base"
    for label in list(chosen)[1:]:
        print(f"{label} / LoRA over {len(args.seeds)} seed(s): eval loss "
              f"{mean(label, lambda r: r['after']['eval_loss']):.4f} / {mean(ref, lambda r: r['after']['eval_loss']):.4f} = "
              f"{mean(label, lambda r: r['after']['eval_loss']) / mean(ref, lambda r: r['after']['eval_loss']):.3f}×, "
              f"exact match {mean(label, lambda r: r['after']['exact_match']):.1f}% vs {mean(ref, lambda r: r['after']['exact_match']):.1f}%, "
              f"tokens/s {mean(label, lambda r: r['tokens_per_s']) / mean(ref, lambda r: r['tokens_per_s']):.2f}×, "
              f"peak RSS {mean(label, lambda r: r['peak_rss_mib']) / mean(ref, lambda r: r['peak_rss_mib']):.2f}×")

    if "gptq" in args.variants:
        gptq_adapter_elsewhere(out / f"gptq-seed{args.seeds[0]}")
    if "nearest" in args.variants:
        print("\nmerging the QLoRA adapter:", flush=True)
        results, err = merge_variants(out / f"nearest-seed{args.seeds[0]}")
        print("\n| QLoRA adapter evaluated | eval loss | exact match |")
        print("|---|---|---|")
        for label, s in results:
            print(f"| {label} | {s['eval_loss']:.4f} | {s.get('exact_match', 0):.1f}% |")
        print(f"\nre-quantization error: {100 * err['update_error']:.1f}% of the update's norm, "
              f"{100 * err['weight_error']:.2f}% of the merged weights' norm")


def gptq_adapter_elsewhere(gptq_run: Path) -> None:
    """The GPTQ run's adapter over the float base, a nearest-rounded base, and the base the run saved."""
    print("\nthe GPTQ-rounded run's adapter elsewhere:", flush=True)
    saved = gptq_run / "quantized_base.safetensors"
    print(f"saved 4-bit base: {saved.stat().st_size / 2**20:.1f} MiB")
    for label, quantize, stored in (("over the original fp32 base", "none", None),
                                    ("over a nearest-rounded NF4 base", "nf4", None),
                                    ("over the GPTQ base saved with the run (--quantize nf4 loads it)", "nf4", saved)):
        print(f"| {label} | " + " | ".join(f"{v:.4f}" for v in adapter_scores(gptq_run, quantize, stored).values()) + " |")


if __name__ == "__main__":
    main()
