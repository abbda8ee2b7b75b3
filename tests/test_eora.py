"""EoRA init: adapters that start as the rank-r correction of a 4-bit base's output error on
calibration inputs — the optimal correction by the math, kept exactly by the adapter's factors,
a calibrated tiny model brought closer to its float self, and a run that resumes exactly."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from conftest import adding_data, interrupt_at, tiny_llama  # noqa: E402
from lorakit import LoraConfig, LorakitError, get_lora_model  # noqa: E402
from lorakit.config import run_config_from_dict  # noqa: E402
from lorakit.core.start import balanced_factors, start_of as residual_of  # noqa: E402
from lorakit.quant.eora import residual_factors  # noqa: E402
from lorakit.quant.gptq import calibrated_quantize, damped  # noqa: E402
from lorakit.core.layers import LoraLayer  # noqa: E402
from lorakit.quant.bnb import QuantSpec, dequantize_weight, quantize_model, quantized_layers  # noqa: E402
from test_gptq import _correlated_inputs, _nearest, _rows  # noqa: E402


def _problem(seed: int = 0, out_features: int = 96, in_features: int = 256):
    torch.manual_seed(seed)
    w = torch.randn(out_features, in_features) * 0.02
    x = _correlated_inputs(4096, in_features, seed=seed + 1)
    return w, _nearest(w), x, x.T @ x / len(x)


@pytest.mark.parametrize("shape", [(96, 256), (256, 128)])  # fewer outputs than inputs, and more
def test_correction_is_the_best_rank_r_fit_of_the_output_error(shape):
    """‖(E − C)·L‖² (H = L·Lᵀ, the damped input moment) left by the rank-j correction is the sum of
    the squared singular values of E·L past j, for every j — the Eckart–Young optimum — and far
    below what plain SVD of the weight error (LoftQ's one step) leaves on the same inputs."""
    w, q, x, h = _problem(0, *shape)
    P, R = residual_factors(w, q, h, rank=16)
    assert P.shape == (shape[0], 16) and R.shape == (16, shape[1])
    E = (w - q).double()
    L = torch.linalg.cholesky(damped(h))
    sigma = torch.linalg.svdvals(E @ L)
    for j in (1, 4, 16):
        left = ((E - P[:, :j].double() @ R[:j].double()) @ L).pow(2).sum()
        torch.testing.assert_close(left, sigma[j:].pow(2).sum(), rtol=1e-4, atol=0)
    U, S, Vh = torch.linalg.svd(E)
    plain = (U[:, :16] * S[:16]) @ Vh[:16]

    def out_err(c):
        return ((x.double() @ (E - c).T).norm() / (x.double() @ E.T).norm()).item()

    ours, loftq = out_err(P.double() @ R.double()), out_err(plain)
    assert ours < 0.6 * loftq and ours < 0.5, (ours, loftq)  # measured 0.43 and 0.80 (96×256)


def test_balanced_factors_keep_the_product_and_share_its_size():
    w, q, _, h = _problem(1)
    P, R = residual_factors(w, q, h, rank=8)
    B, A = balanced_factors(P, R, scaling=2.0)
    torch.testing.assert_close(2.0 * B @ A, P @ R, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(torch.linalg.svdvals(B), torch.linalg.svdvals(A), rtol=1e-4, atol=1e-7)


def test_eora_adapter_starts_at_the_correction_and_brings_the_model_closer_to_float():
    spec = QuantSpec("nf4", double_quant=True)
    float_model, nearest, eora = tiny_llama(), tiny_llama(), tiny_llama()
    weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantize_model(nearest, spec)
    rows = _rows(16, 32, seed=0)
    calibrated_quantize(eora, spec, rows, rounding="nearest", residual_rank=4)
    for (name, a), (_, b) in zip(quantized_layers(eora), quantized_layers(nearest)):
        assert torch.equal(a.weight.data, b.weight.data), name  # nearest rounding: the same 4-bit base
        assert residual_of(a)[0].shape[1] == 4
    lm = get_lora_model(eora, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="eora"))
    layers = [(n, m) for n, m in lm.model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14
    for name, layer in layers:
        P, R = residual_of(layer.base_layer)
        torch.testing.assert_close(layer.delta_weight("default"), P @ R, atol=1e-6, rtol=1e-4)
        err = weights[name] - dequantize_weight(layer.base_layer)
        assert (err - layer.delta_weight("default")).norm() < err.norm()  # a part of the error, taken back
    held_out = torch.randint(3, 90, (4, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = float_model(input_ids=held_out).logits
        err_nearest = (nearest(input_ids=held_out).logits - ref).pow(2).mean().item()
        err_eora = (lm(input_ids=held_out).logits - ref).pow(2).mean().item()
        with lm.disable_adapter():
            assert torch.equal(lm(input_ids=held_out).logits, nearest(input_ids=held_out).logits)
    assert err_eora < 0.8 * err_nearest, (err_eora, err_nearest)  # measured 0.69×


def test_eora_needs_a_calibrated_quantized_base():
    plain = tiny_llama()
    quantize_model(plain, QuantSpec("nf4"))
    with pytest.raises(LorakitError, match="none of the targeted layers has it"):
        get_lora_model(plain, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="eora"))
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())  # checked before anything was wrapped
    with pytest.raises(LorakitError, match="lora.init eora corrects a 4-bit base's rounding error: it needs model.quantize"):
        run_config_from_dict({"lora": {"init": "eora"}})
    with pytest.raises(LorakitError, match="needs model.quantize nf4 or fp4 .got 'int8'"):
        run_config_from_dict({"model": {"quantize": "int8"}, "lora": {"init": "eora"}})
    with pytest.raises(LorakitError, match="or eora, got 'eorra'"):
        LoraConfig(init="eorra")


def test_eora_run_resumes_exactly_and_its_adapter_is_plain_lora_over_the_4bit_base(tiny_model_dir, tmp_path, monkeypatch):
    """A nearest-rounded EoRA run interrupted at step 2 of 4 and resumed (no calibration then: the
    adapter comes from the checkpoint) equals the uninterrupted run; the saved adapter is a plain
    PEFT LoRA that, over `load_model(quantize="nf4")`, scores the run's own final eval loss."""
    import json

    from safetensors.torch import load_file

    import lorakit.quant.gptq
    from lorakit import LoraModel
    from lorakit.data.dataset import prepare_data
    from lorakit.training.evaluate import eval_loss
    from lorakit.base import load_model
    from lorakit.training.loop import train

    data = adding_data(tmp_path)

    def cfg(out):
        return run_config_from_dict({
            "model": {"name": str(tiny_model_dir), "quantize": "nf4", "quant_calibration": 8},
            "data": {"path": str(data), "max_len": 48, "val_size": 4, "cache": False},
            "lora": {"r": 4, "alpha": 8, "init": "eora"},
            "train": {"out_dir": str(out), "lr": 1e-2, "max_steps": 4, "batch_size": 2, "threads": 1, "plot": False}})

    said = []
    result = train(cfg(tmp_path / "full"), show_progress=False, echo=said.append)
    assert any(line.startswith("EoRA init (rank 4): 14 layers calibrated on 8 training examples") for line in said), said
    saved = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] is True and saved["r"] == 4
    base, tok = load_model(str(tiny_model_dir), "cpu", quantize="nf4")
    lm = LoraModel.from_pretrained(base, tmp_path / "full" / "adapter").eval()
    run = cfg(tmp_path / "full")
    val = prepare_data(run.data, tok, run.train.seed, None).val
    loss = eval_loss(lm.model, val, 48, 2, tok.pad_token_id, torch.device("cpu"))
    assert loss == pytest.approx(result.after["eval_loss"], abs=1e-5)

    quiet = dict(show_progress=False, echo=lambda s: None)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert train(cfg(tmp_path / "cut"), **quiet).interrupted

    def no_calibration(*a, **k):
        raise AssertionError("a resumed EoRA run reads its adapter from the checkpoint")
    monkeypatch.setattr(lorakit.quant.gptq, "calibrated_quantize", no_calibration)
    resumed = cfg(tmp_path / "cut")
    resumed.train.resume = "latest"
    assert train(resumed, **quiet).steps == 4
    full, cut = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("full", "cut"))
    for key in full:
        torch.testing.assert_close(cut[key], full[key], atol=1e-6, rtol=0)


