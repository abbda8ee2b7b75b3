"""DoRA: equal to PEFT's (outputs and gradients, both ways of loading), exact merge/unmerge, mixed batches."""

import pytest
import torch
from conftest import assert_unchanged, randomize_adapters, snapshot, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, LorakitError, LoraLayer, LoraModel, get_lora_model

peft = pytest.importorskip("peft")

MODELS = [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])]
IDS = ["llama", "gpt2"]


def _dora(make, targets, name="default", **kw):
    m = get_lora_model(make(), LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True, **kw), name)
    randomize_adapters(m)  # A, B and the magnitudes all random: every term of the formula matters
    return m


@pytest.mark.parametrize("make, targets", MODELS, ids=IDS)
def test_fresh_dora_adapter_changes_nothing(make, targets, ids):
    base = make()
    m = get_lora_model(make(), LoraConfig(r=4, alpha=8, target_modules=targets, use_dora=True))
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, base(ids).logits, atol=1e-6, rtol=0)
    layer = next(mod for _, mod in m.model.named_modules() if isinstance(mod, LoraLayer))
    W = layer.dense_weight()
    torch.testing.assert_close(layer.lora_magnitude["default"], W.norm(dim=1))  # m starts at ‖W‖ per output


@pytest.mark.parametrize("make, targets", MODELS, ids=IDS)
def test_lorakit_dora_loads_in_peft(make, targets, ids, tmp_path):
    m = _dora(make, targets)
    m.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert theirs.peft_config["default"].use_dora
    with torch.no_grad():
        mine, want = m(ids).logits, theirs(ids).logits
        plain = make()(ids).logits
    assert (want - plain).abs().max() > 0.1
    torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, targets", MODELS, ids=IDS)
def test_peft_dora_loads_in_lorakit(make, targets, ids, tmp_path):
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    mine = LoraModel.from_pretrained(make(), tmp_path)
    assert mine.configs["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make, targets", MODELS, ids=IDS)
def test_gradients_equal_peft(make, targets, ids, tmp_path):
    # the norm ‖W + s·BA‖ is a constant in backward (DoRA §4.3, PEFT): gradients of A, B and m agree
    m = _dora(make, targets)
    m.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path, is_trainable=True)
    for model in (m, theirs):
        model.train()
        torch.manual_seed(0)  # the same masks in GPT-2's own dropouts
        model(ids, labels=ids).loss.backward()
    mine = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    want = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert len(mine) == len(want) == 3 * sum(isinstance(x, LoraLayer) for x in m.modules())
    rename = {".lora_A.default.weight": ".lora_A.default", ".lora_B.default.weight": ".lora_B.default",
              ".lora_magnitude_vector.default.weight": ".lora_magnitude.default"}
    for name, grad in want.items():
        ours = "model." + name.removeprefix("base_model.model.")
        for theirs_suffix, our_suffix in rename.items():
            ours = ours.replace(theirs_suffix, our_suffix)
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(mine[ours], grad, atol=1e-5, rtol=1e-4, msg=lambda e: f"{name}: {e}")


def test_dropout_follows_peft(ids, tmp_path):
    # with dropout, both DoRA terms read the dropped-out input (PEFT's rule); same masks, same loss
    m = _dora(tiny_llama, ["q_proj", "v_proj"], dropout=0.3)
    m.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    losses = []
    for model in (m, theirs):
        model.train()
        torch.manual_seed(3)
        losses.append(model(ids, labels=ids).loss)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    m.eval()
    with torch.no_grad():
        assert (m(ids, labels=ids).loss - losses[0]).abs() > 1e-4  # dropout did act in training


@pytest.mark.parametrize("make, targets", MODELS, ids=IDS)
def test_merge_equals_unmerged_and_unmerge_restores(make, targets, ids):
    m = _dora(make, targets)
    m.add_adapter("plain", LoraConfig(r=2, alpha=2, target_modules=targets))
    randomize_adapters(m, seed=2)
    m.set_adapter(["plain", "default"])
    with torch.no_grad():  # trained-like magnitudes (near ‖W‖): a tiny m/‖W‖ would make unmerging ill-conditioned
        for layer in (x for x in m.modules() if isinstance(x, LoraLayer)):
            w = layer.dense_weight().norm(dim=1)
            layer.lora_magnitude["default"].copy_(w * (1 + 0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(4))))
    before = {n: p.detach().clone() for n, p in m.model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        want = m(ids).logits
        m.merge_adapter()  # the plain adapter first, then the DoRA one on top of it
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)
        m.unmerge_adapter()
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)
    for n, p in m.model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        merged = m.merge_and_unload()(ids).logits
    torch.testing.assert_close(merged, want, atol=1e-5, rtol=1e-5)


