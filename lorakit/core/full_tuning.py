"""Full and freeze fine-tuning (``train.method full | freeze``): the model's own weights train, no adapter.

What trains (``select_trainable``): every parameter for ``full`` (the input embeddings and the
output head can stay frozen), or those of the last N decoder blocks for ``freeze`` (LLaMA-Factory's
freeze mode; a negative N takes the first blocks), narrowed in both by ``trainable_modules``: a
parameter trains when it, or a module above it, matches (so ``mlp`` takes a block's whole MLP and
``q_proj`` one projection).

The trained weights are kept in float32 — master weights: under bf16/fp16 autocast the matmuls
still run in half precision on a cached half-precision copy, while AdamW's updates, often below
bf16's resolution relative to the weight (8 bits of mantissa), are not rounded away. Frozen
weights keep the dtype they were loaded in. Memory per trained parameter: 4 (weight) + 4
(gradient) + 8 (AdamW's moments; 2 with the 8-bit optimizer) + 2 (the autocast copy) bytes.

``FullTuning`` has the surface of :class:`~lorakit.core.lora_model.LoraModel` that a training run
uses (parameters, train/eval, save and load of what trains, a report), so the training loop runs
both. Checkpoints hold only the trained tensors (``trained.safetensors``, exact); the finished
run's ``model/`` is a complete transformers folder in float32 (``save_model``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import LorakitError
from .blocks import decoder_blocks
from .inject import matches_any

__all__ = ["select_trainable", "FullTuning", "TRAINED_FILE"]

TRAINED_FILE = "trained.safetensors"  # a checkpoint's trained tensors
_HALF = (torch.bfloat16, torch.float16)


def _params_under(model: nn.Module, paths: Sequence[str]) -> set[int]:
    """ids of every parameter in the modules at ``paths`` (tied parameters are one object)."""
    return {id(p) for path in paths for p in model.get_submodule(path).parameters()}


def _module_paths(scope: nn.Module, prefix: str, modules: list[str] | str | None) -> list[str]:
    """The paths (from the model's root) of ``scope``'s modules that match ``modules``; all of
    ``scope`` without a pattern."""
    if modules is None:
        return [prefix]
    full = lambda n: f"{prefix}.{n}" if prefix and n else prefix or n  # noqa: E731
    return [full(n) for n, _ in scope.named_modules() if n and matches_any(modules, full(n))]


def _freeze_scope(model: nn.Module, freeze_layers: int) -> list[str]:
    """Paths of the decoder blocks a freeze run trains: the last ``freeze_layers`` (the first
    |N| when negative)."""
    found = decoder_blocks(model)
    if found is None:
        raise LorakitError("train.method freeze trains the last decoder blocks, and this model has no stack of "
                           "blocks lorakit can find; use train.method full with train.trainable_modules")
    stack, blocks = found
    n = len(blocks)
    if abs(freeze_layers) > n:
        raise LorakitError(f"train.freeze_layers is {freeze_layers} and the model has {n} decoder blocks; "
                           f"give a number from 1 to {n} (negative: the first blocks)")
    chosen = range(n - freeze_layers, n) if freeze_layers > 0 else range(-freeze_layers)
    return [f"{stack}.{i}" for i in chosen]


def select_trainable(model: nn.Module, method: str, freeze_layers: int = 2, modules: list[str] | str | None = None,
                     freeze_embeddings: bool = False) -> list[str]:
    """The names (``named_parameters()``'s) of the parameters that train."""
    if method not in ("full", "freeze"):
        raise LorakitError(f"select_trainable is for train.method full or freeze, got {method!r}")
    scopes = [""] if method == "full" else _freeze_scope(model, freeze_layers)
    paths = [p for s in scopes for p in _module_paths(model.get_submodule(s), s, modules)]
    chosen = _params_under(model, paths) if paths else set()
    if method == "full" and freeze_embeddings:
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            layer = getattr(model, getter)() if hasattr(model, getter) else None
            chosen -= {id(p) for p in layer.parameters()} if layer is not None else set()
    names = [n for n, p in model.named_parameters() if id(p) in chosen]
    if not names:
        example = next((n for n, m in model.named_modules() if type(m) is nn.Linear), "")
        raise LorakitError(f"train.trainable_modules {modules!r} matches no module with weights"
                           + (" in the trained blocks" if method == "freeze" else "")
                           + (f"; module paths look like {example!r}" if example else ""))
    return names


class FullTuning:
    """A model whose own parameters ``names`` train (the others are frozen), in fp32 master weights."""

    output = "model"  # what a finished run writes into its folder (a LoRA run: "adapter")

    def __init__(self, model: nn.Module, names: Sequence[str], method: str = "full") -> None:
        self.model, self.method = model, method
        wanted = set(names)
        params = dict(model.named_parameters())
        missing = wanted - params.keys()
        if missing:
            raise LorakitError(f"the model has no parameters named {sorted(missing)[:3]}")
        for name, p in params.items():
            p.requires_grad_(name in wanted)
            if name in wanted and p.dtype in _HALF:
                p.data = p.data.float()  # master weights (a tied weight is one Parameter: converted once)
        self.names = [n for n in params if n in wanted]

    # ---- what a training run calls ---------------------------------------------------------
    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters()

    def train(self, mode: bool = True) -> "FullTuning":
        self.model.train(mode)
        return self

    def eval(self) -> "FullTuning":
        return self.train(False)

    def disable_adapter(self):
        """There is no adapter to switch off: the base's scores are taken before the first step."""
        return contextlib.nullcontext()

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.names}

    def trainable_report(self) -> tuple[str, dict]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        line = (f"{self.method} fine-tuning: trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / max(total, 1):.4f} (fp32 master weights)")
        return line, {}

    def save_pretrained(self, folder: str | os.PathLike, states=None) -> Path:
        """A checkpoint's part: the trained tensors as they are (fp32), under their parameter names."""
        from safetensors.torch import save_file

        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in self.trained_tensors().items()}, out / TRAINED_FILE,
                  metadata={"format": "pt", "method": self.method})
        return out

    def load_trained(self, folder: str | os.PathLike) -> None:
        """Put a checkpoint's trained tensors back (``save_pretrained``'s folder)."""
        from safetensors.torch import load_file

        path = Path(folder) / TRAINED_FILE
        if not path.is_file():
            raise LorakitError(f"{folder} has no {TRAINED_FILE}: it is not a checkpoint of a full or freeze run")
        saved = load_file(path)
        if set(saved) != set(self.names):
            raise LorakitError(f"{path} trains other parameters than this run ({len(saved)} saved, {len(self.names)} "
                               f"here): resume with the config the run started with")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)

    def save_model(self, folder: str | os.PathLike) -> Path:
        """The whole model as a transformers folder (safetensors), every float tensor in float32 —
        the trained weights exactly as trained — and ``dtype: float32`` in its config."""
        import json

        out = Path(folder)
        state = {k: v.float() if v.is_floating_point() else v for k, v in self.model.state_dict().items()}
        saved_dtype = getattr(self.model.config, "dtype", None)
        try:
            self.model.save_pretrained(out, state_dict=state)
        finally:
            self.model.config.dtype = saved_dtype  # save_pretrained records the first parameter's dtype
        config = json.loads((out / "config.json").read_text())
        config["dtype"] = "float32"
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out
