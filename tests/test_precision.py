"""Training precision: "auto" picks bf16 where the hardware multiplies bf16 natively (CUDA, CPUs
with AVX512-BF16/AMX), LoRA layers under autocast stay in the autocast dtype, and a bf16 run
tracks the fp32 run of the same config."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit.base.device as models
from lorakit import LoraConfig, get_lora_model
from lorakit.config import run_config_from_dict
from lorakit.base import resolve_precision
from lorakit.training.loop import train

CPU = torch.device("cpu")


def test_cpu_bf16_detection_reads_the_cpu_flags_and_the_override(monkeypatch):
    monkeypatch.delenv("LORAKIT_CPU_BF16", raising=False)
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "fma", "avx512f", "avx512_bf16"})
    assert models.native_bf16(CPU)
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "fma", "amx_bf16"})
    assert models.native_bf16(CPU)
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx2", "fma", "avx512f"})  # AVX512 without BF16
    assert not models.native_bf16(CPU)
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")
    assert models.native_bf16(CPU)
    monkeypatch.setattr(models, "_cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setenv("LORAKIT_CPU_BF16", "0")
    assert not models.native_bf16(CPU)
    assert not models.native_bf16(torch.device("meta"))


def test_auto_precision(monkeypatch):
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")
    assert resolve_precision("auto", CPU) == "bf16"
    assert resolve_precision("auto", CPU, quantize="nf4") == "fp32"  # bitsandbytes' CPU kernels compute in fp32
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU, "nf4") == "bf16"
    monkeypatch.setenv("LORAKIT_CPU_BF16", "0")
    assert resolve_precision("auto", CPU) == "fp32"


def test_lora_linear_under_autocast_computes_in_bf16_and_matches_the_math():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 48, bias=True)).to(torch.bfloat16).requires_grad_(False)
    lm = get_lora_model(base, LoraConfig(r=8, alpha=16, target_modules=["0"]))
    layer = lm.model[0]
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.1)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.dtype == B.dtype == torch.float32  # fp32 adapters on a bf16 base
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lm.model(x)
    assert y.dtype == torch.bfloat16
    W, b = layer.base_layer.weight.float(), layer.base_layer.bias.float()
    ref = x.float() @ W.t() + b + 2.0 * (x.float() @ A.t()) @ B.t()
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)  # bf16 has 8 bits of mantissa
    y.float().square().sum().backward()
    assert A.grad.dtype == B.grad.dtype == torch.float32 and A.grad.abs().sum() > 0 and B.grad.abs().sum() > 0
    # Without autocast a bf16 base keeps the adapter path in fp32 (as PEFT does): exact to fp32 rounding
    # of the bf16 result.
    with torch.no_grad():
        y32 = lm.model(x)
    torch.testing.assert_close(y32.float(), ref, atol=0.02, rtol=0.01)


def _data(tmp_path, n=40):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"normalize the date {m} {i % 27 + 1}", "output": f"2021-{i % 12 + 1:02d}-{i % 27 + 1:02d}"}
            for i, m in enumerate(["March", "May", "June", "July"][i % 4] for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(model_dir, data, out, precision):
    lines = []
    cfg = run_config_from_dict({
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_len": 64, "val_size": 8},
        "lora": {"r": 4, "alpha": 8},
        "train": {"out_dir": str(out), "lr": 3e-3, "max_steps": 8, "batch_size": 4, "warmup": 1, "log_every": 1,
                  "threads": 1, "precision": precision, "plot": False, "eval_samples": 0},
    })
    res = train(cfg, show_progress=False, echo=lines.append)
    return res, lines, load_file(str(out / "adapter" / "adapter_model.safetensors"))


def test_auto_bf16_run_tracks_the_fp32_run(tiny_model_dir, tmp_path, monkeypatch):
    data = _data(tmp_path)
    ref, ref_lines, ref_adapter = _run(tiny_model_dir, data, tmp_path / "fp32", "auto")  # conftest pins fp32
    assert any(line.startswith("precision: fp32") for line in ref_lines)
    monkeypatch.setenv("LORAKIT_CPU_BF16", "1")
    res, lines, adapter = _run(tiny_model_dir, data, tmp_path / "bf16", "auto")
    assert any(line.startswith("precision: bf16, base weights bfloat16 (auto") for line in lines)
    assert res.after["eval_loss"] < res.before["eval_loss"] - 0.2  # it learns
    # the same run within bf16's rounding: eval loss within 3%, adapter factors close
    assert abs(res.after["eval_loss"] - ref.after["eval_loss"]) < 0.03 * ref.after["eval_loss"]
    assert adapter.keys() == ref_adapter.keys()
    for k, v in adapter.items():
        assert v.dtype == torch.float32, k
        rel = (v - ref_adapter[k]).norm() / ref_adapter[k].norm()
        assert rel < 0.1, (k, float(rel))


def test_packed_attention_upcasts_short_bf16_documents_on_cpu():
    import torch.nn.functional as F

    from lorakit.ops.attention import CPU_BF16_UPCAST_BELOW, packed_attention

    torch.manual_seed(0)
    short, long = 20, CPU_BF16_UPCAST_BELOW + 8
    T = short + long
    q = torch.randn(1, 4, T, 16, dtype=torch.bfloat16)
    k, v = torch.randn(1, 2, T, 16, dtype=torch.bfloat16), torch.randn(1, 2, T, 16, dtype=torch.bfloat16)
    positions = torch.cat([torch.arange(short), torch.arange(long)])[None]
    module = nn.Module().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = packed_attention(module, q, k, v, None, position_ids=positions)  # (1, T, H, D)
    assert out.dtype == torch.bfloat16

    def attend(s, e, dtype):
        o = F.scaled_dot_product_attention(q[:, :, s:e].to(dtype), k[:, :, s:e].to(dtype), v[:, :, s:e].to(dtype),
                                           is_causal=True, enable_gqa=True)
        return o.to(torch.bfloat16).transpose(1, 2)

    # the short document in fp32 (rounded once at the end), the long one by the bf16 kernel
    assert torch.equal(out[:, :short], attend(0, short, torch.float32))
    assert torch.equal(out[:, short:], attend(short, T, torch.bfloat16))


def test_a_bad_cpu_bf16_override_is_refused_before_anything_is_written(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from lorakit.cli import main
    from lorakit.errors import LorakitError

    monkeypatch.setenv("LORAKIT_CPU_BF16", "yes")
    with pytest.raises(LorakitError, match="LORAKIT_CPU_BF16 must be 0 .* got 'yes'"):
        models.native_bf16(CPU)
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_model_dir), "--data", str(_data(tmp_path)), "--out", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "LORAKIT_CPU_BF16 must be 0" in err and "Traceback" not in err
    assert not out.exists()
