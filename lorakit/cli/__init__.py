"""The command line — the only readers of sys.argv. ``main`` dispatches to one module per command
group: ``train`` and ``info`` (``main``), generate/chat/merge/combine/serve (``infer``), ``data``,
estimate/recommend (``plan``); ``report`` prints a run's summary.

May import: anything in lorakit, lazily (``--help`` and usage errors must not pay for torch)."""

from .main import main

__all__ = ["main"]
