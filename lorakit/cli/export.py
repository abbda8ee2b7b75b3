"""``lorakit export``: an adapter or run folder to llama.cpp / Ollama GGUF, a vLLM folder or a
merged transformers folder,
and ``--check`` for files and folders made elsewhere."""

from __future__ import annotations

import argparse

from ..errors import LorakitError

__all__ = ["EXPORT_COMMAND"]

_TARGETS = ("gguf-lora", "gguf", "ollama", "vllm", "transformers")  # lorakit.export.TARGETS, without importing torch for --help


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", nargs="?", default=None, metavar="ADAPTER_OR_RUN",
                   help="adapter folder or run folder (runs/demo); leave out with --model to export a base alone")
    p.add_argument("--to", required=True, choices=_TARGETS,
                   help="gguf-lora: llama.cpp LoRA GGUF | gguf: merged model GGUF | ollama: folder with Modelfile | "
                        "vllm: PEFT folder vLLM accepts | transformers: merged model folder (from_pretrained)")
    p.add_argument("--out", default=None, help="file (gguf-lora, gguf) or new folder (ollama, vllm); "
                   "default: SOURCE/export/<target>")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter names)")
    p.add_argument("--outtype", default=None, metavar="T", help="GGUF tensor type (llama.cpp's word) — gguf/ollama: "
                   "f16 (default) | bf16 | q8_0 | f32; gguf-lora: f32 (default) | f16; transformers: f32 (default) | bf16 | f16")
    p.add_argument("--rank", type=int, default=None, help="vllm: rank to pad to (an allowed --max-lora-rank; "
                   "default: the smallest that holds the adapter)")
    p.add_argument("--merge", action="store_true", help="ollama: one merged GGUF instead of base + ADAPTER")
    p.add_argument("--check", action="store_true", help="only check SOURCE (a file or folder made elsewhere) "
                   "for TARGET; writes nothing")


def _cmd_export(args: argparse.Namespace) -> int:
    from ..export import check, export

    if args.check:
        if args.source is None:
            raise LorakitError("--check needs the file or folder to check")
        problems = check(args.source, args.to)
        for line in problems:
            print(f"problem: {line}")
        print(f"{args.source}: {'ok for ' + args.to if not problems else f'{len(problems)} problem(s) for ' + args.to}")
        return 1 if problems else 0
    result = export(args.source, args.to, args.out, model=args.model, dtype=args.outtype, rank=args.rank, merge=args.merge)
    print(f"wrote {result.path}")
    for line in result.lines:
        print(("  " if not line.startswith("note:") else "") + line)
    return 0


EXPORT_COMMAND = {
    "export": ("Export an adapter or run to llama.cpp/Ollama GGUF, a vLLM-ready folder or a merged transformers "
               "folder (--check: validate one).",
               _add_export, _cmd_export),
}
