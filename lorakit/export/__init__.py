"""Export: adapters and merged models in the formats the runtimes people deploy on read —
llama.cpp / Ollama GGUF (``gguf_lora``, ``gguf_model``, ``ollama``) and vLLM (``vllm``) — one
module per target, sharing one normalise step (``adapter``: per-module scales folded into B,
ranks zero-padded, what a target cannot represent refused with the way out). ``targets`` holds
``export()`` and ``check()``, which the CLI's ``lorakit export`` calls.

May import every room below it (training for the model card's vLLM ranks, base for loading,
core for the adapter format and merging); nothing but the CLI imports it."""

from .targets import TARGETS, ExportResult, check, export

__all__ = ["TARGETS", "ExportResult", "check", "export"]
