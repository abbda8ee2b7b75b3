"""``lorakit ui``: the web UI (lorakit.ui), served on this machine."""

from __future__ import annotations

import argparse
import sys

from ..errors import LorakitError

__all__ = ["UI_COMMAND"]

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _add_ui(p: argparse.ArgumentParser) -> None:
    from ..config import DEFAULT_MODEL

    p.add_argument("--runs", default="runs", help="folder of run folders the UI lists, starts and writes (default: runs)")
    p.add_argument("--data-dir", default=".", help="folder the UI may read data from; uploads go to its uploads/ (default: .)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="base model the forms start with")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require this login (needed to bind an address other machines can reach)")


def _cmd_ui(args: argparse.Namespace) -> int:
    from ..errors import require_extra

    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise LorakitError("--auth must be USER:PASSWORD")
        auth = (user, password)
    if args.host not in LOCAL_HOSTS and auth is None:
        # Refused rather than warned: the UI starts processes and reads files on this machine.
        raise LorakitError(f"--host {args.host} lets other machines start training runs and read files here; "
                           "add --auth USER:PASSWORD (and prefer an SSH tunnel to 127.0.0.1)")
    require_extra("ui", ("gradio",), "lorakit ui")
    from ..ui.app import UiContext, launch

    ctx = UiContext(args.runs, args.data_dir, args.model)
    print(f"lorakit ui on http://{args.host}:{args.port} — runs in {ctx.runs.root}, data from {ctx.data_dir}", file=sys.stderr)
    launch(ctx, args.host, args.port, auth)
    return 0


UI_COMMAND = {"ui": ("The web UI: inspect data, plan and start runs, watch them, compare, chat side by side.",
                     _add_ui, _cmd_ui)}
