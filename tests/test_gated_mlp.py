"""The lean SwiGLU (lorakit.ops.gated_mlp): the model's outputs and gradients unchanged, two
intermediate-wide tensors per block fewer kept for backward, the model's own forward back after."""

import copy
import gc
import weakref

import torch

from lorakit import LoraConfig, get_lora_model
from lorakit.ops import gated_mlp
from lorakit.ops.gated_mlp import lean_gated_mlps, silu_mul

from conftest import tiny_llama


def test_silu_mul_gradients_equal_autograd():
    torch.manual_seed(0)
    g, u = torch.randn(5, 9, dtype=torch.float64, requires_grad=True), torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(silu_mul, (g, u))


def _grads(model, ids, lean, monkeypatch):
    model.zero_grad(set_to_none=True)
    products = []  # weak references to each block's silu(gate)·up
    original = gated_mlp.silu_mul

    def recording(gate, up):
        out = original(gate, up)
        products.append(weakref.ref(out))
        return out

    monkeypatch.setattr(gated_mlp, "silu_mul", recording)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if lean:
            with lean_gated_mlps(model) as n:
                assert n == 2  # one per decoder block
                logits = model(ids).logits
        else:
            logits = model(ids).logits
    gc.collect()
    # (batch, tokens, intermediate_size) activations kept outside down_proj, and products still alive
    wide = {t.untyped_storage().data_ptr() for t in saved
            if t.dtype == torch.float32 and tuple(t.shape) == (*ids.shape, 128)}
    alive = sum(r() is not None for r in products)
    saved.clear()
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(wide), alive


def test_outputs_and_gradients_unchanged_with_two_tensors_less_per_block(monkeypatch):
    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    for layer in lm.model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"], std=0.05)
    lm.model.train()
    ids = torch.randint(3, 90, (2, 10))
    torch.manual_seed(1)
    ref, ref_grads, ref_wide, _ = _grads(lm.model, ids, lean=False, monkeypatch=monkeypatch)
    torch.manual_seed(1)  # the same dropout masks
    out, grads, wide, alive = _grads(lm.model, ids, lean=True, monkeypatch=monkeypatch)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 28
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-6, rtol=1e-6)
    # per block: gate, silu(gate), up, product -> gate, up (kept by silu_mul); the product that
    # down_proj's adapter reads is kept as a recipe over them, so after forward nothing holds it
    assert (ref_wide, wide, alive) == (8, 4, 0)
    mlp = lm.model.model.layers[0].mlp
    assert "forward" not in vars(mlp)  # the model's own forward afterwards
    clone = copy.deepcopy(lm.model)
    with lean_gated_mlps(clone):
        assert clone.model.layers[0].mlp.forward.__self__ is clone.model.layers[0].mlp


def test_under_activation_checkpointing_the_product_is_kept_not_a_recipe():
    # a recipe would keep gate and up alive past the checkpoint, which drops them
    model = tiny_llama()
    with lean_gated_mlps(model):
        assert model.model.layers[0].mlp._lorakit_keep_product is False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with lean_gated_mlps(model):
        assert model.model.layers[0].mlp._lorakit_keep_product is True
    assert "_lorakit_keep_product" not in vars(model.model.layers[0].mlp)


def test_backward_computes_silu_once_per_block(monkeypatch):
    # the product's recipe (for down_proj's adapter) computes silu(gate); silu_mul's backward, which
    # runs next, takes it instead of computing it again
    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    lm.model.train()
    with lean_gated_mlps(lm.model):
        loss = lm.model(torch.randint(3, 90, (2, 10))).logits.square().mean()
    calls = []
    real = gated_mlp.F.silu
    monkeypatch.setattr(gated_mlp.F, "silu", lambda t, *a, **k: calls.append(t.shape) or real(t, *a, **k))
    loss.backward()
    assert len(calls) == 2  # one per decoder block (it was two per block)
