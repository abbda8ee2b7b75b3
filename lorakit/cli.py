"""Command line: ``lorakit <command> ...``. The only module that reads sys.argv.

A user mistake (``LorakitError``) is printed as one clear line on stderr with exit code 2 —
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ._version import __version__
from .errors import LorakitError

__all__ = ["main"]


def _cmd_info(args: argparse.Namespace) -> int:
    from .adapters import read_adapter

    config, state = read_adapter(args.adapter)
    params = sum(t.numel() for t in state.values())
    print(f"adapter: {args.adapter}")
    print(f"rank r={config.r}  alpha={config.alpha:g}  rslora={config.use_rslora}  dropout={config.dropout:g}")
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


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from .config import SECTIONS, _field_docs

    p.add_argument("--config", metavar="FILE", help="YAML run config (sections model, data, lora, train); flags override it")
    p.add_argument("--model", dest="alias_model", metavar="M", help="= --model.name")
    p.add_argument("--data", dest="alias_data", nargs="+", metavar="FILE", help="= --data.path")
    p.add_argument("--out", dest="alias_out", metavar="DIR", help="= --train.out_dir")
    p.add_argument("--resume", dest="alias_resume", nargs="?", const="latest", metavar="CKPT", help="= --train.resume (default: latest)")
    p.add_argument("--overwrite", dest="alias_overwrite", action="store_true", help="= --train.overwrite true")
    p.add_argument("--quantize", dest="alias_quantize", metavar="Q", help="= --model.quantize (nf4 | fp4 | int8: QLoRA)")
    p.add_argument("--double-quant", dest="alias_double_quant", action=argparse.BooleanOptionalAction, default=None,
                   help="= --model.double_quant")
    p.add_argument("--compute-dtype", dest="alias_compute_dtype", metavar="D", help="= --model.compute_dtype")
    p.add_argument("--quant-rounding", dest="alias_quant_rounding", metavar="R",
                   help="= --model.quant_rounding (nearest | gptq)")
    p.add_argument("--optimizer", dest="alias_optimizer", metavar="O", help="= --train.optimizer")
    p.add_argument("--device", dest="alias_device", metavar="D", help="= --model.device")
    p.add_argument("--dtype", dest="alias_dtype", metavar="D", help="= --model.dtype")
    p.add_argument("--template", dest="alias_template", metavar="T", help="= --data.template")
    p.add_argument("--format", dest="alias_format", metavar="F", help="= --data.format")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train on N processes of this machine (starts torchrun; see docs/distributed.md)")
    from .config import RunConfig

    defaults = RunConfig().to_dict()
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} ({cls.__doc__.strip().splitlines()[0]})")
        for name, doc in _field_docs(cls).items():
            default = defaults[section][name]
            shown = "" if default in (None, {}, []) else f" (default: {default})"
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", metavar="V",
                               help=(doc + shown).replace("%", "%%"))


def _flag_overrides(args: argparse.Namespace) -> dict:
    """Nested {section: {key: value}} from the flags that were given, values typed by their field."""
    from .config import SECTIONS, coerce_value

    out: dict = {}
    for dest, raw in vars(args).items():
        if raw is None or "." not in dest:
            continue
        section, key = dest.split(".", 1)
        out.setdefault(section, {})[key] = coerce_value(SECTIONS[section], key, raw)
    aliases = {"alias_model": ("model", "name"), "alias_data": ("data", "path"), "alias_out": ("train", "out_dir"),
               "alias_resume": ("train", "resume"), "alias_quantize": ("model", "quantize"),
               "alias_double_quant": ("model", "double_quant"), "alias_compute_dtype": ("model", "compute_dtype"),
               "alias_quant_rounding": ("model", "quant_rounding"),
               "alias_optimizer": ("train", "optimizer"), "alias_device": ("model", "device"),
               "alias_dtype": ("model", "dtype"), "alias_template": ("data", "template"),
               "alias_format": ("data", "format")}
    for dest, (section, key) in aliases.items():
        if getattr(args, dest, None) is not None:
            out.setdefault(section, {})[key] = getattr(args, dest)
    if getattr(args, "alias_overwrite", False):
        out.setdefault("train", {})["overwrite"] = True
    return out


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


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_yaml, merge_nested, run_config_from_dict
    from .data.demo import DEMO_OVERRIDES
    from .report import print_train_summary
    from .train import train

    if args.nproc is not None:
        if args.nproc < 1:
            raise LorakitError(f"--nproc must be at least 1, got {args.nproc}")
        if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
            return _launch_torchrun(args)
    file_cfg = load_yaml(args.config) if args.config else {}
    flags = _flag_overrides(args)
    layers: dict = {}
    uses_demo = "path" not in flags.get("data", {}) and "path" not in (file_cfg.get("data") or {})
    if uses_demo:
        layers = merge_nested(layers, DEMO_OVERRIDES)
    layers = merge_nested(merge_nested(layers, file_cfg), flags)
    cfg = run_config_from_dict(layers, args.config or "flags")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone prints
    if uses_demo and main_rank:
        print("no --data given: training on the built-in demo task (date normalisation + identity)")
    result = train(cfg)
    if main_rank:
        print_train_summary(result, cfg)
    return 130 if result.interrupted else 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "train": ("Fine-tune a LoRA adapter (no arguments: SmolLM2-135M-Instruct on the built-in demo task).",
              _add_train_args, _cmd_train),
    "info": ("Show an adapter folder's config and size (PEFT format).",
             lambda p: p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)"),
             _cmd_info),
}


def _all_commands() -> dict:
    from .cli_data import DATA_COMMAND
    from .cli_infer import INFER_COMMANDS
    from .cli_plan import PLAN_COMMANDS

    return {**COMMANDS, **INFER_COMMANDS, **DATA_COMMAND, **PLAN_COMMANDS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit: inject, train, save (PEFT format), merge, combine, serve.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    parser.commands = {}  # type: ignore[attr-defined]
    for name, (help_text, add_args, _) in _all_commands().items():
        parser.commands[name] = sub.add_parser(name, help=help_text, description=help_text)  # type: ignore[attr-defined]
        add_args(parser.commands[name])  # type: ignore[attr-defined]
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one line in plain words: lorakit's own as "warning: ...", another library's
    with its name; libraries' deprecation notices (addressed to developers, not users) are dropped."""
    origin = Path(filename).parts
    package = next((origin[i + 1] for i in range(len(origin) - 1) if origin[i] == "site-packages"), None)
    if "lorakit" in origin or package is None:
        print(f"warning: {message}", file=sys.stderr)
    elif not issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        print(f"warning ({package}): {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    shown, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        return _main(argv)
    finally:
        warnings.showwarning = shown


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        import difflib

        owner = parser.commands.get(args.command, parser)  # type: ignore[attr-defined]
        known = [o for a in owner._actions for o in a.option_strings]
        flag = next((u for u in unknown if u.startswith("--")), unknown[0])
        close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        prog = f"lorakit {args.command}" if args.command else "lorakit"
        print(f"{prog}: error: unrecognized argument {flag}{hint}", file=sys.stderr)
        return 2
    if args.command is None:
        parser.print_help()
        return 0
    args.raw_argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return _all_commands()[args.command][2](args)
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
