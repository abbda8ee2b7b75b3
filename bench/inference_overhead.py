"""Inference cost of an adapter on SmolLM2-135M-Instruct: the base model, lorakit merged,
lorakit unmerged and PEFT unmerged, in one process, alternating. Not a test: prints a table.

    .venv/bin/python bench/inference_overhead.py [--reps 7]

Two workloads, fp32 on CPU, no gradients: a prefill (forward of 4 × 256 tokens) and greedy
decoding (4 prompts of 32 tokens, 32 new tokens each, KV cache on). The adapter is r=16, α=32
on every linear layer with random non-zero B, so the unmerged paths do their full work.
Median of --reps alternating repetitions; the ratio column is time / base time.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch


def build(model_name: str):
    import peft

    import lorakit
    from lorakit.base import load_model

    loaded, tok = load_model(model_name, "cpu", "float32")
    base = copy.deepcopy(loaded).eval()  # every model owns its memory (the loaded one maps the file)
    del loaded
    torch.manual_seed(0)
    ours = lorakit.get_lora_model(copy.deepcopy(base), lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    for name, p in ours.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    # the same adapter in PEFT: copy lorakit's factors by their (shared) PEFT names
    ours_sd = {k: v for k, v in ours.model.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for k, v in theirs.base_model.model.state_dict().items():
            if "lora_" in k:
                v.copy_(ours_sd[k.removesuffix(".weight")])
    merged = copy.deepcopy(ours).merge_and_unload()
    models = {"base": base, "lorakit merged": merged, "lorakit unmerged": ours.model.eval(), "PEFT unmerged": theirs.eval()}
    return models, tok


def prefill(model, ids):
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)


def decode(model, ids, pad_id):
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                       do_sample=False, pad_token_id=pad_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    models, tok = build(args.model)
    gen = torch.Generator().manual_seed(0)
    long_ids = torch.randint(100, 40000, (4, 256), generator=gen)
    short_ids = torch.randint(100, 40000, (4, 32), generator=gen)
    with torch.no_grad():  # the adapter really changes the output
        diff = (models["lorakit unmerged"](long_ids[:1]).logits - models["base"](long_ids[:1]).logits).abs().max()
        same = (models["lorakit merged"](long_ids[:1]).logits - models["PEFT unmerged"](long_ids[:1]).logits).abs().max()
    works = {"prefill 4×256": lambda m: prefill(m, long_ids), "decode 4×32 new": lambda m: decode(m, short_ids, tok.pad_token_id)}
    print(f"# SmolLM2-135M, r=16 all-linear, fp32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; adapter changes logits by up to {diff:.3f}; merged vs PEFT max diff {same:.2e}")
    print("| workload | model | ms (median) | vs base |")
    print("|---|---|---|---|")
    for wname, work in works.items():
        for m in models.values():
            work(m)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.reps):
            for name, m in models.items():
                t = time.perf_counter()
                work(m)
                times[name].append(time.perf_counter() - t)
        base = statistics.median(times["base"])
        for name in models:
            med = statistics.median(times[name])
            print(f"| {wname} | {name} | {med * 1e3:.1f} | {med / base:.3f}× |", flush=True)


if __name__ == "__main__":
    main()
