"""Forward+backward time of a LoRA-wrapped Linear relative to the frozen Linear alone,
lorakit vs PEFT, in one process, alternating. Not a test: prints a table of ratios.

    .venv/bin/python bench/layer_overhead.py [--tokens 4096] [--reps 30] [--markdown]

overhead = time(wrapped) / time(frozen base) - 1; lower is better. The frozen base still
computes dX (as inside a network), so both sides do the same base work.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn


def step(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> None:
    y = layer(x)
    y.backward(dy)


def timed(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> float:
    t = time.perf_counter()
    step(layer, x, dy)
    x.grad = None
    for p in layer.parameters():
        p.grad = None
    return time.perf_counter() - t


def bench_shape(d_in: int, d_out: int, tokens: int, r: int, dropout: float, reps: int) -> dict[str, float]:
    import peft

    import lorakit

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    # Both wrapped through their public API; the LoRA layer itself is then timed.
    ours = lorakit.get_lora_model(nn.Sequential(copy.deepcopy(base)),
                                  lorakit.LoraConfig(r=r, alpha=2 * r, dropout=dropout, target_modules=["0"])).model[0]
    theirs = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                                 peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=["0"])).base_model.model[0]
    for m in (ours, theirs):
        m.train()
    x = torch.randn(tokens, d_in, requires_grad=True)
    dy = torch.randn(tokens, d_out)
    layers = {"base": base, "lorakit": ours, "peft": theirs}
    for layer in layers.values():  # warm-up
        for _ in range(3):
            timed(layer, x, dy)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(reps):  # alternate so drift hits every side alike
        for name, layer in layers.items():
            times[name].append(timed(layer, x, dy))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"base_ms": med["base"] * 1e3, "lorakit_ms": med["lorakit"] * 1e3, "peft_ms": med["peft"] * 1e3,
            "lorakit_overhead": med["lorakit"] / med["base"] - 1, "peft_overhead": med["peft"] / med["base"] - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for d_in, d_out in ((1024, 1024), (576, 1536)):
        for dropout in (0.0, 0.05):
            res = bench_shape(d_in, d_out, args.tokens, args.rank, dropout, args.reps)
            rows.append((f"{d_in}→{d_out}", dropout, res))
    print(f"# {args.tokens} tokens, r={args.rank}, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| shape | dropout | base ms | lorakit ms | PEFT ms | lorakit overhead | PEFT overhead | lorakit/PEFT time |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, dropout, r in rows:
        print(f"| {shape} | {dropout} | {r['base_ms']:.2f} | {r['lorakit_ms']:.2f} | {r['peft_ms']:.2f} | "
              f"{r['lorakit_overhead']:+.1%} | {r['peft_overhead']:+.1%} | {r['lorakit_ms'] / r['peft_ms']:.3f} |")


if __name__ == "__main__":
    main()
