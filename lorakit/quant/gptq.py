"""Error-compensating rounding for 4-bit bases (GPTQ, Frantar et al. 2022), in bitsandbytes' format.

Plain quantization rounds every weight to its nearest 4-bit level on its own. GPTQ rounds the
input columns of a layer one after another and moves each rounding error onto the columns not yet
rounded, weighted by how the layer's inputs correlate (H = XᵀX over calibration tokens), so that
the layer's *outputs* on such inputs change as little as possible. The result still lies on the
NF4 (or FP4) grid with one absmax scale per 64 consecutive weights of a row — exactly what
bitsandbytes stores — so the quantized layers, their kernels, sizes and saved adapters are the
same as with plain rounding; only which levels are picked differs.

``calibrated_quantize`` collects H for the linear layers from a few of the run's own training
rows, rounds each layer with ``gptq_round`` (or to nearest), and hands the rounded weight to
bitsandbytes; asked for a ``residual_rank``, it also keeps on each quantized layer the low-rank
correction of its output error that an EoRA-initialised adapter starts from (``lorakit.quant.eora``).
"""

from __future__ import annotations

import inspect
import time
from typing import Iterable

import torch
from torch import Tensor, nn

from ..config import QUANT_ROUNDINGS
from ..core.blocks import decoder_blocks
from ..errors import LorakitError
from .hessian import damped

__all__ = ["four_bit_code", "gptq_round", "collect_hessians", "calibrated_quantize", "BLOCK"]

BLOCK = 64  # bitsandbytes' 4-bit block: 64 consecutive weights of a row share one absmax scale


def four_bit_code(method: str) -> Tensor:
    """The 16 levels bitsandbytes uses for ``method`` (nf4 | fp4), sorted, in [-1, 1]."""
    from .bnb import require_bnb

    bnb = require_bnb()
    return bnb.functional.get_4bit_type(method, device="cpu").float().sort().values


def _round_to_code(x: Tensor, code: Tensor, mids: Tensor) -> Tensor:
    return code[torch.bucketize(x, mids)]


@torch.no_grad()
def gptq_round(weight: Tensor, hessian: Tensor, code: Tensor, damp: float = 0.01) -> Tensor:
    """``weight`` (out, in) rounded to ``code`` × per-block absmax, GPTQ style, for inputs whose
    second moment is ``hessian`` (in, in). Each block's scale is the absmax of its weights when the
    block is reached (errors already moved onto it included), and the weight that sets it keeps the
    ±1 level, so bitsandbytes' own absmax of the result is that scale and re-quantizing the result
    gives back exactly these levels. With an identity ``hessian`` this is plain nearest rounding."""
    out_f, in_f = weight.shape
    if in_f % BLOCK:
        raise LorakitError(f"GPTQ rounding needs in_features divisible by {BLOCK}, got {in_f}")
    dev = weight.device
    code = code.to(dev)
    mids = (code[1:] + code[:-1]) / 2
    W = weight.detach().float().clone()
    H = damped(hessian.to(dev), damp, torch.float32)
    # Upper Cholesky factor of H⁻¹: row i holds how column i's error spreads onto later columns.
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.empty_like(W)
    for b0 in range(0, in_f, BLOCK):
        b1 = b0 + BLOCK
        Wb, Ub, Eb = W[:, b0:b1].clone(), U[b0:b1, b0:b1], torch.empty(out_f, BLOCK, device=dev)
        scale = Wb.abs().amax(1).clamp_min(torch.finfo(torch.float32).tiny)
        keeper = Wb.abs().argmax(1)
        for i in range(BLOCK):
            w = Wb[:, i]
            level = _round_to_code((w / scale).clamp(-1.0, 1.0), code, mids)
            level = torch.where(keeper == i, torch.where(w < 0, -1.0, 1.0), level)
            q = level * scale
            Q[:, b0 + i] = q
            err = (w - q) / Ub[i, i]
            Wb[:, i:] -= err[:, None] * Ub[i, i:][None, :]
            Eb[:, i] = err
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    return Q.to(weight.dtype)


