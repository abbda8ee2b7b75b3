"""Answering with a base and its adapters: batched generation with per-row adapters
(``generation``), the engine that generate/chat/serve share (``engine``) and the
OpenAI-compatible HTTP server (``server``, its request models in ``api``).

May import: ``lorakit.core``, ``lorakit.base``, ``lorakit.quant``, ``lorakit.data`` (templates),
``lorakit.config``, ``lorakit.errors``. Never training, planning or the CLI."""
