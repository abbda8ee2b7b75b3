"""Progressive rank against fixed ranks on the built-in demo task, at equal steps.

    .venv/bin/python bench/rank_schedule.py [--out /tmp/rank-bench] [--steps 60]

Three `lorakit train` runs with the demo's settings, each in its own process: fixed r=2 (α=4),
fixed r=16 (α=32), and progressive 2→8→16 (α=32 at the end, the same s = α/r = 2 throughout;
ranks change at 1/3 and 2/3 of the steps). Prints held-out eval loss and exact match, training
and whole-run time, tokens/s, and the saved adapter's size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def run(out: Path, flags: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--out", str(out), "--overwrite", "--train.plot", "false", *flags]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in rows if r.get("model") == "adapter"][-1]
    speed = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]
    summary = next(line for line in done.stdout.splitlines() if line.startswith("steps:"))
    size = (out / "adapter" / "adapter_model.safetensors").stat().st_size
    return {"eval_loss": after["eval_loss"], "exact_match": after.get("exact_match", 0.0), "tokens_per_s": speed,
            "summary": summary.strip(), "adapter_mib": size / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/tmp/rank-bench")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    s = args.steps
    runs = {
        "fixed r=2": ["--lora.r", "2", "--lora.alpha", "4"],
        "fixed r=16": ["--lora.r", "16", "--lora.alpha", "32"],
        "progressive 2→8→16": ["--lora.r", "16", "--lora.alpha", "32", "--train.rank_schedule", f"2@0,8@{s // 3},16@{2 * s // 3}"],
    }
    print(f"# demo task, {s} steps, {platform.machine()} {os.cpu_count()} cpus", flush=True)
    results = {}
    for label, flags in runs.items():
        results[label] = run(Path(args.out) / label.split()[0] / label.split()[-1].replace("→", "-"),
                             ["--train.max_steps", str(s), *flags])
        print(f"{label}: {results[label]}", flush=True)
    print("\n| run | eval loss | exact match | tokens/s | adapter MiB | time (from the run's summary) |")
    print("|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['eval_loss']:.6f} | {r['exact_match']:.1f}% | {r['tokens_per_s']:.0f} | "
              f"{r['adapter_mib']:.2f} | {r['summary'].split('training:')[1].strip()} |")


if __name__ == "__main__":
    main()
