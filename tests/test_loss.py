"""Label-only chunked loss equals the plain loss, gradients included; packing isolates examples."""

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapters, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, get_lora_model
from lorakit.ops.attention import use_packed_attention, packed_positions
from lorakit.data.packing import collate, collate_packed, collate_padded, pack_rows, padded_length, rounded_length
from lorakit.data.templates import Encoded
from lorakit.ops.loss import causal_lm_loss_sum, linear_cross_entropy_sum


@pytest.mark.parametrize("with_bias, train_weight", [(False, False), (True, True)])
def test_linear_cross_entropy_matches_plain(with_bias, train_weight):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=train_weight)
    b = torch.randn(50, requires_grad=train_weight) if with_bias else None
    t = torch.randint(0, 50, (37,))
    ours = linear_cross_entropy_sum(h, w, b, t, chunk=8)
    ref = F.cross_entropy(F.linear(h, w, b), t, reduction="sum")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    g_ours = torch.autograd.grad(ours * 0.5, [x for x in (h, w, b) if x is not None and x.requires_grad])
    g_ref = torch.autograd.grad(ref * 0.5, [x for x in (h, w, b) if x is not None and x.requires_grad])
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_kind", ["plain", "lora_head", "full_head"])
def test_model_loss_and_grads_equal_transformers_loss(head_kind, ids):
    targets = ["q_proj", "v_proj"] + (["lm_head"] if head_kind == "lora_head" else [])
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=targets,
                                                modules_to_save=["lm_head"] if head_kind == "full_head" else None))
    randomize_adapters(m)
    labels = ids.clone()
    labels[:, :5] = -100
    total, n = causal_lm_loss_sum(m.model, ids, labels, chunk=7)
    ref = m.model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(total / n, ref, atol=1e-5, rtol=1e-5)
    params = [p for p in m.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(total / n, params)
    g2 = torch.autograd.grad(m.model(input_ids=ids, labels=labels).loss, params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def _examples(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 90, (n,), generator=g).tolist()
        labels = [-100] * (n // 2) + ids[n // 2:]
        out.append(Encoded(ids, labels))
    return out


def test_pack_rows_best_fit():
    rows = pack_rows([7, 5, 4, 3, 3, 2, 1], 8)
    assert sorted(sum(([i] for row in rows for i in row), [])) == list(range(7))
    assert all(sum([7, 5, 4, 3, 3, 2, 1][i] for i in row) <= 8 for row in rows)
    assert len(rows) == 4  # 25 tokens in rows of 8: 4 is the minimum


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_packed_loss_equals_unpacked_per_example(make):
    m = get_lora_model(make(), LoraConfig(r=4))
    randomize_adapters(m)
    exs = _examples([9, 6, 12, 5])
    batch = collate_packed([[0, 1], [2, 3]], exs, pad_id=0)
    with use_packed_attention(m.model), packed_positions(batch.position_ids):
        packed, n_packed = causal_lm_loss_sum(m.model, batch.input_ids, batch.labels, batch.position_ids)
    alone, n_alone = 0.0, 0
    for e in exs:
        s, n = causal_lm_loss_sum(m.model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
        alone, n_alone = alone + s, n_alone + n
    assert n_packed == n_alone
    torch.testing.assert_close(packed / n_packed, alone / n_alone, atol=1e-5, rtol=1e-5)
    assert m.model.config._attn_implementation != "lorakit_packed"  # restored after the block


def test_rows_padded_to_a_few_lengths_change_no_loss():
    # an eighth of the power of two (at least 8 tokens), never past max(T, max_len)
    assert [padded_length(t, 1024) for t in (5, 20, 100, 513, 990, 1024)] == [8, 24, 104, 576, 1024, 1024]
    assert [padded_length(t, 837) for t in (700, 830, 833)] == [704, 832, 837] and padded_length(990, None) == 990
    m = get_lora_model(tiny_llama(), LoraConfig(r=4))
    randomize_adapters(m)
    exs = _examples([9, 6, 12, 5])
    plain, padded = (collate_packed([[0, 1], [2, 3]], exs, pad_id=0, max_len=n) for n in (None, 64))
    assert plain.input_ids.shape == (2, 17) and padded.input_ids.shape == (2, 24)
    assert (padded.n_tokens, padded.n_labels) == (plain.n_tokens, plain.n_labels)
    assert (padded.labels[:, 17:] == -100).all() and (padded.doc_ids[:, 17:] == -1).all()
    assert padded.position_ids[0, 15:].tolist() == list(range(9))  # the tail is a document of its own
    losses = []
    for b in (plain, padded):
        with use_packed_attention(m.model), packed_positions(b.position_ids):
            losses.append(causal_lm_loss_sum(m.model, b.input_ids, b.labels, b.position_ids)[0])
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    assert collate([0, 2], exs, False, 0, max_len=64).input_ids.shape == (2, 12)  # rows of one example: as long as the longest


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_an_unpacked_group_run_padding_free_trains_as_its_padded_rows(make):
    # what the training loop runs for packing false: the group in one row, per-document attention
    m = get_lora_model(make(), LoraConfig(r=4))
    randomize_adapters(m)
    exs = _examples([9, 30, 5, 12])
    free = collate([0, 1, 2, 3], exs, False, 0, max_len=32, padding_free=True)
    padded = collate_padded([0, 1, 2, 3], exs, 0)
    assert free.input_ids.shape == (1, rounded_length(56)) == (1, 56) and free.attention_mask is None
    assert padded.input_ids.numel() == 4 * 30  # 64 of its 120 positions are padding
    assert (free.n_tokens, free.n_labels) == (padded.n_tokens, padded.n_labels) == (56, 29)
    params = [p for p in m.parameters() if p.requires_grad]
    with use_packed_attention(m.model), packed_positions(free.position_ids):
        s_free, n_free = causal_lm_loss_sum(m.model, free.input_ids, free.labels, free.position_ids)
        g_free = torch.autograd.grad(s_free, params)
    s_pad, n_pad = causal_lm_loss_sum(m.model, padded.input_ids, padded.labels, padded.position_ids, padded.attention_mask)
    g_pad = torch.autograd.grad(s_pad, params)
    assert n_free == n_pad == 29
    torch.testing.assert_close(s_free, s_pad, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_free, g_pad):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert collate([0, 1, 2], exs, False, 0, padding_free=True).input_ids.shape == (1, rounded_length(44)) == (1, 48)
    # the rounding never makes a row longer than the group's rows of max_len (what the memory fit counts)
    assert collate([1], exs, False, 0, max_len=30, padding_free=True).input_ids.shape == (1, 30)
