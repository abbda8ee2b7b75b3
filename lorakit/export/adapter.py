"""The one normalise step every export target shares.

An adapter folder (or a run folder holding ``adapter/``) is read into per-module factor pairs,
each with the scale PEFT would apply to it (``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA, per-module
``rank_pattern``/``alpha_pattern`` honoured). Runtimes that know one global scale get the
per-module scales folded into B (``B' = B · s_module / s_global``, exact), and runtimes that need
one rank or an allowed rank get A and B padded with exact zeros (``B·A`` is unchanged). What a
target cannot represent is refused by :func:`refuse`, naming the module and the way out.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ..config import LoraConfig
from ..core.inject import pattern_value
from ..core.layers import lora_scaling
from ..core.peft_format import CONFIG_NAME, PREFIX, read_adapter
from ..errors import LorakitError

__all__ = ["Factor", "ExportAdapter", "adapter_folder", "read_export_adapter", "refuse", "uniform"]

_PAIRS = (("lora_A.weight", "lora_B.weight", False), ("lora_embedding_A", "lora_embedding_B", True))


@dataclass
class Factor:
    """One adapted module: ``delta = scale · B @ A`` (A is r×in, B is out×r; for an embedding
    A is r×vocab and B is dim×r, as PEFT stores them)."""

    path: str
    A: Tensor
    B: Tensor
    scale: float
    embedding: bool = False

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


@dataclass
class ExportAdapter:
    """An adapter as read from disk: its folder, config, factor pairs and any other tensors
    (``modules_to_save`` copies, trained biases) by their PEFT key."""

    folder: Path
    config: LoraConfig
    factors: list[Factor]
    extras: dict[str, Tensor] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.base_model_name_or_path


def adapter_folder(path: str | os.PathLike) -> Path:
    """An adapter folder, or a run folder's ``adapter/`` (the final one a finished run writes)."""
    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / "adapter" / CONFIG_NAME).is_file():
        return p / "adapter"
    if not p.exists():
        raise LorakitError(f"{p} does not exist; give an adapter folder or a run folder (e.g. runs/demo)")
    hint = " (the run has not finished: its checkpoints are under checkpoints/<step>/adapter)" \
        if (p / "checkpoints").is_dir() else ""
    raise LorakitError(f"{p} holds no {CONFIG_NAME}, nor does {p / 'adapter'}{hint}")


def read_export_adapter(path: str | os.PathLike) -> ExportAdapter:
    """Read an adapter or run folder into factor pairs with their PEFT scales."""
    folder = adapter_folder(path)
    config, state = read_adapter(folder)
    factors, extras = [], dict(state)
    for key in sorted(state):
        for a_suffix, b_suffix, emb in _PAIRS:
            if not key.endswith("." + a_suffix) or not key.startswith(PREFIX):
                continue
            mpath = key[len(PREFIX):-len(a_suffix) - 1]
            b_key = f"{PREFIX}{mpath}.{b_suffix}"
            if b_key not in state:
                raise LorakitError(f"{folder}: {key} has no partner {b_key}; the adapter file is incomplete")
            A, B = extras.pop(key).float(), extras.pop(b_key).float()
            alpha = pattern_value(config.alpha_pattern, mpath, config.alpha)
            factors.append(Factor(mpath, A, B, lora_scaling(A.shape[0], alpha, config.use_rslora), emb))
    if not factors:
        raise LorakitError(f"{folder}: the adapter holds no LoRA factors (no *.lora_A.weight keys)")
    return ExportAdapter(folder, config, factors, extras)


def refuse(adapter: ExportAdapter, target: str, *, embeddings: bool = True, bias: bool = False,
           modules_to_save: bool = False, way_out: str = "") -> None:
    """Raise, naming the module, when the adapter holds what ``target`` cannot represent."""
    cfg, where = adapter.config, adapter.folder
    if cfg.use_dora:
        raise LorakitError(f"{where}: a DoRA adapter (use_dora) rescales each output by a trained magnitude, which "
                           f"{target} cannot apply as LoRA factors; {way_out or 'merge it into the base first'}")
    if cfg.modules_to_save and not modules_to_save:
        raise LorakitError(f"{where}: modules_to_save={cfg.modules_to_save} (full copies of those modules) cannot be "
                           f"represented in {target}; {way_out or 'merge first'}, or train without modules_to_save")
    biases = [k for k in adapter.extras if k.endswith(".bias")]
    if (cfg.bias != "none" or biases) and not bias:
        name = biases[0][len(PREFIX):] if biases else f"bias={cfg.bias!r}"
        raise LorakitError(f"{where}: the adapter trains biases ({name}); {target} loads LoRA factors only. "
                           f"{way_out or 'Merge first'}, or train with lora.bias none")
    others = [k for k in adapter.extras if not k.endswith(".bias")]
    if others and not modules_to_save:
        raise LorakitError(f"{where}: {others[0]} is a full tensor, not a LoRA factor; {target} cannot load it. "
                           f"{way_out or 'Merge first'}")
    if not embeddings:
        for f in adapter.factors:
            if f.embedding:
                raise LorakitError(f"{where}: module {f.path!r} is an embedding LoRA, which {target} does not load; "
                                   f"{way_out or 'merge first'}, or exclude the embeddings from target_modules")


def _pad(t: Tensor, r: int, dim: int) -> Tensor:
    if t.shape[dim] == r:
        return t
    shape = list(t.shape)
    shape[dim] = r - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def uniform(adapter: ExportAdapter, rank: int | None = None, scale: float | None = None) -> tuple[list[Factor], float]:
    """Factors with one global scale (folded into B) and, when ``rank`` is given, one rank (zero
    padding). The global scale is the most common module scale unless ``scale`` is given, so most
    B's stay as trained. Returns the factors and that scale."""
    factors = adapter.factors
    s = scale if scale is not None else Counter(f.scale for f in factors).most_common(1)[0][0]
    if rank is not None and rank < max(f.r for f in factors):
        raise LorakitError(f"rank {rank} is below the adapter's largest rank {max(f.r for f in factors)}")
    out = []
    for f in factors:
        B = f.B if f.scale == s else f.B * (f.scale / s)
        A = f.A
        if rank is not None:
            A, B = _pad(A, rank, 0), _pad(B, rank, 1)
        out.append(replace(f, A=A, B=B, scale=s))
    return out, s
