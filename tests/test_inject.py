"""Target matching, defaults, freezing, the report, switching, mixed batches, bad configs."""

import pytest
import torch
from conftest import (VOCAB, assert_unchanged, copy, randomize_adapters, snapshot, tiny_bloom, tiny_gpt2,
                      tiny_llama)
from torch import nn

from lorakit import LoraConfig, LorakitError, LoraLayer, get_lora_model
from lorakit.core.inject import ModulesToSave, lora_layers


def _wrapped(model):
    return sorted(n for n, _ in lora_layers(model))


def test_fresh_adapter_bit_identical_and_only_adapters_train(ids):
    base = tiny_llama()
    with torch.no_grad():
        want = base(ids).logits
    m = get_lora_model(base, LoraConfig(r=4, alpha=8, modules_to_save=["lm_head"]))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, want)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    m.train()
    for _ in range(3):
        loss = m(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in m.named_parameters() if not torch.equal(v, before[k])}
    assert changed, "training changed nothing"
    assert all(".lora_A." in k or ".lora_B." in k or ".modules_to_save." in k for k in changed), changed
    assert any(".lora_B." in k for k in changed) and any("modules_to_save" in k for k in changed)


def test_default_targets_per_architecture():
    llama = get_lora_model(tiny_llama()).model
    assert {n.rsplit(".", 1)[1] for n in _wrapped(llama)} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gpt2 = get_lora_model(tiny_gpt2()).model
    assert {n.rsplit(".", 1)[1] for n in _wrapped(gpt2)} == {"c_attn", "c_proj", "c_fc"}
    assert all(m.fan_in_fan_out for _, m in lora_layers(gpt2))
    bloom = get_lora_model(tiny_bloom()).model
    assert {n.rsplit(".", 1)[1] for n in _wrapped(bloom)} == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}


def test_target_forms_exclude_layers_and_patterns():
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear")).model
    assert len(_wrapped(m)) == 14 and "lm_head" not in _wrapped(m)
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules=r".*\.(q|v)_proj")).model
    assert len(_wrapped(m)) == 4
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules=["self_attn.q_proj", "model.layers.1.mlp.up_proj"])).model
    assert _wrapped(m) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])).model
    assert len(_wrapped(m)) == 10
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], layers_to_transform=[1])).model
    assert _wrapped(m) == ["model.layers.1.self_attn.q_proj"]
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"],
                                                 rank_pattern={r"layers\.0\.self_attn\.q_proj": 2}, alpha_pattern={"v_proj": 3}))
    layers = dict(lora_layers(m.model))
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.1.self_attn.q_proj"].r["default"] == 4
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == pytest.approx(3 / 4)


def test_report_matches_peft_counts():
    from peft import LoraConfig as PeftConfig, get_peft_model

    ours = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    theirs = get_peft_model(tiny_llama(), PeftConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    trainable, total = theirs.get_nb_trainable_parameters()
    line, groups = ours.trainable_report()
    assert line.startswith(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: ")
    assert groups["q_proj (Linear)"] == {"modules": 2, "params": 2 * (4 * 64 + 64 * 4), "ranks": {4}}
    assert groups["lm_head (full copy)"]["params"] == VOCAB * 64


def test_bias_options_set_trainable():
    m = get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="lora_only"))
    names = [n for n, p in m.named_parameters() if p.requires_grad and n.endswith("bias")]
    assert names == ["model.transformer.h.0.attn.c_attn.base_layer.bias", "model.transformer.h.1.attn.c_attn.base_layer.bias"]
    m = get_lora_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"], bias="all"))
    assert sum(n.endswith("bias") for n, p in m.named_parameters() if p.requires_grad) > 10


def test_switch_disable_delete(ids):
    base = tiny_llama()
    with torch.no_grad():
        y_base = base(ids).logits
    m = get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "a")
    m.add_adapter("b", LoraConfig(r=2, target_modules=["o_proj"], modules_to_save=["lm_head"]))
    randomize_adapters(m, 1)  # only b trains now (it was activated last)
    m.set_adapter("a")
    randomize_adapters(m, 2)
    with torch.no_grad():
        y_a = m(ids).logits
        m.set_adapter("b")
        y_b = m(ids).logits
        m.set_adapter(["a", "b"])
        y_ab = m(ids).logits
        with m.disable_adapter():
            torch.testing.assert_close(m(ids).logits, y_base)
    assert not torch.allclose(y_a, y_b) and not torch.allclose(y_ab, y_a)
    m.set_adapter("a")
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A.a", ".lora_B.a")) for n in trainable), trainable
    m.delete_adapter("b")
    assert not any(isinstance(mod, ModulesToSave) for mod in m.modules())
    assert type(m.model.model.layers[0].self_attn.o_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, y_a)
    m.delete_adapter("a")
    assert not any(isinstance(mod, LoraLayer) for mod in m.modules())
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, y_base)


