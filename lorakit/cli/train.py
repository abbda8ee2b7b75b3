"""``lorakit train`` (and ``lorakit info``, which reads what a run wrote)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import LorakitError

__all__ = ["TRAIN_COMMANDS"]


def _add_train(p: argparse.ArgumentParser) -> None:
    from .flags import add_run_flags

    add_run_flags(p)
    p.add_argument("--resume", dest="train.resume", nargs="?", const="latest", metavar="CKPT",
                   help="= --train.resume (default: latest)")
    p.add_argument("--overwrite", dest="train.overwrite", action="store_const", const="true",
                   help="= --train.overwrite true")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine (starts torchrun; see docs/distributed.md)")


def _launch_torchrun(args: argparse.Namespace) -> int:
    """`lorakit train --nproc N ...` = `torchrun --standalone --nproc_per_node N -m lorakit train ...`."""
    import subprocess

    rest, skip = [], False
    for a in args.raw_argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
           "-m", "lorakit", *rest]
    return subprocess.call(cmd)


def _malloc_name() -> str:
    """Which malloc serves the tensors (lorakit.cli.allocator: mimalloc unless turned off)."""
    from .allocator import allocator_in_use

    return allocator_in_use() or "the C library's"


def _fit_memory(cfg, main_rank: bool):
    """Print tokens per step and the estimated peak against the available memory; make the run fit
    (lorakit.planning.fit) or stop here, before any data or weights are loaded. A resumed run keeps
    its settings (its data order depends on them)."""
    from ..base import load_model_config
    from ..config import resolve_batch_tokens
    from ..planning.estimate import shape_from_config
    from ..planning.fit import (OVERHEAD_BYTES, apply_fit, available_memory, device_kind, fit_to_memory, planned_precision,
                                resident_note, rss_ratio)

    cfg, line = resolve_batch_tokens(cfg)
    if line and main_rank:
        print(line)
    if cfg.model.quantize == "int8":
        return cfg  # not estimated yet
    try:
        shape = shape_from_config(load_model_config(cfg.model.name))
    except LorakitError:
        return cfg  # an architecture the estimate does not model, or a model train will report on itself
    kind = device_kind(cfg.model.device)
    available = available_memory(kind) / (int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if kind == "cpu" else 1)
    # a resumed run is only reported on: planned against unlimited memory, nothing changes
    precision = planned_precision(cfg, kind)
    fit = fit_to_memory(shape, cfg, precision, OVERHEAD_BYTES[kind], float("inf") if cfg.train.resume else available,
                        rss_ratio(kind, precision))
    cfg = apply_fit(cfg, fit)
    if main_rank:
        t, budget = cfg.train, cfg.micro_tokens()
        micro = f"{budget:,} tokens" if budget else f"{t.batch_size} × {cfg.data.max_len} tokens"
        step = (budget or t.batch_size * cfg.data.max_len) * t.grad_accum
        process = resident_note(fit.estimate, fit.rss_ratio)
        print(f"memory: {micro} per micro-batch × {t.grad_accum} = up to {step:,} tokens per step; estimated peak "
              f"{fit.estimate / 2**30:.2f} GiB{process} of {available / 2**30:.2f} GiB available; malloc: {_malloc_name()}")
        for change in fit.changes:
            print(f"memory: to fit, {change}")
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from ..training.loop import train
    from ..training.setup import with_init_adapter
    from .flags import run_config
    from .report import print_train_summary

    if args.nproc is not None:
        if args.nproc < 1:
            raise LorakitError(f"--nproc must be at least 1, got {args.nproc}")
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _launch_torchrun(args)
    cfg, uses_demo = run_config(args)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone prints
    if uses_demo and main_rank:
        print("no --data given: training on the built-in demo task (date normalisation + identity"
              + (", as preference pairs: the strict answer chosen, other styles rejected)" if cfg.train.objective != "sft"
                 else ")"))
    cfg = _fit_memory(with_init_adapter(cfg), main_rank)
    result = train(cfg)
    if main_rank:
        print_train_summary(result, cfg)
    return 130 if result.interrupted else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..core.peft_format import read_adapter

    config, state = read_adapter(args.adapter)
    params = sum(t.numel() for t in state.values())
    print(f"adapter: {args.adapter}")
    print(f"rank r={config.r}  alpha={config.alpha:g}  rslora={config.use_rslora}  dora={config.use_dora}  dropout={config.dropout:g}")
    targets = config.target_modules
    if isinstance(targets, list) and len(targets) > 8:
        targets = f"{targets[:8]} ... ({len(targets)} in all)"
    print(f"targets: {targets}")
    if config.rank_pattern:
        print(f"rank_pattern: {json.dumps(config.rank_pattern)}")
    if config.alpha_pattern:
        print(f"alpha_pattern: {json.dumps(config.alpha_pattern)}")
    if config.modules_to_save:
        print(f"modules_to_save: {config.modules_to_save}")
    print(f"base model: {config.base_model_name_or_path}")
    print(f"tensors: {len(state)}  parameters: {params:,d}")
    return 0


TRAIN_COMMANDS = {
    "train": ("Fine-tune a LoRA adapter (no arguments: SmolLM2-135M-Instruct on the built-in demo task).",
              _add_train, _cmd_train),
    "info": ("Show an adapter folder's config and size (PEFT format).",
             lambda p: p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)"),
             _cmd_info),
}
