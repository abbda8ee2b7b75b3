"""The frozen base matmul: the same numbers as F.linear, each shape's faster way chosen only
when it gives the same bits."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import lorakit.ops.frozen_matmul as fm
from lorakit import LoraConfig, get_lora_model
from conftest import VOCAB


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(fm, "_decided", {})
    monkeypatch.setattr(fm, "_verdicts", {})
    monkeypatch.setattr(fm, "_trials", {})
    return fm


class _Clock:
    """perf_counter for tuned_mm's trials: each call of the single matmul takes ``whole`` s, the
    halves ``halves`` s (the calls alternate t0, t1, t2 per trial)."""

    def __init__(self, whole: float, halves: float) -> None:
        self.t, self.steps = 0.0, itertools.cycle([0.0, whole, halves])

    def perf_counter(self) -> float:
        self.t += next(self.steps)
        return self.t


def test_tuned_mm_is_the_matmul_and_decides_each_shape_after_its_trials(fresh):
    torch.manual_seed(0)
    a, w = torch.randn(300, 64), torch.randn(256, 64)
    for i in range(fm._TRIALS + 3):
        assert torch.equal(fm.tuned_mm(a, w.t()), a @ w.t())
        assert (len(fm.decided_shapes()) == 1) == (i >= fm._TRIALS)
    small = torch.randn(8, 64)
    assert torch.equal(fm.tuned_mm(small, w.t()), small @ w.t()) and len(fm.decided_shapes()) == 1  # too small to try


@pytest.mark.parametrize("whole, halves, same, split", [(1.0, 0.5, True, True), (1.0, 0.95, True, False),
                                                         (1.0, 0.5, False, False)])
def test_the_halves_are_kept_only_when_faster_and_bit_identical(fresh, monkeypatch, whole, halves, same, split):
    monkeypatch.setattr(fm, "time", _Clock(whole, halves))
    if not same:  # a BLAS whose halves round differently: never used, whatever their speed
        real = fm._halves
        monkeypatch.setattr(fm, "_halves", lambda a, b: real(a, b).add_(1e-3))
    a, b = torch.randn(256, 32), torch.randn(32, 256)
    for _ in range(fm._TRIALS + 1):
        fm.tuned_mm(a, b)
    assert list(fm.decided_shapes().values()) == [split]
    assert torch.equal(fm.tuned_mm(a, b), a @ b) or not same


@pytest.mark.parametrize("faster", [True, False])
def test_a_new_row_count_takes_its_buckets_verdict_after_one_call(fresh, monkeypatch, faster):
    monkeypatch.setattr(fm, "time", _Clock(1.0, 0.5 if faster else 1.0))
    b = torch.randn(32, 256)
    for _ in range(fm._TRIALS + 1):
        fm.tuned_mm(torch.randn(256, 32), b)
    calls = []
    real = fm._halves
    monkeypatch.setattr(fm, "_halves", lambda a, b: calls.append(a.shape[0]) or real(a, b))
    a = torch.randn(300, 32)  # same bucket of 128 rows as 256
    assert torch.equal(fm.tuned_mm(a, b), a @ b)
    assert fm.decided_shapes()[(300, 32, 256, torch.float32, torch.float32, (1,), (256, 1), 32)] is faster
    assert calls == ([300] if faster else [])  # halves run once to compare the bits, or not at all
    assert not fm._trials


def test_no_trials_past_the_shape_limit(fresh, monkeypatch):
    monkeypatch.setattr(fm, "MAX_SHAPES", 1)
    for m in (256, 600, 1000):  # three buckets
        a = torch.randn(m, 16)
        for _ in range(fm._TRIALS + 1):
            fm.tuned_mm(a, torch.randn(16, 256))
    assert len(fm.decided_shapes()) == 1 and not fm._trials


@pytest.mark.parametrize("autocast, bias", [(False, False), (False, True), (True, True)])
def test_frozen_linear_gives_f_linear_output_and_input_gradient(fresh, autocast, bias):
    torch.manual_seed(0)
    x = torch.randn(2, 300, 64, requires_grad=True)
    w, b = torch.randn(512, 64), (torch.randn(512) if bias else None)
    g = torch.randn(2, 300, 512)
    outs, grads = [], []
    for fn in (F.linear, fm.frozen_linear):
        for _ in range(fm._TRIALS + 2):  # past the trials: the decided way runs
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = fn(x, w, b)
            (dx,) = torch.autograd.grad(y, x, g)
        outs.append(y)
        grads.append(dx)
    assert outs[1].dtype == outs[0].dtype and grads[1].dtype == torch.float32
    tol = dict(atol=2e-2, rtol=2e-2) if autocast else dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    torch.testing.assert_close(grads[1], grads[0], **tol)


def test_lora_training_runs_the_base_through_it_with_the_same_gradients(fresh):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = get_lora_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules="all-linear"))
    for n, p in lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    lm.train()
    ids = torch.randint(3, VOCAB, (2, 160))  # 320 rows: large enough to be tried
    params = [p for p in lm.parameters() if p.requires_grad]

    def loss_grads():
        loss = lm.model(input_ids=ids, labels=ids).loss
        return loss, torch.autograd.grad(loss, params)

    tuned = [loss_grads() for _ in range(fm._TRIALS + 2)][-1]
    assert fm.decided_shapes(), "the base matmuls went through tuned_mm"
    from lorakit.core.layers import LoraLinear

    plain = LoraLinear.base_forward
    try:
        LoraLinear.base_forward = lambda self, x, *a, **k: self.base_layer(x, *a, **k)
        ref = loss_grads()
    finally:
        LoraLinear.base_forward = plain
    torch.testing.assert_close(tuned[0], ref[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(tuned[1], ref[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
