"""Command line: ``lorakit <command> ...``. The only module that reads sys.argv.

A user mistake (``LorakitError``) is printed as one clear line on stderr with exit code 2 —
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .._version import __version__
from ..errors import LorakitError
from .allocator import restart_with_allocator, settle_restarted_process

__all__ = ["main"]

# commands whose process restarts itself under a reusing malloc (lorakit.cli.allocator)
RESTARTED_UNDER_ALLOCATOR = ("train",)


def _all_commands() -> dict:
    """name -> (help, add_arguments(parser), run(args) -> exit code), one module per command group."""
    from .data import DATA_COMMAND
    from .evaluate import EVAL_COMMAND
    from .export import EXPORT_COMMAND
    from .infer import INFER_COMMANDS
    from .plan import PLAN_COMMANDS
    from .train import TRAIN_COMMANDS
    from .ui import UI_COMMAND

    return {**TRAIN_COMMANDS, **EVAL_COMMAND, **INFER_COMMANDS, **EXPORT_COMMAND, **DATA_COMMAND, **PLAN_COMMANDS, **UI_COMMAND}


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
    settle_restarted_process()
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
        if args.command in RESTARTED_UNDER_ALLOCATOR and argv is None:  # a real process, not a call
            restart_with_allocator(args.raw_argv)
        return _all_commands()[args.command][2](args)
    except LorakitError as err:
        print(f"lorakit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
