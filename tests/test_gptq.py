"""GPTQ rounding for 4-bit bases: plain rounding when inputs are uncorrelated, results bitsandbytes
stores exactly, lower output error than nearest rounding on correlated inputs, and a calibrated
tiny model closer to its float self than a plainly rounded one."""

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from conftest import adding_data, interrupt_at, tiny_bloom, tiny_llama, tiny_train_cmd  # noqa: E402
from lorakit import LorakitError  # noqa: E402
from lorakit.config import ModelConfig  # noqa: E402
from lorakit.data.packing import Batch  # noqa: E402
from lorakit.quant.gptq import calibrated_quantize, collect_hessians, four_bit_code, gptq_round  # noqa: E402
from lorakit.quant.bnb import QuantSpec, dequantize_weight, quantize_linear, quantize_model, quantized_layers  # noqa: E402
from lorakit.quant.saved_base import QUANTIZED_BASE, restore_quantized_base, save_quantized_base  # noqa: E402

PLAIN_NF4 = QuantSpec("nf4", double_quant=False)


def _nearest(weight: torch.Tensor, spec=PLAIN_NF4) -> torch.Tensor:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data = weight.clone()
    return dequantize_weight(quantize_linear(layer, spec))


def _correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    """Tokens of one distribution (``seed`` draws the tokens): most of their variance in 32 directions,
    features of different sizes — the structure real activations have and nearest rounding ignores."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(32, dim, generator=g)
    scales = torch.logspace(-0.5, 0.5, dim)[torch.randperm(dim, generator=g)]
    tokens = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 32, generator=tokens) @ mix + 0.3 * torch.randn(n, dim, generator=tokens)) * scales


@pytest.mark.parametrize("method", ["nf4", "fp4"])
def test_identity_hessian_gives_exactly_nearest_rounding(method):
    torch.manual_seed(0)
    w = torch.randn(48, 192) * 0.02
    q = gptq_round(w, torch.eye(192), four_bit_code(method))
    torch.testing.assert_close(q, _nearest(w, QuantSpec(method, double_quant=False)), atol=1e-7, rtol=0)


def test_gptq_result_is_stored_exactly_and_lowers_the_output_error():
    torch.manual_seed(1)
    w = torch.randn(96, 256) * 0.02
    x_cal, x_new = _correlated_inputs(4096, 256, seed=2), _correlated_inputs(2048, 256, seed=3)
    q = gptq_round(w, x_cal.T @ x_cal / len(x_cal), four_bit_code("nf4"))
    # On bitsandbytes' grid with its own absmax scales: re-quantizing changes nothing.
    torch.testing.assert_close(_nearest(q), q, atol=1e-7, rtol=0)
    rtn = _nearest(w)

    def out_err(m, x):
        return ((x @ (m - w).T).norm() / (x @ w.T).norm()).item()

    for x in (x_cal, x_new):  # calibration tokens and unseen tokens of the same distribution
        assert out_err(q, x) < 0.5 * out_err(rtn, x), (out_err(q, x), out_err(rtn, x))
    # The price: the weights themselves move further than plain rounding moves them.
    assert (q - w).norm() > (rtn - w).norm()


def _rows(n_rows: int, length: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_rows):
        ids = torch.randint(3, 90, (1, length), generator=g)
        pos = torch.arange(length)[None]
        out.append(Batch(ids, ids.clone(), pos, None, length, length))
    return out


def test_collect_hessians_shares_one_matrix_between_siblings_and_is_the_input_moment():
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    seen = {}
    attn = model.model.layers[0].self_attn
    hook = attn.q_proj.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", []).append(a[0].reshape(-1, 64)))
    hessians, tokens = collect_hessians(model, names, _rows(3, 20, seed=0))
    hook.remove()
    assert tokens == 60 and set(hessians) == set(names)
    assert hessians["model.layers.0.self_attn.q_proj"] is hessians["model.layers.0.self_attn.v_proj"]
    assert hessians["model.layers.0.mlp.gate_proj"] is hessians["model.layers.0.mlp.up_proj"]
    assert hessians["model.layers.0.self_attn.q_proj"] is not hessians["model.layers.1.self_attn.q_proj"]
    x = torch.cat(seen["x"])
    torch.testing.assert_close(hessians["model.layers.0.self_attn.q_proj"], x.T @ x / 60, rtol=1e-5, atol=1e-6)


def test_calibrated_model_is_closer_to_the_float_model_than_nearest_rounding():
    float_model = tiny_llama()
    nearest, gptq = tiny_llama(), tiny_llama()
    quantize_model(nearest, PLAIN_NF4)
    done = calibrated_quantize(gptq, PLAIN_NF4, _rows(16, 32, seed=0), budget_bytes=3 * 4 * 128 ** 2, by_block=False)
    assert done["layers"] == 14 and done["tokens"] == 16 * 32
    assert len(list(quantized_layers(gptq))) == 14 and type(gptq.lm_head) is nn.Linear
    held_out = torch.randint(3, 90, (4, 32), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        ref = float_model(input_ids=held_out).logits
        err = {name: (m(input_ids=held_out).logits - ref).pow(2).mean().item()
               for name, m in (("nearest", nearest), ("gptq", gptq))}
    assert err["gptq"] < 0.8 * err["nearest"], err


def test_block_by_block_equals_one_pass_of_the_whole_float_model():
    """One decoder block at a time (float blocks moved as they come, the rows run through each once)
    gives the same base as calibrating every layer in one pass of the whole float model, and not
    the base of the sequential variant (each group calibrated after the earlier ones are quantized)."""
    rows = _rows(8, 32, seed=0)
    by_block, one_pass, sequential = tiny_llama(), tiny_llama(), tiny_llama()
    assert calibrated_quantize(by_block, PLAIN_NF4, rows)["tokens"] == 8 * 32
    calibrated_quantize(one_pass, PLAIN_NF4, rows, by_block=False)  # every input matrix fits the budget: one group
    calibrated_quantize(sequential, PLAIN_NF4, rows, budget_bytes=4 * (6 * 64 ** 2 + 128 ** 2), by_block=False)
    ours = list(quantized_layers(by_block))
    assert len(ours) == 14 and type(by_block.lm_head) is nn.Linear
    for (name, layer), (_, theirs) in zip(ours, quantized_layers(one_pass)):
        assert torch.equal(layer.weight.data, theirs.weight.data), name
    assert not all(torch.equal(a.weight.data, b.weight.data) for (_, a), (_, b) in zip(ours, quantized_layers(sequential)))


def test_saved_base_comes_back_bit_for_bit_and_refuses_another_model(tmp_path):
    from lorakit import LoraConfig, get_lora_model

    spec = QuantSpec("nf4", double_quant=True)
    trained = tiny_llama()
    calibrated_quantize(trained, spec, _rows(8, 32, seed=0))
    lm = get_lora_model(trained, LoraConfig(r=4, alpha=8, target_modules="all-linear"))  # B = 0: output unchanged
    path = tmp_path / QUANTIZED_BASE
    assert save_quantized_base(trained, path) == 14  # the wrapped layers, saved under their plain names
    packed = sum(m.weight.numel() // 2 for m in tiny_llama().modules() if type(m) is nn.Linear) - 96 * 64 // 2  # not the head
    assert packed < path.stat().st_size < packed * 1.05 + 14 * 2560  # 4 bits a weight + scales + ~2 KB of tables a layer

    restored, nearest = tiny_llama(), tiny_llama()
    assert restore_quantized_base(restored, path, spec) == 14
    quantize_model(nearest, spec)
    layers = dict(quantized_layers(restored))
    for name, layer in quantized_layers(trained):
        twin = layers[name.removesuffix(".base_layer")]
        assert torch.equal(twin.weight.data, layer.weight.data)
        assert torch.equal(dequantize_weight(twin), dequantize_weight(layer))
    ids = torch.randint(3, 90, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        assert torch.equal(restored(input_ids=ids).logits, want)
        assert not torch.allclose(nearest(input_ids=ids).logits, want, atol=1e-5)  # GPTQ's base is another base

    for model, ask, message in ((tiny_llama(), QuantSpec("fp4", True), "holds a nf4 base with double quantization"),
                                (tiny_llama(), QuantSpec("nf4", False), "ask for nf4 with double quantization .the default: leave out --no-double-quant."),
                                (tiny_bloom(), spec, "was saved from another model")):
        with pytest.raises(LorakitError, match=message):
            restore_quantized_base(model, path, ask)
        assert next(quantized_layers(model), None) is None  # nothing changed
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LorakitError, match="cannot read the saved 4-bit base"):
        restore_quantized_base(tiny_llama(), tmp_path / "junk.safetensors", spec)


def test_resumed_gptq_run_reuses_its_saved_base_and_equals_the_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import lorakit.quant.gptq
    from lorakit.config import run_config_from_dict
    from lorakit.training.loop import train

    data = adding_data(tmp_path)

    def cfg(out):
        return run_config_from_dict({
            "model": {"name": str(tiny_model_dir), "quantize": "nf4", "quant_rounding": "gptq", "quant_calibration": 8},
            "data": {"path": str(data), "max_len": 48, "val_size": 4},
            "lora": {"r": 4, "alpha": 8},
            "train": {"out_dir": str(out), "lr": 1e-2, "max_steps": 4, "batch_size": 2, "threads": 1, "plot": False}})

    quiet = dict(show_progress=False, echo=lambda s: None)
    train(cfg(tmp_path / "full"), **quiet)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert train(cfg(tmp_path / "cut"), **quiet).interrupted
    assert (tmp_path / "cut" / QUANTIZED_BASE).is_file()

    def no_calibration(*a, **k):
        raise AssertionError("a resumed run must not calibrate again")
    monkeypatch.setattr(lorakit.quant.gptq, "calibrated_quantize", no_calibration)
    said = []
    resumed = cfg(tmp_path / "cut")
    resumed.train.resume = "latest"
    assert train(resumed, show_progress=False, echo=said.append).steps == 4
    assert any("GPTQ-rounded base restored from" in line for line in said), said
    full, cut = (load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("full", "cut"))
    for key in full:
        torch.testing.assert_close(cut[key], full[key], atol=1e-6, rtol=0)


def test_gptq_rounding_settings_are_checked():
    with pytest.raises(LorakitError, match="needs model.quantize nf4 or fp4"):
        ModelConfig(quant_rounding="gptq")
    with pytest.raises(LorakitError, match="needs model.quantize nf4 or fp4"):
        ModelConfig(quantize="int8", quant_rounding="gptq")
    with pytest.raises(LorakitError, match="nearest or gptq"):
        ModelConfig(quantize="nf4", quant_rounding="best")
    with pytest.raises(LorakitError, match="at least 1"):
        ModelConfig(quantize="nf4", quant_rounding="gptq", quant_calibration=0)


def test_cli_train_with_gptq_rounding(tiny_model_dir, tmp_path, capsys):
    """`lorakit train --quantize nf4 --quant-rounding gptq` calibrates on the run's rows, says so, records
    the setting and saves its 4-bit base; generate/merge with --quantize nf4 use that base (the merge
    equals the adapter over it, not over nearest rounding), fp4 is refused, and without the file the
    fallback warns; a typo in the value stops before the run folder is written."""
    import argparse
    import subprocess

    from transformers import AutoModelForCausalLM

    from lorakit import LoraModel
    from lorakit.cli import main
    from lorakit.cli.model_args import quant_kwargs as _quant_kwargs
    from lorakit.base import load_model

    cmd, run = tiny_train_cmd(tiny_model_dir, tmp_path, "--quantize", "nf4", "--quant-rounding", "gptq",
                              "--model.quant_calibration", "8", "--train.max_steps", "2")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "GPTQ rounding: 14 layers calibrated on 8 training examples" in done.stdout
    assert "quant_rounding: gptq" in (run / "config.yaml").read_text() and (run / "adapter" / "adapter_model.safetensors").exists()
    assert "saved the GPTQ-rounded base with the run" in done.stdout and (run / QUANTIZED_BASE).is_file()
    for adapter, quantize, used in ((str(run / "adapter"), "nf4", True), (f"a={run / 'adapter'}", "nf4", True),
                                    (str(run / "adapter"), "none", False)):
        kwargs = _quant_kwargs(argparse.Namespace(adapter=[adapter], quantize=quantize, double_quant=True, compute_dtype="auto"))
        assert (kwargs.get("quantized_base") == run / QUANTIZED_BASE) is used
        assert ("the GPTQ-rounded weights saved with the run" in capsys.readouterr().err) is used
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--quantize", "nf4",
                 "--prompt", "add 1 and 1", "--max-new-tokens", "2"]) == 0
    assert f"4-bit base: the GPTQ-rounded weights saved with the run ({run / QUANTIZED_BASE})" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--quantize", "fp4",
                 "--prompt", "add 1 and 1"]) == 2  # not the base the adapter was trained on: said, not guessed
    assert "holds a nf4 base with double quantization, not the fp4" in capsys.readouterr().err
    # merge --quantize nf4: the adapter folded into the dequantized GPTQ base, as trained
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--quantize", "nf4",
                 "--out", str(tmp_path / "merged")]) == 0
    base, _ = load_model(str(tiny_model_dir), "cpu", quantize="nf4", quantized_base=run / QUANTIZED_BASE)
    trained = LoraModel.from_pretrained(base, run / "adapter").eval()
    plain, _ = load_model(str(tiny_model_dir), "cpu", quantize="nf4")
    nearest = LoraModel.from_pretrained(plain, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(3, 90, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = trained(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=1e-4)
        assert (nearest(input_ids=ids).logits - want).abs().max() > 1e-3  # the other base really is another
    (run / QUANTIZED_BASE).unlink()  # a run folder from before bases were saved, or one trimmed by hand
    kwargs = _quant_kwargs(argparse.Namespace(adapter=[str(run / "adapter")], quantize="nf4", double_quant=True, compute_dtype="auto"))
    assert "quantized_base" not in kwargs and "that its run folder no longer holds" in capsys.readouterr().err
    bad = subprocess.run(cmd + ["--quant-rounding", "gptqq", "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "model.quant_rounding must be nearest or gptq, got 'gptqq'" in bad.stderr
    assert not (tmp_path / "x").exists()
