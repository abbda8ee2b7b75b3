"""Layer math against hand computations of W·x + s·B·A·x."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.embedding_conv import LoraConv2d, LoraEmbedding
from lorakit.core.layers import LoraLinear, lora_scaling


def _randomize_B(layer, name="default"):
    with torch.no_grad():
        layer.lora_B[name].normal_(0, 0.5)


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_hand_computation(rslora):
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=8, use_rslora=rslora)
    _randomize_B(layer)
    x = torch.randn(3, 5, 12)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    s = 8 / math.sqrt(4) if rslora else 8 / 4
    assert layer.scaling["default"] == pytest.approx(s)
    want = x @ base.weight.T + base.bias + s * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), s * B @ A)


@pytest.mark.parametrize("shape, autocast, bias", [((3, 5, 12), False, False), ((3, 5, 12), True, False),
                                                   ((5, 12), True, True), ((3, 5, 12), True, True)])
def test_update_added_into_the_base_output_in_place_with_its_gradients(shape, autocast, bias):
    # a plain Linear's fresh output takes s·B·A·x in place (no second (tokens × out) tensor) — not
    # where it is a view (a biased Linear of a 3-D input: autograd would copy it back whole); the
    # values and gradients are the formula's either way, under bf16 autocast too
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias).to(torch.bfloat16 if autocast else torch.float32)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=8)
    _randomize_B(layer)
    seen = []
    real_forward = base.forward
    base.forward = lambda x: seen.append(real_forward(x)) or seen[-1]
    x = torch.randn(*shape, dtype=base.weight.dtype, requires_grad=True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    in_place = len(shape) == 2 or not bias
    assert (out.data_ptr() == seen[0].data_ptr()) == in_place and out.dtype == base.weight.dtype
    grad = torch.randn_like(out)
    gx, gA, gB = torch.autograd.grad(out, (x, A, B), grad)
    dt = base.weight.dtype
    x64, A64, B64, W64 = x.detach().double(), A.detach().double(), B.detach().double(), base.weight.detach().double()
    want = x64 @ W64.T + (base.bias.double() if bias else 0) + 2 * (x64 @ A64.T @ B64.T)
    tol = dict(atol=0.05, rtol=0.02) if autocast else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.double(), want, **tol)
    g = grad.double().reshape(-1, 7)
    torch.testing.assert_close(gB.double(), 2 * g.T @ (x64.reshape(-1, 12) @ A64.T), **tol)
    torch.testing.assert_close(gA.double(), 2 * (g @ B64).T @ x64.reshape(-1, 12), **tol)
    torch.testing.assert_close(gx.double(), (g @ W64 + 2 * g @ B64 @ A64).reshape(shape), **tol)
    assert gA.dtype == gB.dtype == torch.float32


def test_a_base_output_a_hook_holds_is_left_as_it_was():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoraLinear(base)
    layer.add_adapter("default", r=4, alpha=8)
    _randomize_B(layer)
    held = []
    base.register_forward_hook(lambda mod, inp, out: held.append(out))
    x = torch.randn(2, 3, 12)
    out = layer(x)
    torch.testing.assert_close(held[0], F.linear(x, base.weight, base.bias))  # not the adapted output
    assert out.data_ptr() != held[0].data_ptr()


def test_conv1d_fan_in_fan_out_keeps_peft_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(nf=9, nx=6)  # weight (in=6, out=9)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    layer = LoraLinear(base, fan_in_fan_out=True)
    layer.add_adapter("default", r=3, alpha=6)
    _randomize_B(layer)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (3, 6) and B.shape == (9, 3)
    x = torch.randn(4, 6)
    want = x @ base.weight + base.bias + 2.0 * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-5)
    assert layer.delta_weight("default").shape == base.weight.shape


@pytest.mark.parametrize("rslora", [False, True])
def test_embedding_matches_hand_computation(rslora):
    torch.manual_seed(0)
    base = nn.Embedding(20, 8, padding_idx=0)
    layer = LoraEmbedding(base)
    layer.add_adapter("default", r=2, alpha=4, use_rslora=rslora)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (2, 20) and B.shape == (8, 2)
    assert torch.count_nonzero(A) == 0  # PEFT's embedding init: A zero, B normal
    with torch.no_grad():
        A.normal_()
    s = lora_scaling(2, 4, rslora)
    ids = torch.tensor([[0, 3, 19], [5, 5, 1]])
    want = base.weight[ids] + s * (A.T[ids] @ B.T)
    torch.testing.assert_close(layer(ids), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight("default"), s * (B @ A).T)


@pytest.mark.parametrize("rslora", [False, True])
def test_conv2d_matches_conv_with_updated_kernel(rslora):
    torch.manual_seed(0)
    base = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    layer = LoraConv2d(base)
    layer.add_adapter("default", r=2, alpha=3, use_rslora=rslora)
    _randomize_B(layer)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (2, 3, 3, 3) and B.shape == (6, 2, 1, 1)
    s = lora_scaling(2, 3, rslora)
    x = torch.randn(2, 3, 9, 9)
    kernel = base.weight + s * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A)
    want = F.conv2d(x, kernel, base.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: LoraLinear(nn.Linear(10, 6)),
    lambda: LoraEmbedding(nn.Embedding(10, 6)),
    lambda: LoraConv2d(nn.Conv2d(2, 4, 3)),
])
def test_fresh_adapter_is_bit_identical(make):
    torch.manual_seed(0)
    layer = make()
    x = torch.randint(0, 10, (3, 4)) if isinstance(layer, LoraEmbedding) else (
        torch.randn(2, 2, 7, 7) if isinstance(layer, LoraConv2d) else torch.randn(3, 10))
    before = layer.base_layer(x)
    layer.add_adapter("default", r=2, alpha=4)
    assert torch.equal(layer(x), before)


def test_gaussian_init_std_and_zero_B():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(512, 8))
    layer.add_adapter("g", r=8, alpha=8, init="gaussian")
    assert layer.lora_A["g"].std().item() == pytest.approx(1 / 8, rel=0.1)
    assert torch.count_nonzero(layer.lora_B["g"]) == 0


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_8"])
def test_pissa_keeps_output_and_takes_top_singular_directions(init):
    torch.manual_seed(0)
    base = nn.Linear(16, 12, bias=False)
    W = base.weight.detach().clone()
    x = torch.randn(5, 16)
    y0 = base(x)
    layer = LoraLinear(base)
    layer.add_adapter("p", r=4, alpha=8, init=init)
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)
    top = torch.linalg.svdvals(W)[:4]
    tol = 1e-4 if init == "pissa" else 3e-2  # svd_lowrank is an approximation
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight("p"))[:4], top, atol=tol, rtol=tol)
    torch.testing.assert_close(base.weight + layer.delta_weight("p"), W, atol=1e-5, rtol=1e-5)


def test_two_active_adapters_add_and_delete_restores():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8))
    layer.add_adapter("a", 2, 2)
    layer.add_adapter("b", 3, 6)
    _randomize_B(layer, "a")
    _randomize_B(layer, "b")
    x = torch.randn(4, 8)
    want = layer.base_layer(x) + x @ (layer.delta_weight("a") + layer.delta_weight("b")).T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    layer.delete_adapter("b")
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight("a").T, atol=1e-5, rtol=1e-5)


def test_merge_unmerge_roundtrip_and_half_precision_delta_in_fp32():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 32))
    layer.add_adapter("default", 4, 8)
    _randomize_B(layer)
    x = torch.randn(3, 32)
    y = layer(x)
    W0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)  # merged adapters are not added twice
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, W0, atol=1e-6, rtol=0)

    half = LoraLinear(nn.Linear(32, 32).to(torch.bfloat16))
    half.add_adapter("default", 4, 8)
    assert half.lora_A["default"].dtype == torch.float32  # fp32 adapters on a half base
    _randomize_B(half)
    want = (half.base_layer.weight.float() + half.delta_weight("default")).to(torch.bfloat16)
    half.merge()
    assert torch.equal(half.base_layer.weight, want)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 64))
    layer.add_adapter("default", 4, 8, dropout=0.5)
    _randomize_B(layer)
    x = torch.randn(8, 64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
