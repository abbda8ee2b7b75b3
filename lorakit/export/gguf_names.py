"""How a transformers model's tensors are named and laid out in llama.cpp's GGUF files.

Names come from the ``gguf`` package's tensor-name maps (the same tables llama.cpp's converter
uses). Llama-family q/k projections are stored with their rows permuted (llama.cpp's rotary
embedding pairs dimensions (i, i+1) where transformers pairs (i, i+d/2)); the converter applies
that permutation to base weights, so an adapter's B factor of q/k (its output rows) and a merged
weight must follow it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
from torch import Tensor

from ..errors import LorakitError

__all__ = ["GgufArch", "gguf_arch", "tensor_name", "to_gguf_layout"]


@dataclass(frozen=True)
class GgufArch:
    """The GGUF architecture a transformers ``model_type`` is written as."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool
    n_layers: int
    n_head: int
    n_kv_head: int

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


# transformers model_type -> (GGUF architecture, whether q/k rows are permuted), as llama.cpp's converter writes them
_ARCHS = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
    "qwen3": (gguf.MODEL_ARCH.QWEN3, False),
}


def gguf_arch(config: Any) -> GgufArch:
    """The GGUF architecture of a transformers config; a clear refusal for the others."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHS:
        raise LorakitError(f"GGUF export supports the {', '.join(sorted(_ARCHS))} architectures; this model is "
                           f"{model_type!r}. Export a merged transformers folder (lorakit merge) and convert it "
                           "with llama.cpp's convert_hf_to_gguf.py")
    arch, permute = _ARCHS[model_type]
    heads = config.num_attention_heads
    return GgufArch(arch, permute, config.num_hidden_layers, heads, getattr(config, "num_key_value_heads", None) or heads)


def tensor_name(arch: GgufArch, hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (``.weight``/``.bias`` kept)."""
    table = gguf.get_tensor_name_map(arch.arch, arch.n_layers)
    name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise LorakitError(f"tensor {hf_name!r} has no GGUF name for the {arch.name} architecture; "
                           "llama.cpp would not load it")
    return name


def _permute_rows(w: Tensor, n_head: int) -> Tensor:
    # rows (head, [first half | second half], i) -> (head, i, [first | second]): llama.cpp's rotary layout
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def to_gguf_layout(arch: GgufArch, gguf_name: str, w: Tensor) -> Tensor:
    """A weight (or an adapter's B factor, whose rows are the output rows) in the GGUF layout."""
    if not arch.permute_qk:
        return w
    if gguf_name.startswith("blk.") and ".attn_q." in gguf_name:
        return _permute_rows(w, arch.n_head)
    if gguf_name.startswith("blk.") and ".attn_k." in gguf_name:
        return _permute_rows(w, arch.n_kv_head)
    return w