def test_whole_model_path_gives_the_same_corrections_as_block_by_block():
    """Models without a decoder-block stack are calibrated in groups by running the whole model;
    on a model that has one, both paths see the float activations and record the same corrections."""
    rows = _rows(8, 32, seed=0)
    spec = QuantSpec("nf4", double_quant=True)
    by_block, whole = tiny_llama(), tiny_llama()
    calibrated_quantize(by_block, spec, rows, rounding="gptq", residual_rank=4)
    calibrated_quantize(whole, spec, rows, rounding="gptq", residual_rank=4, by_block=False)
    pairs = list(zip(quantized_layers(by_block), quantized_layers(whole)))
    assert len(pairs) == 14
    for (name, a), (_, b) in pairs:
        assert torch.equal(a.weight.data, b.weight.data), name
        (P, R), (P2, R2) = residual_of(a), residual_of(b)
        torch.testing.assert_close(P @ R, P2 @ R2, atol=1e-6, rtol=1e-4)  # the correction (factor signs may differ)


def test_eora_adapter_loads_in_peft_over_the_nearest_rounded_base(tmp_path):
    """With nearest rounding the 4-bit base is the one PEFT users get from bitsandbytes: the saved
    EoRA adapter (the correction as it starts) gives the same logits in PEFT there as in lorakit."""
    peft = pytest.importorskip("peft")
    spec = QuantSpec("nf4", double_quant=True)
    model = tiny_llama()
    calibrated_quantize(model, spec, _rows(8, 32, seed=0), rounding="nearest", residual_rank=4)
    lm = get_lora_model(model, LoraConfig(r=4, alpha=8, target_modules="all-linear", init="eora")).eval()
    lm.save_pretrained(tmp_path / "adapter")
    theirs_base = tiny_llama()
    quantize_model(theirs_base, spec)
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = lm(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "adapter").eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, ours, atol=1e-5, rtol=1e-5)
        with lm.disable_adapter():
            assert (lm(input_ids=ids).logits - ours).abs().max() > 1e-3  # the correction is really there
