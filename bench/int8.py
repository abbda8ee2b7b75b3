"""Int8 inference on CPU (``--int8``) against the float merged model it comes from and the two
int8 recipes of the field, on the demo adapter. Not a test: prints tables.

    .venv/bin/python bench/int8.py [--adapter runs/demo/adapter] [--reps 5]

Variants, each built from the same float32 merged model (base + adapter):
  float32 merged             the reference
  lorakit int8               lorakit.quant.int8 on every linear layer, the head included
  lorakit int8, float head   the head left in float32
  torch.ao quantize_dynamic  the seeds' recipe (deprecated since torch 2.10; still in 2.13)
  torchao int8 dyn/int8      torchao's Int8DynamicActivationInt8WeightConfig (if torchao is installed)

Speed, in one process, alternating variants, median of --reps (spread: min-max): prefill of one
512-token prompt, greedy decoding of 64 new tokens for 1 and for 8 prompts (lorakit's decode loop,
KV cache on, no early stop). Memory: the weights' bytes, and each variant's resident memory in a
process of its own (after loading, converting and answering 8 prompts; Linux). Accuracy: greedy answers on the demo's 48
held-out prompts, exact match against the references and agreement with the float model's answers.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings

import torch

VARIANTS = ["float32 merged", "lorakit int8", "lorakit int8, float head", "torch.ao quantize_dynamic", "torchao int8 dyn/int8"]


def merged_model(adapter: str):
    from lorakit import LoraModel
    from lorakit.base import load_model

    base, tok = load_model("smollm2-135m", "cpu", "float32")
    model = copy.deepcopy(LoraModel.from_pretrained(base, adapter).merge_and_unload()).eval()  # own memory, not the mapped file
    return model, tok


def convert(variant: str, model):
    """The variant built from ``model`` (which it may consume), or None where its library is missing."""
    warnings.filterwarnings("ignore")
    if variant == "float32 merged":
        return model
    if variant.startswith("lorakit int8"):
        from lorakit.quant.int8 import quantize_int8

        quantize_int8(model, head=variant == "lorakit int8")
        return model
    if variant == "torch.ao quantize_dynamic":
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    try:
        import logging

        logging.disable(logging.WARNING)  # torchao logs about its CUDA kernels on import
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return model


def weight_bytes(model) -> int:
    """Bytes of the distinct tensors the model holds (a tied embedding counted once; packed
    torch.ao weights counted by their int8 payload and scales)."""
    seen, total = set(), 0

    def leaves(t):  # a tensor subclass (torchao) holds its payload in inner tensors
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            for name in t.__tensor_flatten__()[0]:
                yield from leaves(getattr(t, name))
        else:
            yield t

    for p in list(model.parameters()) + list(model.buffers()):
        for t in leaves(p.data):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    for m in model.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() + 4 * w.shape[0] + (b.numel() * 4 if b is not None else 0)
    return total


def answers(model, tok, examples, batch: int = 16) -> list[str]:
    from lorakit.data.templates import generation_prompt, resolve_template
    from lorakit.inference.generation import Request, Sampling, generate_batch

    template = resolve_template("auto", tok)
    out = []
    for i in range(0, len(examples), batch):
        group = examples[i:i + batch]
        reqs = [Request(tok(generation_prompt(ex["messages"][:-1], template, tok), add_special_tokens=False)["input_ids"],
                        None, Sampling(max_new_tokens=24)) for ex in group]
        out += [o.text for o in generate_batch(model, tok, reqs)]
    return out


def decode(model, tok, prompts: list[list[int]], new: int = 64) -> None:
    from lorakit.inference.generation import Request, Sampling, generate_batch

    generate_batch(model, tok, [Request(p, None, Sampling(max_new_tokens=new)) for p in prompts], eos_ids=[])


def rss_of(variant: str, adapter: str) -> float | None:
    """RSS (MiB) of a process that loaded and converted ``variant``, then answered 8 prompts."""
    proc = subprocess.run([sys.executable, __file__, "--adapter", adapter, "--rss-only", variant],
                          capture_output=True, text=True)
    return float(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def _rss_only(variant: str, adapter: str) -> None:
    from lorakit.data.demo import demo_examples

    model, tok = merged_model(adapter)
    model = convert(variant, model)
    if model is None:
        sys.exit(1)
    from lorakit.quant.bnb import release_freed_memory

    release_freed_memory()  # the float weights a conversion replaced go back to the OS
    with torch.no_grad():
        answers(model, tok, demo_examples()[1][:8])
    with open("/proc/self/status") as f:
        print(next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default="runs/demo/adapter")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rss-only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_only:
        return _rss_only(args.rss_only, args.adapter)
    from lorakit.data.demo import demo_examples, score

    ref, tok = merged_model(args.adapter)
    models = {v: convert(v, copy.deepcopy(ref)) for v in VARIANTS}
    models = {k: m for k, m in models.items() if m is not None}
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, 40000, (1, 512), generator=gen)
    short = [torch.randint(100, 40000, (40,), generator=gen).tolist() for _ in range(8)]
    works = {"prefill 1×512": lambda m: m(input_ids=long_ids, use_cache=False, logits_to_keep=1),
             "decode 1×64 new": lambda m: decode(m, tok, short[:1]),
             "decode 8×64 new": lambda m: decode(m, tok, short)}
    tokens = {"prefill 1×512": 512, "decode 1×64 new": 64, "decode 8×64 new": 8 * 64}
    print(f"# SmolLM2-135M + {args.adapter} merged, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}")
    print("| workload | variant | tokens/s (median) | spread | vs float32 |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for wname, work in works.items():
            for m in models.values():
                work(m)  # warm-up
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(args.reps):
                for name, m in models.items():
                    t = time.perf_counter()
                    work(m)
                    times[name].append(time.perf_counter() - t)
            rate = {k: tokens[wname] / statistics.median(v) for k, v in times.items()}
            for name, v in times.items():
                lo, hi = tokens[wname] / max(v), tokens[wname] / min(v)
                print(f"| {wname} | {name} | {rate[name]:.0f} | {lo:.0f}–{hi:.0f} | {rate[name] / rate['float32 merged']:.2f}× |",
                      flush=True)
        held = demo_examples()[1]
        refs = [ex["messages"][-1]["content"] for ex in held]
        got = {k: answers(m, tok, held) for k, m in models.items()}
    print(f"\n| variant | weights (MiB) | RSS (MiB) | exact match ({len(held)} held-out) | same answer as float32 |")
    print("|---|---|---|---|---|")
    for name, m in models.items():
        em = sum(score(a, r) for a, r in zip(got[name], refs))
        same = sum(a == b for a, b in zip(got[name], got["float32 merged"]))
        rss = rss_of(name, args.adapter)
        print(f"| {name} | {weight_bytes(m) / 2**20:.0f} | {rss:.0f} | {em}/{len(held)} | {same}/{len(held)} |", flush=True)
    diffs = [(r, a, b) for r, a, b in zip(refs, got["float32 merged"], got["lorakit int8"]) if a != b]
    if diffs:
        print("\nlorakit int8 answers that differ from float32 (reference | float32 | int8):")
        for r, a, b in diffs:
            print(" ", json.dumps([r, a, b], ensure_ascii=False))


if __name__ == "__main__":
    main()