class _HessianHooks:
    """Forward pre-hooks summing XᵀX of the inputs of the named linear layers, while they are on.
    Layers fed the same tensor (q/k/v, gate/up) share one matrix."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.names, self.sums, self.alias = names, {}, {}
        self.last: list = [None, None]  # the previous hooked input (held: its memory is not reused) and its layer
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def pre(_module, args):
            x = args[0]
            if x is self.last[0]:  # siblings are called one after another on the same tensor
                self.alias[name] = self.alias.get(self.last[1], self.last[1])
                return
            self.last[:] = [x, name]
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            self.sums[name] = self.sums[name].addmm_(flat.T, flat) if name in self.sums else flat.T @ flat
        return pre

    def close(self, tokens: int) -> dict[str, Tensor]:
        """Remove the hooks; XᵀX / tokens for each named layer the inputs reached."""
        self.last[:] = [None, None]
        for h in self.handles:
            h.remove()
        means = {n: s.div_(max(tokens, 1)) for n, s in self.sums.items()}
        return {n: means[self.alias.get(n, n)] for n in self.names if self.alias.get(n, n) in means}


def collect_hessians(model: nn.Module, names: list[str], batches: Iterable) -> tuple[dict[str, Tensor], int]:
    """XᵀX / n of the inputs each named linear layer sees while ``model`` runs ``batches`` (packed
    rows with position_ids). Layers fed the same tensor (q/k/v, gate/up) share one matrix."""
    from ..ops.attention import packed_positions, use_packed_attention

    tokens = 0
    hooks = _HessianHooks(model, names)
    device = next(model.parameters()).device
    # Only the hooked inputs matter: where the model can, skip the output head on all but one token.
    out_head = getattr(model, "get_output_embeddings", lambda: None)()
    skip = "logits_to_keep" in inspect.signature(model.forward).parameters and all(
        model.get_submodule(n) is not out_head for n in names)
    head = {"logits_to_keep": 1} if skip else {}
    try:
        with use_packed_attention(model), torch.no_grad():
            for batch in batches:
                batch = batch.to(device)
                with packed_positions(batch.position_ids):
                    model(input_ids=batch.input_ids, position_ids=batch.position_ids, **head)
                tokens += batch.n_tokens
    finally:
        hessians = hooks.close(tokens)
    return hessians, tokens


def _quantize_layer(model: nn.Module, name: str, hessian: Tensor | None, spec, device, code: Tensor | None,
                    residual_rank: int) -> None:
    """Quantize layer ``name`` onto ``device``: GPTQ-rounded first when ``code`` is given (nearest
    otherwise), and with its EoRA correction attached when ``residual_rank`` > 0. A layer the
    calibration never reached (no ``hessian``) gets plain rounding and no correction."""
    from ..core.start import attach
    from .eora import residual_factors
    from ..core.inject import replace_module
    from .bnb import dequantize_weight, quantize_linear

    layer = model.get_submodule(name)
    weight = layer.weight.data
    if hessian is not None and code is not None:
        layer.weight.data = gptq_round(weight, hessian, code)
    quantized = quantize_linear(layer, spec, device)
    if hessian is not None and residual_rank > 0:
        attach(quantized, residual_factors(weight.to(quantized.weight.device), dequantize_weight(quantized), hessian,
                                           residual_rank))
    replace_module(model, name, quantized)


class _Caught(Exception):
    """Stops the model's forward at the first decoder block, once its inputs are taken."""


def _with_hidden(args: tuple, kwargs: dict, hidden: Tensor) -> tuple[tuple, dict]:
    return ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})


