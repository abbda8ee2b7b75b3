"""Merge == unmerged outputs; unmerge restores; merged models round-trip through plain transformers."""

import warnings

import pytest
import torch
from conftest import randomize_adapters, snapshot, assert_unchanged, tiny_convnet, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, LorakitError, LoraLayer, get_lora_model
from lorakit.core.merge import save_merged


@pytest.mark.parametrize("make, cfg", [
    (tiny_llama, dict(r=4, target_modules="all-linear", modules_to_save=["lm_head"])),
    (tiny_gpt2, dict(r=4, target_modules=["c_attn", "c_proj", "c_fc", "wte"], use_rslora=True)),
])
def test_merged_equals_unmerged_and_unmerge_restores(make, cfg, ids):
    base_state = {k: v.clone() for k, v in make().state_dict().items()}
    m = get_lora_model(make(), LoraConfig(**cfg))
    randomize_adapters(m)
    with torch.no_grad():
        want = m(ids).logits
        m.merge_adapter()
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)
        m.unmerge_adapter()
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)
    for name, layer in ((n, mod) for n, mod in m.model.named_modules() if isinstance(mod, LoraLayer)):
        key = name + ".weight"
        torch.testing.assert_close(layer.base_layer.weight, base_state[key], atol=1e-6, rtol=0)


def test_merge_and_unload_roundtrips_through_transformers(tmp_path, ids):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]))
    randomize_adapters(m)
    with torch.no_grad():
        want = m(ids).logits
    plain = m.merge_and_unload()
    assert not any(isinstance(mod, LoraLayer) for mod in plain.modules())
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=1e-5)
    save_merged(plain, tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(LorakitError, match="not empty"):
        save_merged(plain, tmp_path / "merged")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_tied_embeddings_are_untied_when_one_side_merges(tmp_path, ids, target):
    m = get_lora_model(tiny_llama(tie=True), LoraConfig(r=4, target_modules=[target, "q_proj"]))
    assert m.model.lm_head.weight is m.model.model.embed_tokens.base_layer.weight if target == "embed_tokens" \
        else m.model.lm_head.base_layer.weight is m.model.model.embed_tokens.weight
    randomize_adapters(m)
    with torch.no_grad():
        want = m(ids).logits
    with pytest.warns(UserWarning, match="tied embeddings"):
        plain = m.merge_and_unload()
    assert plain.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, want, atol=1e-5, rtol=1e-5)
    save_merged(plain, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_modules_to_save_on_tied_head_is_saved_untied(tmp_path, ids):
    m = get_lora_model(tiny_llama(tie=True), LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(m)
    with torch.no_grad():
        want = m(ids).logits
    with pytest.warns(UserWarning, match="tie_word_embeddings=False"):
        plain = m.merge_and_unload()
    save_merged(plain, tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, want, atol=1e-5, rtol=1e-5)


def test_conv2d_merge_equals_unmerged():
    m = get_lora_model(tiny_convnet(), LoraConfig(r=2, target_modules=["conv1", "conv2", "conv3"]))
    randomize_adapters(m)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = m(x)
        plain = m.merge_and_unload()
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)


def test_safe_merge_refuses_non_finite_and_changes_nothing(ids):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(m)
    with torch.no_grad():
        m.model.model.layers[1].self_attn.v_proj.lora_B["default"][0, 0] = float("inf")
    snap = snapshot(m)
    with pytest.raises(LorakitError, match="inf/NaN"):
        m.merge_adapter(safe=True)
    assert_unchanged(m, snap)
    assert all(not layer.merged_adapters for layer in m.modules() if isinstance(layer, LoraLayer))


def test_disable_while_merged_is_refused(ids):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    m.merge_adapter()
    with pytest.raises(LorakitError, match="unmerge"):
        with m.disable_adapter():
            pass


def test_bf16_merge_is_closer_than_a_bf16_add(ids):
    m = get_lora_model(tiny_llama().to(torch.bfloat16), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(m, std=0.02)
    layer = m.model.model.layers[0].self_attn.q_proj
    exact = layer.base_layer.weight.float() + layer.delta_weight("default")
    m.merge_adapter()
    err = (layer.base_layer.weight.float() - exact).abs().max()
    assert err <= exact.abs().max() * 2 ** -8  # one bf16 rounding of the sum, no more
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.unmerge_adapter()
