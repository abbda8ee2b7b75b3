"""Data-parallel scaling on this machine: the same `lorakit train` on the demo task with 1 process
and with N processes (1 thread each, the same global batch), tokens/s side by side.

    .venv/bin/python bench/distributed_scaling.py [--nproc 2] [--steps 12]

The single process runs batch_size 2 with grad_accum N; the N-process run batch_size 2 with
grad_accum 1 on each rank, so both take the same rows per optimizer step (and end with the same
adapter, see tests/test_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path


def run(out: Path, nproc: int, accum: int, steps: int) -> float:
    args = ["train", "--out", str(out), "--overwrite", "--train.max_steps", str(steps), "--train.threads", "1",
            "--train.grad_accum", str(accum), "--train.eval_samples", "0", "--train.plot", "false"]
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lorakit"] \
        if nproc > 1 else [sys.executable, "-m", "lorakit"]
    done = subprocess.run(head + args, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"tokens_per_s"' in x]
    return rows[-1]["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="/tmp/dist-bench")
    args = ap.parse_args()
    one = run(Path(args.out) / "one", 1, args.nproc, args.steps)
    many = run(Path(args.out) / "many", args.nproc, 1, args.steps)
    print(f"# demo task, {args.steps} steps, {platform.machine()} {os.cpu_count()} cpus, 1 thread per process")
    print("| processes | tokens/s | speed-up |")
    print("|---|---|---|")
    print(f"| 1 | {one:.0f} | 1.00× |")
    print(f"| {args.nproc} | {many:.0f} | {many / one:.2f}× |")


if __name__ == "__main__":
    main()
