"""A trained demo run's exports in a real llama.cpp against lorakit's own greedy answers, on the
demo's held-out prompts. Not a test (tests/test_demo_e2e.py runs the same check on a 16-step
adapter): prints how many answers match, and for each mismatch lorakit's top-2 logit margin at
the first token that differs.

    .venv/bin/python bench/llama_cpp_agreement.py [RUN] [--n 48]

Needs node-llama-cpp (``scripts/setup test`` installs it into tests/llama_cpp).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="runs/demo")
    ap.add_argument("--n", type=int, default=48, help="held-out prompts")
    args = ap.parse_args()
    from llama_cpp_runtime import available, run_llama_cpp

    if not available():
        sys.exit("node-llama-cpp is not installed: scripts/setup test")
    from lorakit import LoraModel
    from lorakit.base import load_model
    from lorakit.base.source import resolve_source
    from lorakit.data.demo import demo_examples
    from lorakit.data.templates import generation_prompt
    from lorakit.export import export
    from lorakit.training.evaluate import generate_answers

    base, tok = load_model("smollm2-135m", "cpu", "float32")
    lm = LoraModel.from_pretrained(base, Path(args.run) / "adapter").eval()
    chats = [ex["messages"][:-1] for ex in demo_examples(n_val=args.n)[1]]
    ours = [a.strip() for a in generate_answers(lm.model, tok, chats, "tokenizer", max_new_tokens=24)]
    prompts = [tok(generation_prompt(c, "tokenizer", tok), add_special_tokens=False)["input_ids"] for c in chats]
    src = resolve_source("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        lora = export(args.run, "gguf-lora", Path(tmp) / "lora.gguf").path
        cases = [("embedded Q4_1 base + LoRA GGUF", Path(src.path) / src.gguf_file, lora)]
        for dtype in ("f16", "q8_0"):
            cases.append((f"merged {dtype} GGUF", export(args.run, "gguf", Path(tmp) / f"{dtype}.gguf", dtype=dtype).path, None))
        print(f"# {args.run}: {len(chats)} held-out prompts, greedy, 24 new tokens at most")
        print("| llama.cpp runs | answers equal to lorakit's | seconds |")
        print("|---|---|---|")
        notes = []
        for label, model, adapter in cases:
            t = time.perf_counter()
            got = run_llama_cpp(model, prompts, 24, lora=adapter)["answers"]
            seconds = time.perf_counter() - t
            theirs = [tok.decode(a, skip_special_tokens=True).strip() for a in got]
            misses = [i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b]
            print(f"| {label} | {len(ours) - len(misses)}/{len(ours)} | {seconds:.1f} |", flush=True)
            for i in misses:
                mine = tok(ours[i], add_special_tokens=False)["input_ids"]
                k = next((j for j in range(min(len(mine), len(got[i]))) if mine[j] != got[i][j]), None)
                margin = float("nan")
                if k is not None:
                    with torch.no_grad():
                        logits = lm.model(torch.tensor([prompts[i] + mine[:k]])).logits[0, -1]
                    margin = float(logits[mine[k]] - logits[got[i][k]])
                notes.append(f"{label}: {chats[i][-1]['content']!r}: lorakit {ours[i]!r}, llama.cpp {theirs[i]!r}, "
                             f"lorakit's logit margin {margin:.3f}")
    for line in notes:
        print(" ", line)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
