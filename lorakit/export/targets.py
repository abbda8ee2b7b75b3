"""``export()`` and ``check()``: one entry for every runtime target, as the CLI and Python call them."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LorakitError
from .adapter import ExportAdapter, adapter_folder, read_export_adapter

__all__ = ["TARGETS", "ExportResult", "export", "check"]

TARGETS = ("gguf-lora", "gguf", "ollama", "vllm", "transformers")
# transformers: --outtype names (llama.cpp's words, as for GGUF) -> the torch dtype the weights are saved in
_TORCH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass
class ExportResult:
    """What was written, and the lines worth printing (how to run it, notes)."""

    path: Path
    lines: list[str] = field(default_factory=list)


def _run_setting(adapter: ExportAdapter | None, section: str, key: str, default):
    """A setting of the run that wrote the adapter (its config.yaml), when there is one."""
    if adapter is None:
        return default
    for folder in (adapter.folder.parent, adapter.folder.parent.parent):
        path = folder / "config.yaml"
        if path.is_file():
            from ..config import load_yaml

            return (load_yaml(path).get(section) or {}).get(key, default)
    return default


def _base_name(adapter: ExportAdapter | None, model: str | None) -> str:
    name = model or (adapter.base_model if adapter else None)
    if not name:
        raise LorakitError("no base model: the adapter does not name one; pass --model")
    return name


def _merged(adapter: ExportAdapter | None, name: str):
    """The base in float32 with the adapter merged (a quantized run's base dequantized first,
    the exact weights it trained against); the base alone when there is no adapter."""
    import torch

    from ..base import load_model
    from ..core.lora_model import LoraModel

    quantize = _run_setting(adapter, "model", "quantize", "none")
    base, tok = load_model(name, "cpu", torch.float32, quantize=quantize)
    if adapter is None:
        return base, tok
    lm = LoraModel.from_pretrained(base, adapter.folder)
    if quantize != "none":
        from ..quant.bnb import dequantize_model

        dequantize_model(lm.model)
    return lm.merge_and_unload(), tok


def _write_transformers(adapter, name: str, out: Path, dtype: str | None) -> ExportResult:
    """The base with the adapter merged, as a transformers folder (float32 unless ``dtype``)."""
    import torch

    from ..core.merge import check_new_folder, save_merged

    if dtype is not None and dtype not in _TORCH_DTYPES:
        raise LorakitError(f"--outtype for --to transformers must be one of {', '.join(_TORCH_DTYPES)}, got {dtype!r}")
    check_new_folder(out)  # before the model is loaded
    model, tok = _merged(adapter, name)
    model.to(getattr(torch, _TORCH_DTYPES[dtype or "f32"]))
    path = save_merged(model, out, tok)
    return ExportResult(path, [f"lorakit chat --model {path}",
                               f"AutoModelForCausalLM.from_pretrained({str(path)!r})   (transformers, vLLM, TGI...)"])


def _default_out(source: Path, to: str) -> Path:
    return source / "export" / (f"{to}.gguf" if to in ("gguf-lora", "gguf") else to)


def _write_gguf(adapter, name: str, out: Path, dtype: str | None) -> ExportResult:
    from ..base.source import resolve_source
    from .gguf_model import write_gguf_model

    model, tok = _merged(adapter, name)
    path = write_gguf_model(model, tok, resolve_source(name), out, dtype or "f16", name=name)
    return ExportResult(path, [f"llama-cli -m {path} -cnv", f"llama-server -m {path}"])


def _write_ollama(adapter, name: str, out: Path, dtype: str | None, merge: bool) -> ExportResult:
    from ..atomic import atomic_dir
    from ..base import load_tokenizer
    from ..base.source import resolve_source
    from ..data.templates import resolve_template
    from .gguf_lora import write_gguf_lora
    from .gguf_model import write_gguf_model
    from .ollama import modelfile_for

    source = resolve_source(name)
    with atomic_dir(out) as tmp:
        if merge or adapter is None:
            model, tok = _merged(adapter, name)
            write_gguf_model(model, tok, source, tmp / "model.gguf", dtype or "f16", name=name)
            base_file, adapter_file = "model.gguf", None
        else:
            tok = load_tokenizer(name)
            if source.kind == "gguf":  # the base llama.cpp already runs, as it is
                shutil.copy2(Path(source.path) / str(source.gguf_file), tmp / "base.gguf")
            else:
                model, _ = _merged(None, name)
                write_gguf_model(model, tok, source, tmp / "base.gguf", dtype or "f16", name=name)
            write_gguf_lora(adapter, tmp / "adapter.gguf", base=name)
            base_file, adapter_file = "base.gguf", "adapter.gguf"
        template = resolve_template(_run_setting(adapter, "data", "template", "auto"), tok)
        modelfile, note = modelfile_for(base_file, adapter_file, template, tok)
        (tmp / "Modelfile").write_text(modelfile.text())
    lines = [f"cd {out} && ollama create {out.name} -f Modelfile && ollama run {out.name}"]
    return ExportResult(out, lines + ([f"note: {note}"] if note else []))


def export(source: str | os.PathLike | None, to: str, out: str | os.PathLike | None = None, *,
           model: str | None = None, dtype: str | None = None, rank: int | None = None,
           merge: bool = False) -> ExportResult:
    """Export an adapter or run folder (``source``; None with ``to='gguf'`` or ``'ollama'``
    exports the base ``model`` alone) to a runtime target; see docs/export.md."""
    if to not in TARGETS:
        raise LorakitError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if source is None and to not in ("gguf", "ollama"):
        raise LorakitError(f"--to {to} exports an adapter: give an adapter or run folder")
    if source is None and not model:
        raise LorakitError("give an adapter or run folder, or --model to export a base model alone")
    adapter = read_export_adapter(source) if source is not None else None
    name = _base_name(adapter, model)
    where = adapter.folder.parent if adapter and adapter.folder.name == "adapter" else \
        (adapter.folder if adapter else Path("."))
    out = Path(out) if out is not None else _default_out(where, to)
    if to == "gguf-lora":
        from .gguf_lora import write_gguf_lora

        path = write_gguf_lora(adapter, out, base=name, dtype=dtype or "f32")
        return ExportResult(path, [f"llama-cli -m BASE.gguf --lora {path} -cnv   (BASE.gguf: the base "
                                   f"{name} as GGUF, e.g. from lorakit export --model {name} --to gguf)"])
    if to == "gguf":
        return _write_gguf(adapter, name, out, dtype)
    if to == "ollama":
        return _write_ollama(adapter, name, out, dtype, merge)
    if to == "transformers":
        return _write_transformers(adapter, name, out, dtype)
    from .vllm import serve_line, write_vllm

    path, r = write_vllm(adapter, out, rank=rank)
    return ExportResult(path, [serve_line(name, where.name or "adapter", path, r)])


def check(path: str | os.PathLike, to: str) -> list[str]:
    """Problems a target's runtime would have with an existing file or folder; nothing is written.
    An adapter folder is checked for whether ``export`` can convert it."""
    from .gguf_lora import check_gguf_lora
    from .vllm import check_vllm

    p = Path(path)
    if to not in TARGETS:
        raise LorakitError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if to == "gguf-lora" and p.suffix == ".gguf":
        return check_gguf_lora(p)
    if to == "vllm":
        return check_vllm(adapter_folder(p))
    if to == "gguf-lora":
        from .gguf_lora import check_exportable

        try:
            check_exportable(read_export_adapter(p))
        except LorakitError as err:
            return [str(err)]
        return []
    raise LorakitError(f"--check covers gguf-lora files, adapter folders and vllm folders; for --to {to} run the "
                       "export (it refuses what the target cannot represent)")
