"""Serving many adapters at once: tokens/s for concurrent requests over several adapters,
three ways, in one process on the same base model:

- mixed: all requests in one batch, each row routed to its own adapter (what lorakit serve does);
- merged: the same requests on one model with an adapter merged in (the ceiling: no adapter cost);
- one at a time: switch adapter, answer one request, next (a naive PEFT server, LLaMA-Factory).

    .venv/bin/python bench/serve_mixed.py [--requests 16] [--adapters 4] [--new-tokens 32] [--model smollm2-135m]

Every request generates exactly --new-tokens tokens (EOS ignored) so the work is equal.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from lorakit import LoraConfig, LoraModel, get_lora_model
from lorakit.inference.generation import Request, Sampling, generate_batch
from lorakit.base import load_model

QUESTIONS = ["Normalize this date to YYYY-MM-DD: March 5, 2021", "Who are you?", "Write a haiku about rivers.",
             "What is the capital of France?", "Explain LoRA in one sentence.", "List three fruits.",
             "Translate 'good morning' to French.", "What is 17 times 3?"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    model, tok = load_model(args.model)
    model.eval()
    names = [f"a{i}" for i in range(args.adapters)]
    lm: LoraModel = get_lora_model(model, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"), names[0])
    for n in names[1:]:
        lm.add_adapter(n, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking adapters: small random B so every adapter changes the output
        for name, p in lm.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    lm.eval()
    s = Sampling(max_new_tokens=args.new_tokens)
    prompts = [tok.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                       tokenize=False, add_generation_prompt=True) for i in range(args.requests)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rows = [names[i % len(names)] for i in range(args.requests)]
    total = args.requests * args.new_tokens

    def mixed():
        generate_batch(model, tok, [Request(i, a, s) for i, a in zip(ids, rows)], lm, eos_ids=[])

    def one_at_a_time():
        for i, a in zip(ids, rows):
            lm.set_adapter(a)
            generate_batch(model, tok, [Request(i, None, s)], None, eos_ids=[])

    # The ceiling: one plain model with adapter a0 merged in, no adapter code at all.
    plain, _ = load_model(args.model)
    plain.eval()
    ceiling = LoraModel(plain)
    ceiling.add_adapter(names[0], lm.configs[names[0]])
    target = dict(ceiling.named_parameters())
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith((f".lora_A.{names[0]}", f".lora_B.{names[0]}")):
                target[name].copy_(p)
    plain = ceiling.merge_and_unload()

    def merged():
        generate_batch(plain, tok, [Request(i, None, s) for i in ids], None, eos_ids=[])

    times: dict[str, list[float]] = {"mixed": [], "merged": [], "one at a time": []}
    for _ in range(args.repeats):  # alternate so machine drift hits every way alike
        for way, fn in (("mixed", mixed), ("merged", merged), ("one at a time", one_at_a_time)):
            t = time.perf_counter()
            fn()
            times[way].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    tps = {k: total / v for k, v in best.items()}
    print(f"# {args.requests} requests × {args.new_tokens} new tokens over {args.adapters} adapters (r={args.rank}, all-linear), "
          f"{args.model}, {next(model.parameters()).device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}; best of {args.repeats}")
    print("| way | seconds | tokens/s | vs merged | mixed vs this |")
    print("|---|---|---|---|---|")
    for k in ("mixed", "merged", "one at a time"):
        print(f"| {k} | {best[k]:.2f} | {tps[k]:.1f} | {tps[k] / tps['merged']:.2f}× | {tps['mixed'] / tps[k]:.2f}× |")


if __name__ == "__main__":
    main()
