"""Memory of a streamed run (data.streaming) against the same run reading its data into memory,
on a generated 1M-row JSONL file: the resident set size of each `lorakit train` process sampled
every second, printed as a time series and a summary. A tiny Llama (SmolLM2's tokenizer) keeps
the model's share of memory small, so what grows is the data's.

    .venv/bin/python bench/stream_memory.py                       # 1M rows, 400 steps each
    .venv/bin/python bench/stream_memory.py --rows 100000 --steps 100
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu import make_model  # noqa: E402  (bench/gpu.py: a random Llama with the embedded tokenizer)

WORDS = ("date", "convert", "normalize", "answer", "format", "write", "explain", "list", "the", "a", "of", "to",
         "March", "April", "river", "mountain", "number", "color", "house", "garden", "city", "music")


def write_rows(path: Path, n: int) -> None:
    """``n`` alpaca rows of 4-60 words each (seeded), unless the file is already there."""
    if path.is_file() and sum(1 for _ in path.open()) == n:
        return
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))  # noqa: E731
            f.write(json.dumps({"instruction": f"{i}: " + words(rng.randint(3, 30)), "output": words(rng.randint(1, 30))})
                    + "\n")


def run(model: Path, data: Path, out: Path, steps: int, streaming: bool) -> dict:
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", str(model), "--data", str(data), "--out", str(out),
           "--overwrite", "--data.max_len", "256", "--train.batch_size", "16", "--train.max_steps", str(steps),
           "--data.val_size", "64", "--train.eval_samples", "0", "--train.plot", "false", "--train.log_every", "50",
           "--data.cache", "false", "--data.streaming", str(streaming).lower()]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps, samples = psutil.Process(proc.pid), []
    while proc.poll() is None:
        try:
            samples.append((time.perf_counter() - start, ps.memory_info().rss / 2**20))
        except psutil.NoSuchProcess:
            break
        time.sleep(1.0)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"lorakit train failed:\n{stderr[-3000:]}")
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = max(m.get("tokens", 0) for m in metrics)
    return {"samples": samples, "wall_s": time.perf_counter() - start, "tokens": tokens,
            "peak_mib": max(r for _, r in samples) if samples else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--work", default="/tmp/lorakit-stream-bench")
    ap.add_argument("--only", choices=["stream", "memory"], default=None)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"rows-{args.rows}.jsonl"
    write_rows(data, args.rows)
    make_model(work / "tiny", "tiny")
    print(f"data: {data} ({args.rows:,} rows, {data.stat().st_size / 2**20:.0f} MiB); {args.steps} steps of 16 x 256 tokens")
    results = {}
    for name in ("stream", "memory"):
        if args.only in (None, name):
            results[name] = run(work / "tiny", data, work / f"run-{name}", args.steps, name == "stream")
    for name, r in results.items():
        series = r["samples"][::max(1, len(r["samples"]) // 12)]
        print(f"\n{name}: whole run {r['wall_s']:.0f} s, {r['tokens']:,} tokens trained, peak RSS {r['peak_mib']:.0f} MiB")
        print("  RSS over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in series) + " (MiB)")
    if len(results) == 2:
        print(f"\npeak RSS streamed / in memory: {results['stream']['peak_mib'] / results['memory']['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
