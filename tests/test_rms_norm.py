"""The lean RMSNorm (lorakit.ops.rms_norm): transformers' LlamaRMSNorm output bit for bit, its
gradients to rounding, only the input and the per-row rstd kept for backward, and only norms whose
forward is Llama's are switched."""

import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from lorakit.ops.rms_norm import lean_rms_norms, rms_norm

from conftest import tiny_llama


def test_gradients_match_the_float64_math():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    g = torch.randn(3, 5, 16)
    rms_norm(x, w, 1e-6).backward(g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    (w64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)).backward(g.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)


def _run(norm, x, g, lean):
    x = x.detach().requires_grad_()
    norm.zero_grad(set_to_none=True)
    y = rms_norm(x, norm.weight, norm.variance_epsilon) if lean else norm(x)
    y.backward(g)
    return y.detach(), x.grad, norm.weight.grad


def test_same_output_as_transformers_and_gradients_to_rounding():
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        nn.init.normal_(norm.weight)
        x = torch.randn(3, 7, 64, dtype=dtype) * 3
        g = torch.randn(3, 7, 64, dtype=dtype)
        ref, ref_gx, ref_gw = _run(norm, x, g, lean=False)
        out, gx, gw = _run(norm, x, g, lean=True)
        assert torch.equal(out, ref) and out.dtype == dtype
        torch.testing.assert_close(gx, ref_gx, atol=tol * ref_gx.abs().max().item(), rtol=tol)
        torch.testing.assert_close(gw, ref_gw, atol=tol * ref_gw.abs().max().item(), rtol=tol)


def test_backward_keeps_the_input_and_rstd_only():
    x = torch.randn(4, 10, 32, requires_grad=True)
    norm = LlamaRMSNorm(32)
    for lean, want in ((False, 2), (True, 1)):  # hidden-wide tensors kept: x and x·rstd -> x
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            rms_norm(x, norm.weight, norm.variance_epsilon) if lean else norm(x)
        wide = {t.untyped_storage().data_ptr() for t in saved if tuple(t.shape) == (4, 10, 32)}
        assert len(wide) == want
        assert any(tuple(t.shape) == (4, 10, 1) for t in saved)  # rstd


def test_only_llama_style_norms_switch_and_a_model_trains_the_same():
    mixed = nn.ModuleList([LlamaRMSNorm(8), Qwen2RMSNorm(8), GemmaRMSNorm(8)])
    with lean_rms_norms(mixed) as n:
        assert n == 2 and "forward" not in vars(mixed[2])  # Gemma's 1 + weight is not Llama's formula
    assert all("forward" not in vars(m) for m in mixed)  # the classes' own forward afterwards
    torch.manual_seed(0)
    model = tiny_llama()
    model.train()
    ids = torch.randint(3, 90, (2, 12))
    grads = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        if lean:
            with lean_rms_norms(model) as n:
                assert n == 5  # two per block (2 blocks) and the final norm
                loss = model(ids, labels=ids).loss
        else:
            loss = model(ids, labels=ids).loss
        loss.backward()
        grads.append((loss.item(), {k: p.grad for k, p in model.named_parameters()}))
    assert grads[0][0] == grads[1][0]
    for k, ref in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][k], ref, atol=1e-5, rtol=1e-4)


def test_adapters_keep_a_recipe_not_the_normalised_output_and_gradients_are_bit_identical(monkeypatch):
    import gc
    import weakref

    import lorakit.ops.rms_norm as rms

    from lorakit import LoraConfig, get_lora_model

    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=0.1))
    for layer in lm.model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"], std=0.05)
    lm.model.train()
    ids = torch.randint(3, 90, (2, 12))
    layer_norms = [(name, m) for name, m in lm.model.named_modules() if name.endswith("layernorm")]
    assert len(layer_norms) == 4  # input and post-attention norms of 2 blocks

    def run(recipes: bool):
        monkeypatch.setattr(rms, "activation_checkpointing", lambda model: not recipes)
        outputs = []
        handles = [m.register_forward_hook(lambda m, i, o, name=name: outputs.append((name, weakref.ref(o))))
                   for name, m in layer_norms]
        lm.model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout masks
        with lean_rms_norms(lm.model):
            loss = lm.model(ids, labels=ids).loss
            gc.collect()
            alive = [name for name, r in outputs if r() is not None]
            loss.backward()
        for h in handles:
            h.remove()
        return loss.item(), {k: p.grad.clone() for k, p in lm.model.named_parameters() if p.grad is not None}, alive

    kept_loss, kept_grads, kept_alive = run(recipes=False)
    loss, grads, alive = run(recipes=True)
    # the adapters' A gradients kept the outputs; now only the first norm's, whose input (the frozen
    # embedding's output) needs no gradient, so that nothing else keeps it and a recipe would save nothing
    assert len(kept_alive) == 4 and alive == ["model.layers.0.input_layernorm"]
    assert loss == kept_loss and grads.keys() == kept_grads.keys() and len(grads) == 28
    for k in grads:
        assert torch.equal(grads[k], kept_grads[k]), k  # the recomputed output is the same bits
