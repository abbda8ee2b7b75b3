"""Where one lorakit training step spends its time, on SmolLM2-135M and the demo task: frozen
matmuls, LoRA matmuls, the head and loss, attention, norms/activations/rotary and other elementwise
work, dropout, the optimizer, casts and copies, and what no operator accounts for (Python and
framework overhead). Not a test: prints one table per setting.

    .venv/bin/python bench/profile_step.py [--steps 3] [--warmup 2] [--settings packed-bf16,packed-fp32,unpacked-bf16,unpacked-fp32] [--top N]

It runs the real ``lorakit train`` (``lorakit.training.loop.train``) under the malloc it uses
(restarting itself under mimalloc on Linux as ``lorakit train`` does; ``LORAKIT_ALLOCATOR=system``
keeps glibc's) and profiles whole optimizer steps after a warm-up with ``torch.profiler``: every
operator's own (self) time is charged to the innermost named region it runs in (the chunked loss,
attention, the optimizer, dropout) or else to its kind (a matmul is frozen, LoRA or head by its
shapes). "not in any operator" = wall time of the step minus the operators' self time. The matmul
rows also give their FLOP/s against a large-matmul peak measured in this process, in the precision
the run uses. Profiling adds some overhead of its own: the wall time per step is printed without
and with the profiler.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

SETTINGS = {  # name: (packed, precision, batch_size)
    "packed-bf16": (True, "bf16", 1),
    "packed-fp32": (True, "fp32", 1),
    "unpacked-bf16": (False, "bf16", 4),
    "unpacked-fp32": (False, "fp32", 4),
}
REGIONS = [("_LinearCrossEntropy", "head + loss"), ("linear_cross_entropy", "head + loss"),
           ("scaled_dot_product", "attention"), ("flash_attention", "attention"), ("Optimizer.", "optimizer"),
           ("dropout", "dropout"), ("bernoulli", "dropout")]
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm")
CASTS = ("aten::to", "aten::_to_copy", "aten::copy_", "aten::clone", "aten::contiguous", "aten::empty_strided")


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def _kind(name: str, shapes: list, r: int, vocab: int) -> str:
    if name in MATMULS:
        dims = {d for s in shapes if s for d in s}
        if vocab in dims:
            return "head + loss"
        return "LoRA matmuls" if dims & {r, 2 * r, 3 * r} else "frozen matmuls"
    if name in CASTS:
        return "casts and copies"
    if name.startswith("aten::"):
        return "norms, activations, rotary, other elementwise"
    return "other"


def _flops(shapes: list) -> float:
    """2·M·N·K of an mm/addmm from its input shapes (0 when they are not 2-D)."""
    mats = [s for s in shapes if s and len(s) == 2]
    if len(mats) >= 2:
        (m, k), (k2, n) = mats[-2], mats[-1]
        if k == k2:
            return 2.0 * m * n * k
    return 0.0


def charge(events, r: int, vocab: int, ops: dict | None = None) -> tuple[dict[str, float], dict[str, float], float]:
    """(seconds per category, matmul FLOPs per category, total self seconds) of profiler events;
    ``ops`` (when given) collects [seconds, calls] per (category, operator)."""
    seconds, flops, total = defaultdict(float), defaultdict(float), 0.0
    for ev in events:
        if ev.device_type.name != "CPU" or not ev.name.startswith("aten::"):
            continue
        region, parent = None, ev.cpu_parent
        while parent is not None and region is None:
            region = next((cat for key, cat in REGIONS if key in parent.name), None)
            parent = parent.cpu_parent
        own = next((cat for key, cat in REGIONS if key in ev.name), None)
        shapes = list(ev.input_shapes or [])
        cat = region or own or _kind(ev.name, shapes, r, vocab)
        s = ev.self_cpu_time_total / 1e6
        seconds[cat] += s
        total += s
        if ops is not None:
            slot = ops.setdefault((cat, ev.name), [0.0, 0])
            slot[0] += s
            slot[1] += 1
        if ev.name in MATMULS and cat in ("frozen matmuls", "LoRA matmuls", "head + loss"):
            flops[cat] += _flops(shapes)
    return seconds, flops, total


def profile_setting(name: str, steps: int, warmup: int, out_root: str, top: int = 0) -> None:
    import lorakit.training.loop as loop
    from lorakit.config import run_config_from_dict
    from lorakit.data.demo import DEMO_OVERRIDES
    from lorakit.config import merge_nested

    packed, precision, batch = SETTINGS[name]
    cfg = run_config_from_dict(merge_nested(merge_nested({}, DEMO_OVERRIDES), {
        "data": {"packing": packed, "max_len": 1024 if packed else 256, "val_size": 4},
        "train": {"out_dir": f"{out_root}/{name}", "max_steps": warmup + 2 * steps, "batch_size": batch, "warmup": 1,
                  "precision": precision, "eval_samples": 0, "plot": False, "overwrite": True, "log_every": 1000},
        "lora": {"dropout": 0.0}}))
    real_step, record = loop._optimizer_step, {"plain": [], "profiled": [], "events": [], "tokens": []}

    def step(run, group):
        i = run.progress.step
        t = time.perf_counter()
        if warmup + steps <= i < warmup + 2 * steps:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
                out = real_step(run, group)
            record["profiled"].append(time.perf_counter() - t)
            record["events"].append(prof.events())
            record["tokens"].append(sum(b.n_tokens for b in group))
            return out
        out = real_step(run, group)
        if i >= warmup:
            record["plain"].append(time.perf_counter() - t)
        return out

    loop._optimizer_step = step
    try:
        loop.train(cfg, show_progress=False, echo=lambda s: None)
    finally:
        loop._optimizer_step = real_step
    wall, tokens = sum(record["profiled"]), sum(record["tokens"])
    seconds, flops, in_ops, ops = defaultdict(float), defaultdict(float), 0.0, {}
    for events in record["events"]:
        s, f, t = charge(events, cfg.lora.r, 49152, ops)
        in_ops += t
        for k in s:
            seconds[k] += s[k]
        for k in f:
            flops[k] += f[k]
    seconds["not in any operator (Python, autograd, framework)"] = max(0.0, wall - in_ops)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak(dtype)
    plain = sum(record["plain"]) / max(1, len(record["plain"]))
    print(f"\n### {name}: {tokens // steps} tokens/step, {plain:.2f} s/step unprofiled "
          f"({tokens / steps / plain:.0f} tokens/s), {wall / steps:.2f} s profiled; {precision} matmul peak "
          f"{peak / 1e9:.0f} GFLOP/s")
    print("| part of the step | share | ms/step | matmul GFLOP/s (% of peak) |")
    print("|---|---|---|---|")
    for cat, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        rate = f"{flops[cat] / s / 1e9:.0f} ({100 * flops[cat] / s / peak:.0f}%)" if flops.get(cat) and s > 0 else ""
        print(f"| {cat} | {100 * s / wall:.1f}% | {1e3 * s / steps:.0f} | {rate} |")
    if top:
        print(f"\nTop {top} operators by self time (ms/step, calls/step):")
        for (cat, op), (s, n) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
            print(f"  {1e3 * s / steps:7.1f}  {n // steps:5d}  {op}  [{cat}]")


def main() -> None:
    # the allocator `lorakit train` runs under (mimalloc on Linux; LORAKIT_ALLOCATOR=system for glibc's)
    from lorakit.cli.allocator import allocator_in_use, restart_with_allocator, settle_restarted_process

    restart_with_allocator(sys.argv[1:], program=[os.path.abspath(__file__)])
    settle_restarted_process()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="profiled optimizer steps per setting")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", default="/tmp/lorakit-profile-runs")
    ap.add_argument("--top", type=int, default=0, help="also list the N operators with the most self time")
    args = ap.parse_args()
    os.environ.pop("LORAKIT_CPU_BF16", None)
    print(f"# SmolLM2-135M, demo data, r=16 all-linear, dropout 0; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, malloc: {allocator_in_use() or 'the C library'}")
    for name in args.settings.split(","):
        profile_setting(name.strip(), args.steps, args.warmup, args.out, args.top)


if __name__ == "__main__":
    main()