def test_merged_weights_equal_peft_merge(ids, tmp_path):
    m = _dora(tiny_llama, ["q_proj", "v_proj"])
    m.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).merge_and_unload()
    mine = m.merge_and_unload()
    for (n, a), (_, b) in zip(sorted(mine.state_dict().items()), sorted(theirs.state_dict().items())):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_mixed_batch_rows_equal_single_adapter_runs(ids):
    m = _dora(tiny_llama, ["q_proj", "v_proj"], name="d")
    m.add_adapter("p", LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(m, seed=3)
    rows = ["d", None, "p"]
    with torch.no_grad():
        want = []
        for i, name in enumerate(rows):
            if name is None:
                with m.disable_adapter():
                    want.append(m(ids[i:i + 1]).logits)
            else:
                m.set_adapter(name)
                want.append(m(ids[i:i + 1]).logits)
        m.eval()
        with m.mixed_batch(rows):
            got = m(ids).logits
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5)


def test_dora_refusals_change_nothing(tmp_path):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]), "a")
    snap = snapshot(m)
    with pytest.raises(LorakitError, match="DoRA .*Linear and Conv1D.*embed_tokens"):
        m.add_adapter("d", LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert_unchanged(m, snap)
    m.add_adapter("d", LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(LorakitError, match="DoRA adapters \\['d'\\] cannot be combined"):
        m.add_weighted_adapter(["a", "d"], [0.5, 0.5], "ad", "cat")
    assert sorted(m.configs) == ["a", "d"]


def test_dora_run_resumes_exactly_and_its_adapter_loads_in_peft(tiny_model_dir, tmp_path, monkeypatch):
    """`train.method dora` trains the magnitudes too; a run interrupted at step 2 of 4 and resumed
    equals the uninterrupted one, and PEFT scores the saved adapter at the run's own eval loss."""
    import json

    from safetensors.torch import load_file

    from conftest import adding_data, interrupt_at
    from lorakit.base import load_model
    from lorakit.config import run_config_from_dict
    from lorakit.data.dataset import prepare_data
    from lorakit.training.evaluate import eval_loss
    from lorakit.training.loop import train

    data = adding_data(tmp_path)

    def cfg(out):
        return run_config_from_dict({
            "model": {"name": str(tiny_model_dir)},
            "data": {"path": str(data), "max_len": 48, "val_size": 4, "cache": False},
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
            "train": {"method": "dora", "out_dir": str(out), "lr": 1e-2, "max_steps": 4, "batch_size": 2,
                      "threads": 1, "plot": False}})

    quiet = dict(show_progress=False, echo=lambda s: None)
    result = train(cfg(tmp_path / "full"), **quiet)
    saved = json.loads((tmp_path / "full" / "adapter" / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    base, tok = load_model(str(tiny_model_dir), "cpu")
    fresh = load_model(str(tiny_model_dir), "cpu")[0].model.layers[0].self_attn.q_proj.weight
    state = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    m = state["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"]
    assert (m - fresh.norm(dim=1)).abs().max() > 1e-4  # the magnitudes trained
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "full" / "adapter").eval()
    run = cfg(tmp_path / "full")
    val = prepare_data(run.data, tok, run.train.seed, None).val
    loss = eval_loss(theirs.base_model.model, val, 48, 2, tok.pad_token_id, torch.device("cpu"))
    assert loss == pytest.approx(result.after["eval_loss"], abs=1e-5)

    with monkeypatch.context() as mp:
        interrupt_at(mp, 2)
        assert train(cfg(tmp_path / "cut"), **quiet).interrupted
    resumed = cfg(tmp_path / "cut")
    resumed.train.resume = "latest"
    assert train(resumed, **quiet).steps == 4
    cut = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    for key in state:
        torch.testing.assert_close(cut[key], state[key], atol=1e-6, rtol=0)


def test_lora_only_exports_refuse_dora_and_say_merge(tmp_path):
    from lorakit.export.adapter import read_export_adapter, refuse

    m = _dora(tiny_llama, ["q_proj"])
    m.save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="DoRA adapter .*cannot apply as LoRA factors; merge it"):
        refuse(read_export_adapter(tmp_path), "a llama.cpp LoRA GGUF")


def test_dora_over_a_4bit_base_equals_dora_over_its_dequantized_weights(ids):
    """QLoRA + DoRA: the norm reads the 4-bit weight through the frozen layer and its dequantized
    view; the result is what the same adapter gives over a float copy of the dequantized weights."""
    pytest.importorskip("bitsandbytes")
    from lorakit.quant.bnb import QuantSpec, dequantize_model, quantize_model

    q = tiny_llama()
    quantize_model(q, QuantSpec("nf4"))
    m = get_lora_model(q, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True))
    randomize_adapters(m)
    with torch.no_grad():
        got = m(ids).logits
        dequantize_model(m.model)  # now float layers holding exactly the dequantized weights
        want = m(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    m.train()
    loss = m(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "lora_magnitude" in n)
