"""Int8 inference (--int8): the layer against its math, whole models against their float selves,
and the engine's two ways (one adapter merged first; several beside the int8 base)."""

import io
from contextlib import redirect_stdout

import pytest
import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.core.layers import LoraLayer
from lorakit.inference.engine import Engine, load_engine
from lorakit.inference.generation import Request, Sampling
from lorakit.quant.int8 import Int8Linear, int8_bytes, int8_layers, quantize_int8

from conftest import copy, tiny_gpt2, tiny_llama

Q = [{"role": "user", "content": "normalize the date March 5"}]


def _reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Per-row absmax int8 weights, per-token absmax int8 inputs, exact products (float64)."""
    x, weight = x.double(), weight.double()
    sw = weight.abs().amax(1, keepdim=True) / 127
    sx = x.abs().amax(-1, keepdim=True) / 127
    wq, xq = torch.round(weight / sw), torch.round(x / sx)
    y = (xq @ wq.t()) * sx * sw.t()
    return y + bias.double() if bias is not None else y


@pytest.mark.parametrize("conv1d", [False, True])
def test_int8_linear_computes_the_quantized_math(conv1d):
    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    x = torch.randn(2, 5, 48)
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(40, 48)  # weight (in, out)
        layer.weight.data.copy_(linear.weight.t())
        layer.bias.data.copy_(linear.bias)
    else:
        layer = linear
    q = Int8Linear.from_linear(layer)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (40, 48)
    torch.testing.assert_close(q(x).double(), _reference(x, linear.weight.detach(), linear.bias.detach()), atol=1e-4, rtol=1e-5)
    with torch.no_grad():
        err = (q(x) - linear(x)).abs().max() / linear(x).abs().max()
    assert 1e-4 < err < 0.02  # really rounded, and by about the int8 step
    assert torch.equal(q(torch.zeros(3, 48)), linear.bias.detach().expand(3, 40))  # a zero row keeps its scale finite


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_int8_models_stay_close_to_float(build, ids):
    model = build()
    q = copy.deepcopy(model)
    swapped = quantize_int8(q)
    kinds = {type(m).__name__ for m in model.modules()}
    assert swapped == sum(1 for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    assert "Int8Linear" not in kinds and len(int8_layers(q)) == swapped
    with torch.no_grad():
        ref, out = model(ids).logits, q(ids).logits
    assert (out - ref).abs().max() / ref.abs().max() < 0.03
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    float_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
    assert int8_bytes(q) < 0.3 * float_bytes
    kept = copy.deepcopy(model)
    quantize_int8(kept, head=False)
    assert not isinstance(kept.get_output_embeddings(), Int8Linear) and quantize_int8(copy.deepcopy(model)) == swapped


def _logits(engine, adapter):
    ids = torch.tensor([engine.prompt_ids(Q)])
    if engine.lora is None:
        return engine.model(ids).logits
    with engine.lora.mixed_batch([adapter]):
        return engine.model(ids).logits


@torch.no_grad()
def test_engine_int8_merges_one_adapter(tiny_model_dir, two_adapters):
    ref = load_engine(str(tiny_model_dir), [f"alpha={two_adapters['alpha']}"], device="cpu")
    eng = load_engine(str(tiny_model_dir), [f"alpha={two_adapters['alpha']}"], device="cpu", int8=True)
    assert eng.merged == "alpha" and eng.adapters == ["alpha"] and eng.lora is None
    assert not any(isinstance(m, LoraLayer) for m in eng.model.modules()) and len(int8_layers(eng.model)) == 15
    merged = ref.lora.merge_and_unload(["alpha"])  # the float merge the int8 layers are rounded from
    want, got = merged(torch.tensor([ref.prompt_ids(Q)])).logits, _logits(eng, "alpha")
    assert (got - want).abs().max() / want.abs().max() < 0.08  # the random adapter is large (std 0.6)
    quantize_int8(merged)
    torch.testing.assert_close(got, _logits(Engine(merged, ref.tokenizer, ref.template), None), atol=1e-6, rtol=0)
    out = eng.chat(Q, "alpha", Sampling(max_new_tokens=10))
    assert out.completion_tokens > 0
    with pytest.raises(LorakitError, match="merged into its int8"):
        eng.chat(Q, None)
    with pytest.raises(LorakitError, match="merged into these int8"):
        eng.add_adapter("beta", str(two_adapters["beta"]))
    buf = io.StringIO()
    from lorakit.cli import main

    with redirect_stdout(buf):
        rc = main(["generate", "--model", str(tiny_model_dir), "--adapter", str(two_adapters["alpha"]), "--int8",
                   "--prompt", Q[0]["content"], "--max-new-tokens", "10"])
    assert rc == 0 and buf.getvalue().rstrip("\n") == out.text


@torch.no_grad()
def test_engine_int8_keeps_several_adapters_routed(tiny_model_dir, two_adapters):
    specs = [f"{n}={p}" for n, p in two_adapters.items()]
    ref = load_engine(str(tiny_model_dir), specs, device="cpu")
    eng = load_engine(str(tiny_model_dir), specs, device="cpu", int8=True)
    assert eng.merged is None and eng.adapters == ["alpha", "beta"]
    bases = [m.base_layer for m in eng.model.modules() if isinstance(m, LoraLayer)]
    assert bases and all(isinstance(b, Int8Linear) for b in bases)
    for adapter in (None, "alpha", "beta"):
        want, got = _logits(ref, adapter), _logits(eng, adapter)
        assert (got - want).abs().max() / want.abs().max() < 0.08, adapter
    plain = copy.deepcopy(ref.lora.unload())  # the bare base, rounded the same way
    quantize_int8(plain)
    torch.testing.assert_close(_logits(eng, None), _logits(Engine(plain, ref.tokenizer, ref.template), None), atol=1e-6, rtol=0)
    rows = [(None, Q), ("alpha", Q), ("beta", Q)]
    mixed = eng.run([Request(eng.prompt_ids(q), a, Sampling(max_new_tokens=8)) for a, q in rows])
    alone = [eng.run([Request(eng.prompt_ids(q), a, Sampling(max_new_tokens=8))])[0] for a, q in rows]
    assert [m.token_ids for m in mixed] == [a.token_ids for a in alone]
    eng.remove_adapter("beta")
    eng.add_adapter("beta", str(two_adapters["beta"]))  # a later load wraps the int8 base like any layer
    torch.testing.assert_close(_logits(eng, "beta"), _logits(load_engine(str(tiny_model_dir), specs, device="cpu", int8=True), "beta"))


def test_serve_lists_no_base_when_it_is_merged_away(tiny_model_dir, two_adapters):
    pytest.importorskip("fastapi")
    from lorakit.inference.server import ApiError, Server, ServeSettings

    eng = load_engine(str(tiny_model_dir), [f"alpha={two_adapters['alpha']}"], device="cpu", int8=True)
    server = Server(eng, ServeSettings())
    assert server.model_ids() == ["alpha"] and server.adapter_for("alpha") == "alpha"
    with pytest.raises(ApiError):
        server.adapter_for(eng.base_name)
