"""DoRA against LoRA, in lorakit and in PEFT + Trainer: what the magnitude vector costs, side by side.

    .venv/bin/python bench/dora.py [--steps 12] [--sets demo] [--out /tmp/bench-dora]

The same setting as bench/vs_peft_trainer.py (SmolLM2-135M-Instruct, r=16, α=32, all-linear, lr
2e-4, 4 examples per step, each run in its own process, peak RSS from wait4), for four runs:
PEFT + Trainer padding-free bf16 (its fastest CPU setting) with LoRA and with DoRA (`use_dora`),
and lorakit at its default precision with `--train.method lora` and `dora`. Prints tokens/s,
peak RSS and the held-out eval loss, DoRA's cost over LoRA within each tool, and lorakit's DoRA
against PEFT's.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

from vs_peft_trainer import run_worker, write_sets

KINDS = {
    "peft-padfree-bf16": "PEFT + Trainer padding-free bf16, LoRA",
    "peft-padfree-bf16-dora": "PEFT + Trainer padding-free bf16, DoRA",
    "lorakit": "lorakit (4 examples/step, default precision), LoRA",
    "lorakit-dora": "lorakit (4 examples/step, default precision), DoRA",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--sets", default="demo")
    ap.add_argument("--out", default="/tmp/bench-dora")
    args = ap.parse_args()
    out = Path(args.out)
    paths = write_sets(out)
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, {args.steps} steps, batch 4, CPU", flush=True)
    lines = ["| data | run | tokens/s | peak RSS MiB | held-out eval loss |", "|---|---|---|---|---|"]
    for name in args.sets.split(","):
        max_len = 256 if name == "demo" else 1024
        r = {}
        for kind, label in KINDS.items():
            r[kind] = run_worker(kind, paths[name], args.steps, max_len, out / f"{name}-{kind}")
            print(f"{name} {kind}: {r[kind]}", flush=True)
            lines.append(f"| {name} | {label} | {r[kind]['tokens_per_s']:.0f} | {r[kind]['peak_rss_mib']:.0f} | "
                         f"{r[kind]['eval_loss']:.4f} |")
        for tool, lora, dora in (("PEFT", "peft-padfree-bf16", "peft-padfree-bf16-dora"), ("lorakit", "lorakit", "lorakit-dora")):
            print(f"{name}: {tool} DoRA/LoRA tokens/s {r[dora]['tokens_per_s'] / r[lora]['tokens_per_s']:.2f}x, "
                  f"peak RSS {r[dora]['peak_rss_mib'] / r[lora]['peak_rss_mib']:.2f}x")
        print(f"{name}: lorakit DoRA / PEFT DoRA tokens/s "
              f"{r['lorakit-dora']['tokens_per_s'] / r['peft-padfree-bf16-dora']['tokens_per_s']:.2f}x, peak RSS "
              f"{r['lorakit-dora']['peak_rss_mib'] / r['peft-padfree-bf16-dora']['peak_rss_mib']:.2f}x")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
