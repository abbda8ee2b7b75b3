"""Command-line verbs that plan a run before it starts: estimate (memory) and recommend (a config)."""

from __future__ import annotations

import argparse
import json

__all__ = ["PLAN_COMMANDS"]

# What the process holds before any model exists (interpreter, torch, transformers): measured RSS
# after `import lorakit.train` on CPU; on CUDA the context and kernels lorakit loads, typical value.
OVERHEAD_BYTES = {"cpu": 420 * 2**20, "cuda": 600 * 2**20}


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
        return value
    return parse


def _add_estimate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="folder, .gguf, hub id or 'smollm2-135m'; only its config is read")
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora"])
    p.add_argument("--r", type=_positive(int), default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="all-linear", help="comma-separated projection names, or all-linear (default)")
    p.add_argument("--batch", type=_positive(int), default=4, help="rows per micro-batch (default 4)")
    p.add_argument("--seq", type=_positive(int), default=1024, help="tokens per row (default 1024)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights/activations dtype (auto: what train picks — bf16 on CUDA and on CPUs with native bf16, else fp32)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "sgd"])
    p.add_argument("--no-double-quant", action="store_true", help="qlora: 4.5 bits per weight instead of 4.127")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="which framework overhead to add")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="e.g. 24GB: say whether it fits, and the largest batch/seq")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")


def _device_kind(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _auto_dtype(kind: str, method: str = "lora") -> str:
    """The dtype `lorakit train` would pick (planning for CUDA from any machine assumes bf16)."""
    if kind == "cuda":
        return "bf16"
    import torch

    from .models import resolve_precision

    return resolve_precision("auto", torch.device("cpu"), "nf4" if method == "qlora" else "none")


def _cmd_estimate(args: argparse.Namespace) -> int:
    from .estimate import estimate_memory, format_estimate, load_model_config, parse_size, shape_from_config

    memory = parse_size(args.device_memory) if args.device_memory else None
    kind = _device_kind(args.device)
    dtype = args.dtype if args.dtype != "auto" else _auto_dtype(kind, args.method)
    targets = "all-linear" if args.targets == "all-linear" else [t.strip() for t in args.targets.split(",") if t.strip()]
    shape = shape_from_config(load_model_config(args.model))
    est = estimate_memory(shape, args.method, args.r, targets, args.batch, args.seq, args.grad_ckpt, dtype,
                          args.optimizer, not args.no_double_quant, overhead_bytes=OVERHEAD_BYTES[kind],
                          device_memory=memory)
    if args.json:
        print(json.dumps({"model": args.model, **est.to_dict()}, indent=2))
    else:
        print(f"{args.model} ({shape.model_type}, {shape.total_params / 1e6:.1f}M parameters, {shape.layers} layers)")
        print(format_estimate(est))
        if kind == "cpu":
            print("\nnote: this is the peak of live tensors. On CPU, glibc's allocator keeps freed activations, and "
                  "peak RSS measured 1.1-2.3x this estimate (docs/benchmarks.md); MALLOC_MMAP_THRESHOLD_=65536 "
                  "brings it down to the estimate at a 20-45% speed cost.")
    return 0


def _add_recommend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="training data file(s) or folder(s)")
    p.add_argument("--model", default="smollm2-135m", help="base model (its tokenizer measures the data; default smollm2-135m)")
    p.add_argument("--format", default="auto", help="auto | alpaca | sharegpt | messages | text")
    p.add_argument("--template", default="auto", help="auto | tokenizer | chatml | human-assistant")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory to fit in, e.g. 8GB (default: the GPU's, else this machine's RAM)")
    p.add_argument("--out", default="recommended.yaml", help="YAML written for lorakit train --config (default recommended.yaml)")
    p.add_argument("--run-dir", default="runs/recommended", help="train.out_dir written into the YAML")
    p.add_argument("--sample", type=int, default=20_000, metavar="N",
                   help="tokenize at most N examples (a seeded random sample) for the lengths; 0 = all (default 20000)")


def _cmd_recommend(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .atomic import atomic_file
    from .config import DataConfig, dump_yaml
    from .estimate import load_model_config, parse_size, shape_from_config
    from .models import load_tokenizer
    from .recommend import default_memory, format_recommendation, profile_data, recommend

    data = DataConfig(path=args.data if len(args.data) > 1 else args.data[0], format=args.format, template=args.template)
    memory, source = (parse_size(args.device_memory), "--device-memory") if args.device_memory else default_memory()
    model_cfg = load_model_config(args.model)
    shape = shape_from_config(model_cfg)
    profile = profile_data(data, load_tokenizer(args.model), args.sample)
    rec = recommend(profile, shape, args.model, data, memory, source,
                    getattr(model_cfg, "max_position_embeddings", None), args.run_dir,
                    dtype=_auto_dtype(_device_kind("auto")))
    cfg = rec.run_config()  # the YAML must load as it is written
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        tmp.write_text("# written by lorakit recommend; train with: lorakit train --config " + str(out) + "\n"
                       + dump_yaml(cfg))
    print(format_recommendation(rec, profile))
    print(f"\nwrote {out}; train with: lorakit train --config {out}")
    return 0


PLAN_COMMANDS = {
    "estimate": ("Estimate the memory of a training run from the model's config (no weights loaded).",
                 _add_estimate, _cmd_estimate),
    "recommend": ("Measure a dataset and propose a training config (rank, targets, max_len, batch, QLoRA), with reasons.",
                  _add_recommend, _cmd_recommend),
}
