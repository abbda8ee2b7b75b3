"""Command line: ``lorakit <command> ...``. The only module that reads sys.argv.

A user mistake (``LorakitError``) is printed as one clear line on stderr with exit code 2 —
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    print(f"targets: {config.target_modules}")
    if config.rank_pattern:
        print(f"rank_pattern: {json.dumps(config.rank_pattern)}")
    if config.alpha_pattern:
        print(f"alpha_pattern: {json.dumps(config.alpha_pattern)}")
    if config.modules_to_save:
        print(f"modules_to_save: {config.modules_to_save}")
    print(f"base model: {config.base_model_name_or_path}")
    print(f"tensors: {len(state)}  parameters: {params:,d}")
    return 0


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("Show an adapter folder's config and size (PEFT format).",
             lambda p: p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)"),
             _cmd_info),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning toolkit: inject, train, save (PEFT format), merge, combine, serve.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return COMMANDS[args.command][2](args)
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
