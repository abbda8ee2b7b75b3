"""``--to gguf``: a whole model (the base with its adapter merged) as one llama.cpp GGUF file.

Llama-family architectures (Llama, Mistral, SmolLM, Qwen2, Qwen3) in f32, f16, bf16 or q8_0:
matrices take the chosen type (q8_0 where a row divides into its 32-value blocks, f16 otherwise),
norms and biases stay f32, as llama.cpp's converter writes them. The hyper-parameters llama.cpp
reads, the tokenizer and the chat template go into the metadata.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import nn

from ..atomic import atomic_file
from ..base.source import ModelSource
from ..errors import LorakitError
from .gguf_names import GgufArch, gguf_arch, tensor_name, to_gguf_layout
from .gguf_vocab import add_vocab

__all__ = ["write_gguf_model", "MODEL_DTYPES"]

_Q = gguf.GGMLQuantizationType
MODEL_DTYPES = {"f32": (_Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (_Q.F16, gguf.LlamaFileType.MOSTLY_F16),
                "bf16": (_Q.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (_Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise LorakitError(f"rope type {kind!r} is not written by lorakit's GGUF export yet; export a merged "
                           "transformers folder (lorakit merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise LorakitError("the model config has no rope_theta; cannot write llama.cpp's rope.freq_base")
    return float(theta)


def _add_hparams(w: gguf.GGUFWriter, arch: GgufArch, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // arch.n_head
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(arch.n_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(arch.n_head)
    w.add_head_count_kv(arch.n_kv_head)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(_rope_theta(config))
    w.add_rope_dimension_count(head_dim)
    if head_dim * arch.n_head != config.hidden_size:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_vocab_size(config.vocab_size)


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    if data.ndim == 1 or qtype == _Q.F32:
        return data.astype(np.float32), _Q.F32
    if qtype == _Q.F16:
        return data.astype(np.float16), _Q.F16
    if qtype == _Q.Q8_0 and data.shape[-1] % 32:
        return data.astype(np.float16), _Q.F16
    return gguf.quants.quantize(data.astype(np.float32), qtype), qtype


def _tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == emb.weight.data_ptr()


def write_gguf_model(model: nn.Module, tokenizer: Any, source: ModelSource, out: str | os.PathLike,
                     dtype: str = "f16", name: str = "") -> Path:
    """Write a plain transformers causal LM (adapters merged) as one GGUF file at ``out``."""
    if dtype not in MODEL_DTYPES:
        raise LorakitError(f"--outtype for gguf must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")
    qtype, file_type = MODEL_DTYPES[dtype]
    config = model.config
    arch = gguf_arch(config)
    tied = _tied(model)
    out = Path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or getattr(config, "_name_or_path", "") or "lorakit export")
        _add_hparams(w, arch, config)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_vocab(w, source, tokenizer, config.vocab_size)
        for hf_name, t in model.state_dict().items():
            if tied and hf_name == "lm_head.weight":
                continue  # llama.cpp reads a missing output.weight as tied to token_embd
            gname = tensor_name(arch, hf_name)
            data, kind = _encode(to_gguf_layout(arch, gname, t.detach().float().cpu()).numpy(), qtype)
            w.add_tensor(gname, data, raw_dtype=kind if kind in (_Q.Q8_0, _Q.BF16) else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
