"""Command-line verbs that plan a run before it starts: estimate (memory) and recommend (a config)."""

from __future__ import annotations

import argparse
import json

__all__ = ["PLAN_COMMANDS"]


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
    from .flags import add_run_flags

    # The run flags of `lorakit train` (same names, same config layers): estimate the run they describe.
    add_run_flags(p)
    p.add_argument("--method", default=None, choices=["lora", "dora", "qlora", "full", "freeze"],
                   help="= --train.method (qlora: lora with --quantize nf4)")
    p.add_argument("--device-memory", default=None, metavar="SIZE", help="e.g. 24GB: say whether it fits, and the largest batch/seq")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    # Old spellings, kept for one release (each says its new name when used).
    for old, kind in (("--r", _positive(int)), ("--batch", _positive(int)), ("--seq", _positive(int)), ("--targets", str)):
        p.add_argument(old, dest=f"old:{old}", type=kind, default=None, help=argparse.SUPPRESS)
    p.add_argument("--grad-ckpt", dest="old:--grad-ckpt", action="store_true", default=None, help=argparse.SUPPRESS)


_OLD = {"--r": ("lora", "r", "--lora.r"), "--batch": ("train", "batch_size", "--train.batch_size"),
        "--seq": ("data", "max_len", "--data.max_len"), "--targets": ("lora", "target_modules", "--lora.target_modules"),
        "--grad-ckpt": ("train", "grad_checkpointing", "--train.grad_checkpointing true")}
_OLD_DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}  # estimate's old --dtype: the training precision


def _estimate_config(args: argparse.Namespace):
    """The RunConfig `lorakit train` would build from these flags (no demo settings), with the
    old estimate spellings moved to their names; and the optimizer to assume."""
    from .flags import deprecated, run_config

    extra: dict = {}
    for old, (section, key, new) in _OLD.items():
        value = getattr(args, f"old:{old}", None)
        if value is not None:
            deprecated(old, new)
            if old == "--targets":
                value = value if value == "all-linear" else [t.strip() for t in value.split(",") if t.strip()]
            extra.setdefault(section, {})[key] = value
    dtype = getattr(args, "short:model.dtype", None)
    if dtype in _OLD_DTYPES:  # --dtype fp32 meant the precision; --dtype float32 is the weights' dtype, as in train
        deprecated(f"--dtype {dtype}", f"--train.precision {dtype}")
        setattr(args, "short:model.dtype", None)
        extra.setdefault("train", {})["precision"] = _OLD_DTYPES[dtype]
    optimizer = getattr(args, "short:train.optimizer", None)
    if optimizer == "sgd":  # a what-if only estimate knows (train has no SGD)
        setattr(args, "short:train.optimizer", None)
    if args.method == "qlora" and getattr(args, "short:model.quantize", None) is None:
        extra.setdefault("model", {})["quantize"] = "nf4"
    if args.method not in (None, "qlora"):
        extra.setdefault("train", {})["method"] = args.method
    cfg, _ = run_config(args, demo=False, extra=extra)
    return cfg, optimizer or cfg.train.optimizer


def _cmd_estimate(args: argparse.Namespace) -> int:
    from ..base import load_model_config
    from ..errors import LorakitError
    from ..planning.estimate import format_estimate, parse_size, shape_from_config
    from ..planning.fit import device_kind, planned_estimate

    cfg, optimizer = _estimate_config(args)
    if cfg.model.quantize == "int8":
        raise LorakitError("estimate models 4-bit bases (--quantize nf4 or fp4); int8 is not estimated yet")
    memory = parse_size(args.device_memory) if args.device_memory else None
    kind = device_kind(cfg.model.device)
    shape = shape_from_config(load_model_config(cfg.model.name))
    est = planned_estimate(shape, cfg, device_memory=memory, optimizer=optimizer)
    if args.json:
        print(json.dumps({"model": cfg.model.name, **est.to_dict()}, indent=2))
        return 0
    print(f"{cfg.model.name} ({shape.model_type}, {shape.total_params / 1e6:.1f}M parameters, {shape.layers} layers)")
    print(format_estimate(est))
    if cfg.train.objective != "sft":
        print(f"\ntrain.objective {cfg.train.objective}: a pair's chosen and rejected answers share the step's tokens "
              "(one packed row, or two padded rows)"
              + ("; the reference is the base with the adapter switched off: no second copy of the model, and its "
                 "forward runs without gradients (no activations kept): +0 MiB" if cfg.train.objective == "dpo"
                 else "; no reference model"))
    if kind == "cpu":
        print("\nnote: this is the peak of live tensors. lorakit train runs under mimalloc on Linux, where peak RSS "
              "measured 1.04-1.15x this estimate in fp32 and 1.16-1.21x in bf16 (SmolLM2-135M, 837 and 4,096 tokens a step); "
              "under glibc's malloc "
              "(LORAKIT_ALLOCATOR=system), which keeps freed activations, 1.1-2.3x (docs/training.md).")
    return 0


def _add_recommend(p: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_MODEL

    p.add_argument("--data", required=True, nargs="+", metavar="FILE", help="training data file(s) or folder(s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (its tokenizer measures the data; default {DEFAULT_MODEL})")
    p.add_argument("--format", default="auto", help="auto | alpaca | sharegpt | messages | text")
    p.add_argument("--template", default="auto", help="auto | tokenizer | chatml | human-assistant")
    p.add_argument("--device-memory", default=None, metavar="SIZE",
                   help="memory to fit in, e.g. 8GB (default: the GPU's, else this machine's RAM)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="the YAML to write, for lorakit train --config FILE (default recommended.yaml)")
    p.add_argument("--out", default=None, metavar="DIR", help="the run folder it trains into, as train's --out "
                   "(default runs/recommended)")
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)  # the old name of --out
    p.add_argument("--sample", type=int, default=20_000, metavar="N",
                   help="tokenize at most N examples (a seeded random sample) for the lengths; 0 = all (default 20000)")


def _recommend_paths(args: argparse.Namespace) -> tuple[str, str]:
    """(YAML file, run folder). The old spellings: --out FILE.yaml for the YAML, --run-dir for the folder."""
    from .flags import deprecated

    config, out = args.config, args.out
    if out is not None and out.endswith((".yaml", ".yml")) and config is None:
        deprecated(f"--out {out} (the YAML)", f"--config {out}; --out is the run folder, as in train")
        config, out = out, None
    if args.run_dir is not None:
        deprecated("--run-dir", "--out")
        out = out or args.run_dir
    return config or "recommended.yaml", out or "runs/recommended"


def _cmd_recommend(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..atomic import atomic_file
    from ..base import load_model_config, load_tokenizer
    from ..config import DataConfig, dump_yaml
    from ..planning.estimate import parse_size, shape_from_config
    from ..planning.fit import machine_plan
    from ..planning.recommend import default_memory, format_recommendation, profile_data, recommend

    config_path, run_dir = _recommend_paths(args)
    data = DataConfig(path=args.data if len(args.data) > 1 else args.data[0], format=args.format, template=args.template)
    memory, source = (parse_size(args.device_memory), "--device-memory") if args.device_memory else default_memory()
    model_cfg = load_model_config(args.model)
    shape = shape_from_config(model_cfg)
    profile = profile_data(data, load_tokenizer(args.model), args.sample)
    dtype, ratio = machine_plan()  # planned as train plans on this machine
    rec = recommend(profile, shape, args.model, data, memory, source,
                    getattr(model_cfg, "max_position_embeddings", None), run_dir, dtype=dtype, rss_ratio=ratio)
    cfg = rec.run_config()  # the YAML must load as it is written
    out = Path(config_path)
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
