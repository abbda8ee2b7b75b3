"""Weighted combination: cat is exact, svd is exact at full rank and optimal when truncated."""

import pytest
import torch
from conftest import randomize_adapters, snapshot, assert_unchanged, tiny_convnet, tiny_gpt2, tiny_llama

from lorakit import LoraConfig, LorakitError, LoraLayer, LoraModel, get_lora_model

peft = pytest.importorskip("peft")


def _two_adapters(make=tiny_llama, targets=("q_proj", "v_proj", "embed_tokens"), rslora=False):
    m = get_lora_model(make(), LoraConfig(r=4, alpha=8, target_modules=list(targets), use_rslora=rslora), "a")
    m.add_adapter("b", LoraConfig(r=2, alpha=6, target_modules=list(targets[:1]) + list(targets[2:]), use_rslora=rslora))
    m.set_adapter(["a", "b"])
    randomize_adapters(m)
    return m


def _layers(m):
    return [(n, layer) for n, layer in m.model.named_modules() if isinstance(layer, LoraLayer)]


@pytest.mark.parametrize("rslora", [False, True])
def test_cat_is_exactly_the_weighted_sum(rslora):
    m = _two_adapters(rslora=rslora)
    m.add_weighted_adapter(["a", "b"], [0.7, -0.3], "ab", combination_type="cat")
    for name, layer in _layers(m):
        want = sum(w * layer.delta_weight(a) for a, w in (("a", 0.7), ("b", -0.3)) if a in layer.lora_A)
        torch.testing.assert_close(layer.delta_weight("ab"), want, atol=1e-6, rtol=0)
        assert layer.r["ab"] == sum(layer.r[a] for a in ("a", "b") if a in layer.lora_A)


@pytest.mark.parametrize("make, targets", [(tiny_llama, ("q_proj", "v_proj", "embed_tokens")),
                                           (tiny_gpt2, ("c_attn", "c_fc", "wte")),
                                           (tiny_convnet, ("conv1", "conv2", "conv3"))])
def test_svd_full_rank_is_exact(make, targets):
    m = _two_adapters(make, targets)
    m.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="svd", rank=6)
    for name, layer in _layers(m):
        want = sum(w * layer.delta_weight(a) for a, w in (("a", 0.7), ("b", 0.3)) if a in layer.lora_A)
        torch.testing.assert_close(layer.delta_weight("ab"), want, atol=1e-5, rtol=1e-5)
        assert layer.scaling["ab"] == 1.0


def test_svd_truncated_is_the_best_rank_k_approximation():
    m = _two_adapters()
    m.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ab", combination_type="svd", rank=3)
    layer = m.model.model.layers[0].self_attn.q_proj
    want = 0.5 * layer.delta_weight("a") + 0.5 * layer.delta_weight("b")
    s = torch.linalg.svdvals(want)
    err = torch.linalg.matrix_norm(layer.delta_weight("ab") - want)
    torch.testing.assert_close(err, s[3:].pow(2).sum().sqrt(), atol=1e-5, rtol=1e-4)  # Eckart–Young


def test_linear_matches_peft(ids, tmp_path):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    m.add_adapter("b", LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    m.set_adapter(["a", "b"])
    randomize_adapters(m)
    m.save_pretrained(tmp_path)
    m.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", combination_type="linear")
    m.set_adapter("ab")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    theirs.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", combination_type="linear")
    theirs.set_adapter("ab")
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, theirs.eval()(ids).logits, atol=1e-5, rtol=1e-5)


def test_combined_adapter_saves_and_loads_in_peft(tmp_path, ids):
    m = _two_adapters()
    m.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    m.set_adapter("ab")
    with torch.no_grad():
        want = m(ids).logits
        m.set_adapter(["a", "b"])
        for layer in (mod for _, mod in _layers(m)):
            for a, w in (("a", 0.7), ("b", 0.3)):
                if a in layer.lora_A:
                    layer.set_scale(a, layer.scaling[a] * w)
        torch.testing.assert_close(m(ids).logits, want, atol=1e-5, rtol=1e-5)  # = 0.7·ΔA + 0.3·ΔB applied live
    m.save_pretrained(tmp_path, adapters=["ab"])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab").eval()
    mine = LoraModel.from_pretrained(tiny_llama(), tmp_path / "ab")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine(ids).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(adapters=["a", "zz"], weights=[1, 1], adapter_name="n"), "unknown adapters"),
    (dict(adapters=["a", "b"], weights=[1], adapter_name="n"), "one weight per adapter"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "already exists"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="ties"), "cat, svd, linear"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="svd"), "needs a target rank"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="linear"), "one rank"),
])
def test_bad_combinations_change_nothing(kwargs, message):
    m = _two_adapters()
    snap = snapshot(m)
    with pytest.raises(LorakitError, match=message):
        m.add_weighted_adapter(**kwargs)
    assert_unchanged(m, snap)
    assert sorted(m.configs) == ["a", "b"]
