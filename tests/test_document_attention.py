"""Packed rows' attention on CPU in training (lorakit.ops.attention._DocumentAttention): the same
outputs and gradients as per-document SDPA, no attention across documents, and one output tensor
kept for backward that is also what o_proj reads."""

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.ops.attention import CPU_BF16_UPCAST_BELOW, packed_attention


def _reference(q, k, v, spans_per_row):
    rows = []
    for b, spans in enumerate(spans_per_row):
        parts = []
        for s, e in spans:
            qs, ks, vs = (t[b:b + 1, :, s:e].float() for t in (q, k, v))
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2)


def _inputs(dtype, T, lengths_per_row):
    torch.manual_seed(0)
    B = len(lengths_per_row)
    # transformers' layout: (B, T, H, D) memory seen as (B, H, T, D)
    q = torch.randn(B, T, 6, 16).transpose(1, 2).to(dtype).requires_grad_()
    k = torch.randn(B, T, 2, 16).transpose(1, 2).to(dtype).requires_grad_()
    v = torch.randn(B, T, 2, 16).transpose(1, 2).to(dtype).requires_grad_()
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    spans = []
    for row in lengths_per_row:
        starts = [sum(row[:i]) for i in range(len(row))]
        spans.append([(s, s + n) for s, n in zip(starts, row)])
    return q, k, v, positions, spans


def _run(q, k, v, fn):
    for t in (q, k, v):
        t.grad = None
    out = fn()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    (out.float() * g.float()).sum().backward()
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


def test_outputs_and_gradients_equal_per_document_sdpa():
    module = nn.Module().train()
    for dtype, tol, lengths in ((torch.float32, 1e-5, [[5, 20, 7], [32]]),
                                (torch.bfloat16, 2e-2, [[12, CPU_BF16_UPCAST_BELOW + 4]])):
        T = sum(lengths[0])
        q, k, v, positions, spans = _inputs(dtype, T, lengths)
        out, grads = _run(q, k, v, lambda: packed_attention(module, q, k, v, None, position_ids=positions)[0])
        ref, ref_grads = _run(q, k, v, lambda: _reference(q, k, v, spans))
        assert out.shape == (len(lengths), T, 6, 16)
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)


def test_documents_do_not_see_each_other():
    module = nn.Module().train()
    q, k, v, positions, _ = _inputs(torch.float32, 16, [[6, 10]])
    out = packed_attention(module, q, k, v, None, position_ids=positions)[0]
    out[0, 6:].sum().backward()  # the second document's outputs
    assert q.grad[0, :, :6].abs().sum() == 0 and k.grad[0, :, :6].abs().sum() == 0
    assert k.grad[0, :, 6:].abs().sum() > 0


def test_one_output_tensor_is_kept_and_returned():
    module = nn.Module().train()
    q, k, v, positions, _ = _inputs(torch.float32, 24, [[8, 16]])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = packed_attention(module, q, k, v, None, position_ids=positions)[0]
    wide = [t for t in saved if t.numel() == out.numel()]  # q and the output (k, v are narrower)
    assert len(wide) == 2 and any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in wide)
    assert out.is_contiguous()  # o_proj's reshape is a view of the kept tensor, not a copy