def test_mixed_batch_rows_equal_single_adapter_runs(ids):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), "a")
    m.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj", "k_proj"], modules_to_save=["lm_head"]))
    m.set_adapter(["a", "b"])
    randomize_adapters(m, 3)
    rows = ["a", None, "b"]
    with torch.no_grad():
        mixed = m(ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            if name is None:
                with m.disable_adapter():
                    single = m(ids[i:i + 1]).logits
            else:
                m.set_adapter(name)
                single = m(ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], single, atol=1e-5, rtol=1e-5)
        out = m.generate(ids[:, :4], adapter_names=rows, max_new_tokens=5, do_sample=False, pad_token_id=0)
        m.set_adapter("b")
        alone = m.generate(ids[2:3, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[2:3], alone)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["nonexistent_proj"]), "matched no module"),
    (dict(target_modules=["input_layernorm"]), "LlamaRMSNorm; LoRA wraps Linear"),
    (dict(target_modules=["q_proj"], modules_to_save=["no_such_head"]), "not a module"),
    (dict(target_modules=["q_proj"], layers_to_transform=[7]), "matched no module"),
])
def test_bad_targets_leave_model_unchanged(config, message):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(LorakitError, match=message):
        get_lora_model(model, LoraConfig(**config))
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=0), "positive integer"), (dict(alpha=-1), "positive"), (dict(dropout=1.5), r"\[0, 1\)"),
    (dict(bias="some"), "none, all, lora_only"), (dict(init="xavier"), "lora.init"),
    (dict(target_modules="(unclosed"), "not a valid regular expression"), (dict(rank_pattern={"q": 0}), "positive"),
    (dict(target_modules=[]), "empty list"),
])
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(LorakitError, match=message):
        LoraConfig(**kwargs)


def test_bad_adapter_names_and_duplicates_change_nothing():
    m = get_lora_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    snap = snapshot(m)
    with pytest.raises(LorakitError, match="letters, digits"):
        m.add_adapter("has.dot", LoraConfig())
    with pytest.raises(LorakitError, match="already exists"):
        m.add_adapter("default", LoraConfig())
    with pytest.raises(LorakitError, match="unknown adapter"):
        m.set_adapter("nope")
    with pytest.raises(LorakitError, match="unknown adapters"):
        m(torch.zeros(1, 3, dtype=torch.long), adapter_names=["zzz"])
    assert_unchanged(m, snap)


def test_mixed_batch_with_gradients_uses_the_grouped_path(ids):
    m = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"), "a")
    m.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"]))
    m.set_adapter(["a", "b"])
    randomize_adapters(m, 4)
    rows = ["b", "a", None]
    with torch.no_grad():
        stacked = m(ids, adapter_names=rows).logits  # inference: stacked adapters, masked rows
    grouped = m(ids, adapter_names=rows).logits  # autograd on: per-adapter row groups
    torch.testing.assert_close(grouped.detach(), stacked, atol=1e-5, rtol=1e-5)
    grouped[1].sum().backward()  # row 1 uses adapter a only
    assert m.model.model.layers[0].self_attn.q_proj.lora_B["a"].grad.abs().sum() > 0
    assert m.model.model.layers[0].self_attn.q_proj.lora_B["b"].grad is None or \
        m.model.model.layers[0].self_attn.q_proj.lora_B["b"].grad.abs().sum() == 0


def test_pattern_aliases_expand_to_plain_peft_regexes(tmp_path):
    """'@last:k', '@first:k', '@attention', '@mlp' in rank_pattern become regexes before injection,
    so the saved adapter_config.json is plain PEFT, and the ranks land where they say."""
    import json

    from conftest import tiny_llama
    from lorakit import LoraConfig, LorakitError, get_lora_model

    cfg = LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"@last:1": 16, "@mlp": 2},
                     alpha_pattern={"@attention": 3})
    lm = get_lora_model(tiny_llama(), cfg)
    ranks = {n: m.r["default"] for n, m in lm.model.named_modules() if hasattr(m, "lora_A")}
    assert ranks["model.layers.1.self_attn.q_proj"] == 16 and ranks["model.layers.1.mlp.up_proj"] == 16  # first match wins
    assert ranks["model.layers.0.mlp.up_proj"] == 2 and ranks["model.layers.0.self_attn.o_proj"] == 4
    assert lm.model.model.layers[0].self_attn.k_proj.alpha["default"] == 3
    lm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any(k.startswith("@") for k in saved["rank_pattern"]) and len(saved["rank_pattern"]) == 2
    with pytest.raises(LorakitError, match="unknown pattern alias"):
        get_lora_model(tiny_llama(), LoraConfig(rank_pattern={"@middle": 2}))
