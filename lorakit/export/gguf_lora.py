"""``--to gguf-lora``: a llama.cpp LoRA adapter GGUF (what ``llama-cli --lora`` and Ollama's
``ADAPTER`` read).

The file holds ``general.type = adapter``, ``adapter.type = lora`` and one global
``adapter.lora.alpha``; llama.cpp scales every pair by ``alpha / rank`` (rank read from the
tensor), so per-module scales are folded into B and mixed ranks zero-padded to one. Tensors are
``<base GGUF tensor name>.lora_a`` (r × in) and ``.lora_b`` (out × r), in f32 (adapters are small)
or f16, with Llama q/k B rows permuted as the base GGUF's weights are.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ..atomic import atomic_file
from ..base.source import load_model_config
from ..errors import LorakitError
from .adapter import ExportAdapter, refuse, uniform
from .gguf_names import GgufArch, gguf_arch, tensor_name, to_gguf_layout

__all__ = ["write_gguf_lora", "check_gguf_lora", "check_exportable", "LORA_DTYPES"]

LORA_DTYPES = ("f32", "f16")
_WAY_OUT = "export the merged model instead (--to gguf)"


def _check_tied_head(adapter: ExportAdapter, config) -> None:
    if not getattr(config, "tie_word_embeddings", False):
        return
    for f in adapter.factors:
        if f.path.split(".")[-1] in ("lm_head", "embed_tokens", "wte"):
            raise LorakitError(f"{adapter.folder}: module {f.path!r} is adapted, but this model ties its output head to "
                               f"the embeddings, which llama.cpp stores as one tensor; {_WAY_OUT}")


def check_exportable(adapter: ExportAdapter, base: str | None = None) -> GgufArch:
    """Raise, naming the module and the way out, if llama.cpp cannot load this adapter as a LoRA
    GGUF; else the GGUF architecture its base is written as (every module's name checked)."""
    refuse(adapter, "a llama.cpp LoRA GGUF", embeddings=False, way_out=_WAY_OUT)
    name = base or adapter.base_model
    if not name:
        raise LorakitError(f"{adapter.folder}: the adapter does not name its base model; pass --model")
    config = load_model_config(name)
    arch = gguf_arch(config)
    _check_tied_head(adapter, config)
    for f in adapter.factors:
        tensor_name(arch, f.path + ".weight")
    return arch


def write_gguf_lora(adapter: ExportAdapter, out: str | os.PathLike, base: str | None = None,
                    dtype: str = "f32") -> Path:
    """Write ``adapter`` as a llama.cpp LoRA GGUF at ``out``; ``base`` overrides the model the
    adapter names (only its config is read, for tensor names and head counts)."""
    if dtype not in LORA_DTYPES:
        raise LorakitError(f"--outtype for gguf-lora must be one of {', '.join(LORA_DTYPES)}, got {dtype!r}")
    arch = check_exportable(adapter, base)
    factors, scale = uniform(adapter, rank=max(f.r for f in adapter.factors))
    rank = factors[0].r
    np_dtype = np.float16 if dtype == "f16" else np.float32
    out = Path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(scale * rank))
        w.add_name(f"{adapter.folder.parent.name}/{adapter.folder.name} (lorakit)")
        for f in factors:
            gname = tensor_name(arch, f.path + ".weight")
            B = to_gguf_layout(arch, gname, f.B)
            w.add_tensor(f"{gname}.lora_a", f.A.contiguous().numpy().astype(np_dtype))
            w.add_tensor(f"{gname}.lora_b", B.contiguous().numpy().astype(np_dtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


def check_gguf_lora(path: str | os.PathLike) -> list[str]:
    """What is wrong with an existing LoRA GGUF, as llama.cpp's loader sees it (empty: fine)."""
    problems = []
    try:
        r = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as err:
        return [f"{path}: not a readable GGUF file ({err})"]
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    if fields.get("general.type") != "adapter":
        problems.append(f"general.type is {fields.get('general.type')!r}, llama.cpp wants 'adapter'")
    if fields.get("adapter.type") != "lora":
        problems.append(f"adapter.type is {fields.get('adapter.type')!r}, llama.cpp wants 'lora'")
    if not fields.get("adapter.lora.alpha"):
        problems.append("adapter.lora.alpha is missing or 0 (llama.cpp then applies the factors unscaled)")
    names = {t.name for t in r.tensors}
    for n in sorted(names):
        if not n.endswith((".lora_a", ".lora_b")):
            problems.append(f"tensor {n!r} is neither .lora_a nor .lora_b; llama.cpp refuses it")
        elif n.endswith(".lora_a") and n[:-1] + "b" not in names:
            problems.append(f"tensor {n!r} has no .lora_b partner")
    return problems
