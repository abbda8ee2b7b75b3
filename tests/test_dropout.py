"""The adapters' dropout (lorakit.core.dropout): a hashed mask that is a pure function of (shape, p,
seed), drops the asked fraction independently, is the one nn.Dropout would apply in expectation,
gives exact gradients, keeps no mask for backward (recomputed from its seed), and one mask per q/k/v group."""

import math

import torch
from torch import nn

from lorakit import LoraConfig, get_lora_model
from lorakit.core.dropout import draw_seed, dropped_linear, float_keep_mask, keep_mask, quantized_probability
from lorakit.core.layers import LoraLinear

from conftest import tiny_llama


def _reference_words(count: int, seed: int) -> list[int]:
    """The hash in plain Python integers (two's-complement int32 at every step)."""
    def i32(v):
        v &= 0xFFFFFFFF
        return v - (1 << 32) if v >> 31 else v

    out = []
    for i in range(count):
        v = i32(i32(i * 0x9E3779B1) + seed)
        v = i32(v ^ ((v >> 16) & 0xFFFF))
        v = i32(v * 0x7FEB352D)
        v = i32(v ^ ((v >> 15) & 0x1FFFF))
        v = i32(v * 0x846CA68B)
        out.append(i32(v ^ ((v >> 16) & 0xFFFF)))
    return out


def test_the_mask_is_the_documented_hash_on_this_platform():
    p, seed, shape = 0.3, 123456789, (5, 7)  # 35 elements: 18 words, the last half unused
    words = _reference_words(18, seed)
    draws = [h for w in words for h in ((w & 0x7FFF), (w >> 16) & 0x7FFF)]  # 15 bits of each little-endian half
    threshold = round(p * 32768)
    want = torch.tensor([d >= threshold for d in draws[:35]]).view(shape)
    assert torch.equal(keep_mask(shape, p, seed), want)
    assert torch.equal(keep_mask(shape, p, seed), keep_mask(shape, p, seed))


def test_the_float_mask_is_the_bool_mask_in_every_dtype():
    for shape, p in (((5, 7), 0.3), ((64, 33), 0.05), ((2, 3, 1537), 0.5)):  # odd counts: a half word unused
        keep = keep_mask(shape, p, 4242)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
            got = float_keep_mask(shape, p, 4242, dtype)
            assert got.dtype == dtype and got.shape == keep.shape
            assert torch.equal(got, keep.to(dtype)), (shape, dtype)


def test_the_mask_drops_the_asked_fraction_independently():
    n = 1 << 20
    for p in (0.05, 0.3):
        q = quantized_probability(p)
        assert abs(q - p) <= 1 / 65536  # half a step of 1/32768
        drop = ~keep_mask((n,), p, 7)
        sd = math.sqrt(q * (1 - q) / n)
        assert abs(drop.float().mean().item() - q) < 5 * sd
        both = (drop[1:] & drop[:-1]).float().mean().item()  # neighbours, incl. the two halves of a word
        assert abs(both - q * q) < 5 * math.sqrt(q * q / n)
        other = ~keep_mask((n,), p, 8)  # the next seed: an independent mask
        assert abs((drop & other).float().mean().item() - q * q) < 5 * math.sqrt(q * q / n)
        rows = drop.view(1024, 1024).float().mean(1)  # no row or column pattern
        cols = drop.view(1024, 1024).float().mean(0)
        for part in (rows, cols):
            assert (part - q).abs().max() < 6 * math.sqrt(q * (1 - q) / 1024)


def test_dropped_linear_is_dropout_then_matmul_with_exact_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 10, requires_grad=True)
    A = torch.randn(4, 10, requires_grad=True)
    q = quantized_probability(0.3)
    h = dropped_linear(x, A, 0.3, seed=99)
    x2, A2 = x.detach().clone().requires_grad_(), A.detach().clone().requires_grad_()
    h2 = (torch.where(keep_mask(x.shape, q, 99), x2, 0) / (1 - q)) @ A2.t()
    g = torch.randn_like(h2)
    (h * g).sum().backward()
    (h2 * g).sum().backward()
    torch.testing.assert_close(h, h2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(A.grad, A2.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(dropped_linear(x, A, 0.0), x @ A.t())  # p = 0: a plain matmul
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hb = dropped_linear(x, A, 0.3, seed=99)
    assert hb.dtype == torch.bfloat16  # as F.linear under autocast
    torch.testing.assert_close(hb.float(), h2, atol=0.1, rtol=0.02)
    (hb.float() * g).sum().backward()  # backward runs in bf16 and gives fp32 gradients to fp32 A
    assert A.grad.dtype == torch.float32


def test_backward_keeps_x_and_a_not_the_mask_or_a_dropped_copy():
    x = torch.randn(64, 32, requires_grad=True)
    A = torch.randn(4, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        dropped_linear(x, A, 0.1, seed=1)
    assert sorted((str(t.dtype), tuple(t.shape)) for t in saved) == sorted(
        [("torch.float32", (64, 32)), ("torch.float32", (4, 32))])  # the mask is recomputed from the seed
    assert any(t is x for t in saved)  # x itself, not a copy


def test_the_expectation_is_the_undropped_output():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 16))
    layer.add_adapter("default", 4, 8, dropout=0.3)
    nn.init.normal_(layer.lora_B["default"], std=0.1)
    x = torch.randn(6, 32)
    layer.eval()
    plain = layer(x)
    layer.train()
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    delta = (plain - layer.base_layer(x)).abs().mean()
    assert (mean - plain).abs().max() < 0.05 * delta.item() + 1e-3
    assert not torch.equal(layer(x), layer(x))


def test_seeded_runs_repeat_and_q_k_v_share_one_mask():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.2, target_modules=["q_proj", "k_proj", "v_proj"]))
    attn = lm.model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        nn.init.normal_(proj.lora_B["default"], std=0.1)
    lm.model.train()
    x = torch.randn(2, 5, 64)
    torch.manual_seed(3)
    seed = draw_seed()  # the draw the group makes
    torch.manual_seed(3)
    outs = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)]
    q = quantized_probability(0.2)
    dropped = torch.where(keep_mask(x.shape, q, seed), x, 0) / (1 - q)
    for proj, out in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs):
        A, B = proj.lora_A["default"], proj.lora_B["default"]
        want = proj.base_layer(x) + 2.0 * (dropped @ A.t()) @ B.t()
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.manual_seed(3)
    again = lm.model(torch.randint(3, 90, (1, 8))).logits
    torch.manual_seed(3)
    assert torch.equal(lm.model(torch.randint(3, 90, (1, 8))).logits, again)
