"""Error-compensating rounding for 4-bit bases (GPTQ, Frantar et al. 2022), in bitsandbytes' format.

Plain quantization rounds every weight to its nearest 4-bit level on its own. GPTQ rounds the
input columns of a layer one after another and moves each rounding error onto the columns not yet
rounded, weighted by how the layer's inputs correlate (H = XᵀX over calibration tokens), so that
the layer's *outputs* on such inputs change as little as possible. The result still lies on the
NF4 (or FP4) grid with one absmax scale per 64 consecutive weights of a row — exactly what
bitsandbytes stores — so the quantized layers, their kernels, sizes and saved adapters are the
same as with plain rounding; only which levels are picked differs.

``calibrated_quantize`` collects H for the linear layers from a few of the run's own training
rows, rounds each layer with ``gptq_round``, and hands the rounded weight to bitsandbytes.
"""

from __future__ import annotations

import inspect
import time
from typing import Iterable

import torch
from torch import Tensor, nn

from .errors import LorakitError

__all__ = ["four_bit_code", "gptq_round", "collect_hessians", "calibrated_quantize", "BLOCK"]

BLOCK = 64  # bitsandbytes' 4-bit block: 64 consecutive weights of a row share one absmax scale


def four_bit_code(method: str) -> Tensor:
    """The 16 levels bitsandbytes uses for ``method`` (nf4 | fp4), sorted, in [-1, 1]."""
    from .quant import require_bnb

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
    H = hessian.detach().to(dev, torch.float32).clone()
    dead = H.diagonal() == 0  # inputs never non-zero in calibration: their weights cannot matter there
    H[dead, dead] = 1.0
    H += damp * H.diagonal().mean() * torch.eye(in_f, device=dev)
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


@torch.no_grad()
def collect_hessians(model: nn.Module, names: list[str], batches: Iterable) -> tuple[dict[str, Tensor], int]:
    """XᵀX / n of the inputs each named linear layer sees while ``model`` runs ``batches`` (packed
    rows with position_ids). Layers fed the same tensor (q/k/v, gate/up) share one matrix."""
    from .attention import packed_positions, use_packed_attention

    sums: dict[str, Tensor] = {}
    alias: dict[str, str] = {}
    last: list = [None, None]  # the previous hooked layer's input tensor (held: its memory is not reused) and name
    tokens = 0

    def hook(name):
        def pre(_module, args):
            x = args[0]
            if x is last[0]:  # q/k/v, gate/up: siblings are called one after another on the same tensor
                alias[name] = alias.get(last[1], last[1])
                return
            last[:] = [x, name]
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            sums[name] = sums[name].addmm_(flat.T, flat) if name in sums else flat.T @ flat
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    device = next(model.parameters()).device
    # Only the hooked inputs matter: where the model can, skip the output head on all but one token.
    out_head = getattr(model, "get_output_embeddings", lambda: None)()
    skip = "logits_to_keep" in inspect.signature(model.forward).parameters and all(
        model.get_submodule(n) is not out_head for n in names)
    head = {"logits_to_keep": 1} if skip else {}
    try:
        with use_packed_attention(model):
            for batch in batches:
                batch = batch.to(device)
                with packed_positions(batch.position_ids):
                    model(input_ids=batch.input_ids, position_ids=batch.position_ids, **head)
                tokens += batch.n_tokens
    finally:
        last[:] = [None, None]
        for h in handles:
            h.remove()
    means = {n: s.div_(max(tokens, 1)) for n, s in sums.items()}
    return {n: means[alias.get(n, n)] for n in names if alias.get(n, n) in means}, tokens


def calibrated_quantize(model: nn.Module, spec, batches: list, device=None,
                        budget_bytes: int = 1 << 30) -> dict[str, float]:
    """Quantize ``model`` like ``quant.quantize_model``, rounding each 4-bit layer with GPTQ on
    inputs from ``batches``. Layers are taken in groups whose input matrices fit ``budget_bytes``;
    a group is calibrated on the model as it is by then (earlier groups already quantized, as in
    GPTQ's layer-by-layer order). Returns {layers, tokens, seconds}."""
    from .quant import quantize_model

    if spec.method not in ("nf4", "fp4"):
        raise LorakitError(f"model.quant_rounding gptq works with nf4 or fp4, not {spec.method!r}")
    if not batches:
        raise LorakitError("model.quant_rounding gptq needs calibration rows, and the training data has none")
    t0 = time.perf_counter()
    code = four_bit_code(spec.method)
    tokens = 0

    def round_group(names: list[str]) -> None:
        nonlocal tokens
        hessians, tokens = collect_hessians(model, names, batches)
        for name in names:
            layer = model.get_submodule(name)
            if name in hessians:  # a layer the calibration never reached keeps plain rounding
                layer.weight.data = gptq_round(layer.weight.data, hessians.pop(name), code)

    layers = quantize_model(model, spec, device, round_group=round_group, group_bytes=budget_bytes)
    return {"layers": layers, "tokens": tokens, "seconds": time.perf_counter() - t0}
