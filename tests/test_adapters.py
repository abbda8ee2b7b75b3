"""PEFT-format adapters: lorakit -> PEFT and PEFT -> lorakit give the same outputs; bad files are refused."""

import json

import pytest
import torch
from conftest import (assert_unchanged, copy, randomize_adapters, snapshot, tiny_bloom, tiny_convnet, tiny_gpt2,
                      tiny_llama)
from safetensors.torch import load_file, save_file

from lorakit import LoraConfig, LorakitError, LoraModel, get_lora_model

peft = pytest.importorskip("peft")

CASES = {
    # name: (model factory, our config, equivalent PEFT config kwargs, input kind)
    "llama-patterns-rslora-save": (
        tiny_llama,
        dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True,
             rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"down_proj": 5}, modules_to_save=["lm_head"]),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], use_rslora=True,
             rank_pattern={r"layers\.1\.self_attn\.q_proj": 2}, alpha_pattern={"down_proj": 5}, modules_to_save=["lm_head"]),
        "ids"),
    "gpt2-conv1d-bias": (
        tiny_gpt2,
        dict(r=4, alpha=16, target_modules=["c_attn", "c_fc"], bias="lora_only"),
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], bias="lora_only", fan_in_fan_out=True),
        "ids"),
    "bloom-default-targets": (
        tiny_bloom,
        dict(r=8, alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        dict(r=8, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
        "ids"),
    "convnet-conv2d": (
        tiny_convnet,
        dict(r=2, alpha=4, target_modules=["conv1", "conv2", "conv3"], modules_to_save=["head"]),
        dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "conv3"], modules_to_save=["head"]),
        "image"),
}


def _inputs(kind):
    g = torch.Generator().manual_seed(5)
    if kind == "image":
        return torch.randn(2, 3, 8, 8, generator=g)
    return torch.randint(3, 90, (2, 9), generator=g)


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return y.logits if hasattr(y, "logits") else y


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft(case, tmp_path):
    make, ours, _, kind = CASES[case]
    x = _inputs(kind)
    m = get_lora_model(make(), LoraConfig(**ours))
    randomize_adapters(m)
    want = _out(m, x)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["lora_alpha"] == ours["alpha"] and cfg["r"] == ours["r"]
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.") for k in keys)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    torch.testing.assert_close(_out(theirs, x), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_out(make(), x), want, atol=1e-3)  # the adapter really does something


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorakit(case, tmp_path):
    make, _, theirs_cfg, kind = CASES[case]
    x = _inputs(kind)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**theirs_cfg))
    randomize_adapters(theirs)
    want = _out(theirs.eval(), x)
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(make(), tmp_path)
    torch.testing.assert_close(_out(ours, x), want, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in ours.parameters())  # inference by default, as PEFT
    trainable = LoraModel.from_pretrained(make(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_named_adapters_use_subfolders_like_peft(tmp_path):
    x = _inputs("ids")
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    m.add_adapter("style", LoraConfig(r=2, target_modules=["v_proj"]))
    m.set_adapter(["default", "style"])
    randomize_adapters(m)
    m.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "style" / "adapter_model.safetensors").exists()
    m.set_adapter("style")
    want = _out(m, x)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    theirs.load_adapter(tmp_path / "style", adapter_name="style")
    theirs.set_adapter("style")
    torch.testing.assert_close(_out(theirs.eval(), x), want, atol=1e-5, rtol=1e-5)


def test_all_linear_saves_resolved_leaf_names(tmp_path):
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear"))
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_saved_as_plain_lora_on_original_base(tmp_path, rslora):
    x = _inputs("ids")
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"], init="pissa",
                                                use_rslora=rslora, rank_pattern={"o_proj": 2}))
    torch.testing.assert_close(_out(m, x), _out(tiny_llama(), x), atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # "training": move the adapter away from its start
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    want = _out(m, x)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["rank_pattern"] == {"o_proj": 4} and cfg["init_lora_weights"] is True
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()  # the ORIGINAL base
    torch.testing.assert_close(_out(theirs, x), want, atol=1e-4, rtol=1e-4)


# ---- bad input: a clear message, and the model is left exactly as it was -------------------------

def _saved(tmp_path, **cfg):
    m = get_lora_model(tiny_llama(), LoraConfig(**{"r": 4, "target_modules": ["q_proj", "v_proj"], **cfg}))
    randomize_adapters(m)
    m.save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    path = folder / "adapter_model.safetensors"
    state = load_file(path)
    fn(state)
    save_file(state, path)


BAD = {
    "missing folder": (lambda f: f / "nowhere", "does not exist"),
    "missing config": (lambda f: ((f / "adapter_config.json").unlink(), f)[1], "adapter_config.json is missing"),
    "missing weights": (lambda f: ((f / "adapter_model.safetensors").unlink(), f)[1], "adapter_model.safetensors is missing"),
    "pickle only": (lambda f: ((f / "adapter_model.safetensors").rename(f / "adapter_model.bin"), f)[1], "never unpickles"),
    "broken json": (lambda f: ((f / "adapter_config.json").write_text("{\n  \"r\": 4,,\n}"), f)[1], r"adapter_config.json:2: not valid JSON"),
    "wrong peft_type": (lambda f: (_edit_config(f, peft_type="IA3"), f)[1], "peft_type is 'IA3'"),
    "dora": (lambda f: (_edit_config(f, use_dora=True), f)[1], "DoRA"),
    "target not in model": (lambda f: (_edit_config(f, target_modules=["q_proj", "wq"]), f)[1], None),
    "target matches nothing": (lambda f: (_edit_config(f, target_modules=["wq"]), f)[1], "matched no module"),
    "shape mismatch": (lambda f: (_edit_config(f, r=8), f)[1],
                       r"lora_A.weight has shape \(4, 64\), this model needs \(8, 64\)"),
    "missing key": (lambda f: (_edit_weights(f, lambda s: s.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")), f)[1],
                    "no weights for target module 'model.layers.1.self_attn.v_proj'"),
    "extra key": (lambda f: (_edit_weights(f, lambda s: s.update({"base_model.model.model.layers.9.mlp.lora_A.weight": torch.zeros(2)})), f)[1],
                  "1 key\\(s\\) match no module"),
    "corrupt weights": (lambda f: ((f / "adapter_model.safetensors").write_bytes(b"\x00garbage"), f)[1], "not a readable safetensors"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_files_are_refused_and_change_nothing(case, tmp_path):
    folder = _saved(tmp_path / "a")
    spoil, message = BAD[case]
    path = spoil(folder)
    if case == "target not in model":  # 'wq' matches nothing but q_proj does: the v_proj keys are now extra
        message = "match no module"
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(LorakitError, match=message):
        LoraModel.from_pretrained(model, path)
    assert_unchanged(model, snap)


def test_loading_into_existing_lora_model_failure_keeps_it(tmp_path):
    good = _saved(tmp_path / "good")
    m = LoraModel.from_pretrained(tiny_llama(), good)
    bad = _saved(tmp_path / "bad", r=2)
    _edit_config(bad, r=3)
    snap = snapshot(m)
    with pytest.raises(LorakitError, match="shape"):
        m.load_adapter(bad, "second")
    assert_unchanged(m, snap)
    assert list(m.configs) == ["default"]


def test_cli_info(tmp_path, capsys):
    from lorakit.cli import main

    folder = _saved(tmp_path / "a")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "r=4" in out and "parameters: 1,792" in out  # 2 layers × (q: 4·64+64·4, v: 4·64+32·4)
    assert main(["info", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
