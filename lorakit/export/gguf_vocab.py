"""The tokenizer part of a GGUF model file.

When the base model came from a GGUF file (the embedded SmolLM2 does), its ``tokenizer.*``
metadata is copied as it is: the exact vocabulary llama.cpp already runs. Otherwise it is built
from the transformers tokenizer: byte-level BPE vocabularies (GPT-2, SmolLM, Llama 3, Qwen2 and
the tests' tokenizers) with their merges, special tokens, BOS/EOS behaviour and chat template,
and the pre-tokenizer that llama.cpp must split text with, recognised from ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

from ..base.source import ModelSource, local_folder
from ..errors import LorakitError

__all__ = ["add_vocab"]

# llama.cpp pre-tokenizer names for the split regexes transformers' tokenizer.json carries
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_NAMES = {_LLAMA3_RE: "llama-bpe", _QWEN2_RE: "qwen2"}


def _copy_from_gguf(w: gguf.GGUFWriter, path: Path) -> None:
    reader = gguf.GGUFReader(str(path))
    for key, f in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = f.types[0]
        sub = f.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), kind, sub_type=sub)


def _pre_tokenizer(spec: dict | None, where: Path) -> str:
    def is_byte_level(p: dict) -> bool:
        return p.get("type") == "ByteLevel"

    if spec and is_byte_level(spec) and spec.get("use_regex", True):
        return "gpt-2"
    steps = spec.get("pretokenizers", []) if spec and spec.get("type") == "Sequence" else []
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and is_byte_level(steps[1]) and steps[1].get("use_regex", True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and is_byte_level(steps[1]):
        pattern = steps[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_NAMES:
            return _SPLIT_NAMES[pattern]
    raise LorakitError(f"{where}: this tokenizer's pre-tokenizer ({json.dumps(spec)[:120]}) is not one lorakit knows "
                       "how to name for llama.cpp; export a merged transformers folder (lorakit merge) and convert it "
                       "with llama.cpp's convert_hf_to_gguf.py, which keeps a table of them")


def _merges(model: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _add_from_tokenizer(w: gguf.GGUFWriter, folder: Path, tokenizer: Any, n_vocab: int) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LorakitError(f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = spec.get("model", {}), spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise LorakitError(f"{path}: GGUF export writes byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2, SmolLM); "
                           f"this one is {model.get('type')} with a {decoder.get('type')} decoder. Export a merged "
                           "transformers folder (lorakit merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise LorakitError(f"{path}: {len(vocab)} tokens but the model's embedding has {n_vocab} rows")
    by_id = {i: t for t, i in vocab.items()}
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    added = set(tokenizer.added_tokens_decoder)
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(gguf.TokenType.CONTROL if i in special else
                     gguf.TokenType.USER_DEFINED if i in added else gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(spec.get("pre_tokenizer"), path))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(model))
    probe = tokenizer("a")["input_ids"]
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if tid is not None:
            getattr(w, f"add_{kind}_token_id")(tid)
    w.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(bool(probe) and probe[-1] == tokenizer.eos_token_id and len(probe) > 1)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def add_vocab(w: gguf.GGUFWriter, source: ModelSource, tokenizer: Any, n_vocab: int) -> None:
    """Write the tokenizer metadata for a model loaded from ``source``."""
    if source.kind == "gguf":
        _copy_from_gguf(w, Path(source.path) / str(source.gguf_file))
    else:
        _add_from_tokenizer(w, Path(local_folder(source)), tokenizer, n_vocab)
