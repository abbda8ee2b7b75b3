"""Sibling projections that read the same input (q/k/v, gate/up) run their A factors as one
matmul: same outputs and gradients as separate layers, with one dropout mask per group, and no
sharing where the siblings do not actually share the input (cross-attention)."""

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import lorakit.core.shared_input as shared_input
from lorakit import LoraConfig, get_lora_model
from lorakit.core.dropout import dropped_linear
from lorakit.core.inject import lora_layers

from conftest import tiny_llama


def _groups(model):
    return {id(layer.shared_input): layer.shared_input for _, layer in lora_layers(model)
            if getattr(layer, "shared_input", None) is not None}


def _count_stacked_matmuls(monkeypatch):
    calls = []

    def linear(x, w, *a):
        calls.append(w.shape[0])
        return F.linear(x, w, *a)

    monkeypatch.setattr(shared_input, "F", SimpleNamespace(linear=linear))
    return calls


def _forward_backward(model, x):
    model.zero_grad(set_to_none=True)
    logits = model(x).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


def test_grouped_a_matmuls_equal_separate_layers(monkeypatch):
    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    for _, layer in lora_layers(lm.model):
        torch.nn.init.normal_(layer.lora_B["default"], std=0.05)  # a non-zero update, so every path matters
    groups = _groups(lm.model)
    assert len(groups) == 4  # per layer: q/k/v and gate/up
    separate = copy.deepcopy(lm.model)
    for g in _groups(separate).values():
        g.enabled = False
    lm.model.train(), separate.train()
    x = torch.randint(3, 90, (2, 12))
    calls = _count_stacked_matmuls(monkeypatch)
    ours, our_grads = _forward_backward(lm.model, x)
    assert sorted(calls) == [8, 8, 12, 12]  # one stacked X·Aᵀ per group: 2×4 rows (gate/up), 3×4 (q/k/v)
    assert all(g.enabled and not g._cache for g in groups.values())  # nothing held after the forward
    calls.clear()
    ref, ref_grads = _forward_backward(separate, x)
    assert calls == []
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    assert our_grads.keys() == ref_grads.keys() and len(our_grads) == 28  # 2 layers × 7 projections × (A, B)
    for k in ref_grads:
        torch.testing.assert_close(our_grads[k], ref_grads[k], atol=1e-6, rtol=1e-5)


def test_dropout_shares_one_stacked_matmul_per_group(monkeypatch):
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    assert len(_groups(lm.model)) == 4
    calls = []

    def dropped(x, A, p):
        calls.append((A.shape[0], p))
        return dropped_linear(x, A, p)

    monkeypatch.setattr(shared_input, "dropped_linear", dropped)
    lm.model.train()
    lm.model(torch.randint(3, 90, (1, 8)))
    assert sorted(calls) == [(8, 0.1), (8, 0.1), (12, 0.1), (12, 0.1)]  # one mask for q/k/v, one for gate/up
    calls.clear()
    attn = lm.model.model.layers[0].self_attn
    attn.v_proj.lora_dropout["default"].p = 0.2  # siblings that drop differently each run alone
    lm.model(torch.randint(3, 90, (1, 8)))
    assert sorted(calls) == [(8, 0.1), (8, 0.1), (12, 0.1)]
    calls.clear()
    lm.model.eval()  # no dropout in eval mode: the plain stacked matmul
    lm.model(torch.randint(3, 90, (1, 8)))
    assert calls == []


class _CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(16, 16, bias=False) for _ in range(3))

    def forward(self, x, memory):
        return self.q_proj(x) + self.k_proj(memory) + self.v_proj(memory)


def test_siblings_fed_different_inputs_switch_the_group_off():
    torch.manual_seed(0)
    model = nn.Sequential(_CrossAttention())
    lm = get_lora_model(model, LoraConfig(r=2, alpha=2, target_modules=["q_proj", "k_proj", "v_proj"]))
    attn = lm.model[0]
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        torch.nn.init.normal_(proj.lora_B["default"])
    (group,) = _groups(lm.model).values()
    x, memory = torch.randn(3, 16), torch.randn(3, 16)

    def expected(proj, inp):
        A, B = proj.lora_A["default"], proj.lora_B["default"]
        return inp @ proj.base_layer.weight.t() + (inp @ A.t()) @ B.t()

    for _ in range(2):
        out = lm.model[0](x, memory)
        ref = expected(attn.q_proj, x) + expected(attn.k_proj, memory) + expected(attn.v_proj, memory)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not group.enabled


def test_a_model_copies_with_a_filled_cache():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    attn = lm.model.model.layers[0].self_attn
    x = torch.randn(1, 3, 64)
    attn.q_proj(x)  # k and v have not read it yet: the group holds a weak reference to x
    (group,) = {id(attn.q_proj.shared_input): attn.q_proj.shared_input}.values()
    assert group._cache
    clone = copy.deepcopy(lm.model)
    copied = clone.model.layers[0].self_attn
    assert copied.q_proj.shared_input is copied.k_proj.shared_input is not group
    assert copied.q_proj.shared_input.layers[0] in (copied.q_proj, copied.k_proj, copied.v_proj)
    assert not copied.q_proj.shared_input._cache