def _block_by_block(model: nn.Module, stack: tuple[str, nn.ModuleList], spec, batches: list, device,
                    code: Tensor | None, residual_rank: int) -> tuple[int, int]:
    """GPTQ one decoder block at a time: the first block's inputs are taken from the embeddings;
    each block is moved to ``device`` and run once on its inputs, which gives both its layers'
    input statistics and the next block's inputs; then its layers are rounded and quantized
    there (``code`` None: to nearest). Every layer is calibrated on the float model's activations
    (the same base as one pass of the whole model). Propagating the quantized blocks' outputs
    instead, as the GPTQ paper does, measured worse on the demo task (untrained NF4 base eval
    loss 1.539 against 1.492, after training 0.0148 against 0.0129). Only one float block is ever on ``device``; layers
    outside the blocks get plain rounding. Returns (layers quantized, calibration tokens)."""
    from ..ops.attention import packed_positions, use_packed_attention
    from .bnb import take_linears

    prefix, blocks = stack
    targets = take_linears(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    for name, module in model.named_modules():  # everything but the blocks goes to the device now
        if name != prefix and not name.startswith(prefix + "."):
            for key, p in module._parameters.items():
                if p is not None:
                    p.data = p.data.to(device)
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = b.to(device)

    inputs: list = []  # (args, kwargs, position_ids) of the first block, per row

    def catch(_module, args, kwargs):
        inputs.append((args, kwargs))
        raise _Caught

    tokens = 0
    with use_packed_attention(model), torch.no_grad():
        handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for batch in batches:
                batch = batch.to(device)
                with packed_positions(batch.position_ids):
                    try:
                        model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
                    except _Caught:
                        pass
                inputs[-1] = (*inputs[-1], batch.position_ids)
                tokens += batch.n_tokens
        finally:
            handle.remove()
        for i, block in enumerate(blocks):
            block.to(device)
            names = [t for t in targets if t.startswith(f"{prefix}.{i}.")]
            hooks = _HessianHooks(model, names)
            try:  # one pass: the block's input statistics, and its float outputs for the next block
                for j, (args, kwargs, positions) in enumerate(inputs):
                    with packed_positions(positions):
                        out = block(*args, **kwargs)
                    inputs[j] = (*_with_hidden(args, kwargs, out[0] if isinstance(out, tuple) else out), positions)
            finally:
                hessians = hooks.close(tokens)
            for name in names:
                _quantize_layer(model, name, hessians.pop(name, None), spec, device, code, residual_rank)
    for name in targets:  # outside the blocks (rare): plain rounding, no correction
        if type(model.get_submodule(name)) is nn.Linear:
            _quantize_layer(model, name, None, spec, device, code, residual_rank)
    return len(targets), tokens


def calibrated_quantize(model: nn.Module, spec, batches: list, device=None, budget_bytes: int = 1 << 30,
                        by_block: bool = True, rounding: str = "gptq", residual_rank: int = 0) -> dict[str, float]:
    """Quantize ``model`` like ``quant.quantize_model``, rounding each 4-bit layer with GPTQ
    (``rounding="gptq"``) or to nearest on inputs from ``batches``, onto ``device``; with
    ``residual_rank`` r > 0, each layer keeps the rank-r EoRA correction of its output error for
    ``LoraConfig(init="eora")`` (``lorakit.quant.eora``). Models with a stack of decoder blocks go one block
    at a time (the float model may stay on the CPU: only one float block is on ``device`` at a
    time, and the calibration rows run through the model once). Otherwise, or with
    ``by_block=False``, layers are taken in groups whose input matrices fit ``budget_bytes``, each
    calibrated by running the whole model as it is by then (earlier groups quantized). Returns
    {layers, tokens, seconds}."""
    from .bnb import release_freed_memory, quantize_model, require_bnb

    if spec.method not in ("nf4", "fp4"):
        raise LorakitError(f"calibrated quantization (GPTQ rounding, EoRA init) works with nf4 or fp4, not {spec.method!r}")
    if rounding not in QUANT_ROUNDINGS:
        raise LorakitError(f"rounding must be one of {', '.join(QUANT_ROUNDINGS)}, got {rounding!r}")
    if not batches:
        raise LorakitError("calibrated quantization (GPTQ rounding, EoRA init) needs calibration rows, and the "
                           "training data has none")
    require_bnb()
    t0 = time.perf_counter()
    code = four_bit_code(spec.method) if rounding == "gptq" else None
    stack = decoder_blocks(model, conv1d=False) if by_block else None
    if stack is not None:
        layers, tokens = _block_by_block(model, stack, spec, batches, device, code, residual_rank)
        release_freed_memory()
        return {"layers": layers, "tokens": tokens, "seconds": time.perf_counter() - t0}
    if device is not None:
        model.to(device)  # the whole model runs for each group
    tokens = 0

    def quantize_group(names: list[str]) -> None:
        nonlocal tokens
        hessians, tokens = collect_hessians(model, names, batches)
        for name in names:
            _quantize_layer(model, name, hessians.pop(name, None), spec, device, code, residual_rank)

    layers = quantize_model(model, spec, device, quantize_group=quantize_group, group_bytes=budget_bytes)
    return {"layers": layers, "tokens": tokens, "seconds": time.perf_counter() - t0}
