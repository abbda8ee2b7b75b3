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


def _peft_pair(make, targets, tmp_path):
    """Adapters a (s=2) and b (s=1, fewer targets) of one rank, in lorakit and the same ones loaded in PEFT."""
    m = get_lora_model(make(), LoraConfig(r=4, alpha=8, target_modules=list(targets)), "a")
    m.add_adapter("b", LoraConfig(r=4, alpha=4, target_modules=list(targets[1:])))
    m.set_adapter(["a", "b"])
    randomize_adapters(m)
    m.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    return m, theirs


@pytest.fixture
def seeded_peft_dare(monkeypatch):
    """PEFT draws DARE's masks from torch's global generator (after initialising the new adapter, which
    also draws from it); make it draw from a generator seeded like lorakit's, so results can be compared."""
    from peft.utils import merge_utils

    def seeded(seed):
        g = torch.Generator().manual_seed(seed)

        def random_pruning(tensor, density, rescale):
            kept = tensor * torch.bernoulli(torch.full_like(tensor, density), generator=g)
            return kept / density if rescale else kept
        monkeypatch.setattr(merge_utils, "random_pruning", random_pruning)
    return seeded


@pytest.mark.parametrize("make, targets", [(tiny_llama, ("embed_tokens", "q_proj", "v_proj", "down_proj")),
                                           (tiny_gpt2, ("wte", "c_attn", "c_fc"))], ids=["llama", "gpt2"])
@pytest.mark.parametrize("method, sign", [("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"),
                                          ("dare_ties", "frequency"), ("magnitude_prune", "total"),
                                          ("ties_svd", "total"), ("dare_linear_svd", "total"),
                                          ("dare_ties_svd", "total"), ("magnitude_prune_svd", "total"),
                                          ("linear", "total")])
def test_ties_and_dare_equal_peft(make, targets, method, sign, ids, tmp_path, seeded_peft_dare):
    m, theirs = _peft_pair(make, targets, tmp_path)
    density = None if method == "linear" else 0.4
    rank = 6 if method.endswith("svd") else None
    kw = dict(density=density, majority_sign_method=sign)
    m.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", method, rank, seed=5, **kw)
    seeded_peft_dare(5)
    theirs.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type=method, svd_rank=rank,
                                svd_full_matrices=False, **kw)
    m.set_adapter("ab")
    theirs.set_adapter("ab")
    with torch.no_grad():
        mine, want = m(ids).logits, theirs.eval()(ids).logits
        base = theirs.get_base_model()
        with theirs.disable_adapter():
            plain = base(ids).logits
    assert (want - plain).abs().max() > 1e-2  # the merged adapter does change the output
    torch.testing.assert_close(mine, want, atol=1e-5, rtol=1e-5)
    if method not in ("linear",) and not method.endswith("svd"):
        # density 0.4: an entry of the merged A is zero where every adapter's entry was pruned (0.6 alone, 0.36 for two)
        zeros = [(layer.lora_A["ab"] == 0).float().mean().item() for _, layer in _layers(m) if "ab" in layer.lora_A]
        assert sum(zeros) / len(zeros) > 0.2, zeros


def test_dare_depends_on_the_seed_only(tmp_path):
    m = _peft_pair(tiny_llama, ("q_proj", "v_proj"), tmp_path)[0]
    for name, seed in (("s1", 1), ("s1again", 1), ("s2", 2)):
        torch.randn(100)  # global generator use in between must not matter
        m.add_weighted_adapter(["a", "b"], [0.5, 0.5], name, "dare_linear", density=0.5, seed=seed)
    layer = m.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(layer.lora_A["s1"], layer.lora_A["s1again"], atol=0, rtol=0)
    assert not torch.equal(layer.lora_A["s1"], layer.lora_A["s2"])


def test_ties_keeps_the_majority_sign_by_hand():
    from lorakit.core.task_merge import merge_tensors

    a = torch.tensor([3.0, -1.0, 0.5, -2.0])
    b = torch.tensor([-1.0, -2.0, 0.1, 4.0])
    # density 0.5 keeps a's 3, -2 and b's -2, 4; elected signs (total): +, -, +(0 >= 0), +
    got = merge_tensors("ties", [a, b], [1.0, 0.5], density=0.5)
    torch.testing.assert_close(got, torch.tensor([3.0, -1.0, 0.0, 2.0]))
    # frequency: index 0 has one + vote only (b's -1 was pruned), index 3 one each -> +
    got = merge_tensors("ties", [a, b], [1.0, 0.5], density=0.5, sign_method="frequency")
    torch.testing.assert_close(got, torch.tensor([3.0, -1.0, 0.0, 2.0]))


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
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="mean"), "cat, svd, linear, ties"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="ties"), "needs a density"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="cat", density=0.5), "density applies"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="ties_svd", rank=4, density=1.5),
     r"in \(0, 1\]"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="dare_ties_svd", density=0.5),
     "needs a target rank"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="ties", density=0.5), "one rank"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="n", combination_type="ties_svd", rank=4, density=0.5,
          majority_sign_method="vote"), "total, frequency"),
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


def test_cli_combine_ties_equals_the_python_api_and_checks_options_first(tiny_model_dir, two_adapters, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main

    a, b = two_adapters["alpha"], two_adapters["beta"]
    out = tmp_path / "ties"
    assert main(["combine", "--model", str(tiny_model_dir), "--adapter", f"a={a}:0.6", "--adapter", f"b={b}:0.4",
                 "--method", "dare_ties", "--density", "0.5", "--seed", "3", "--out", str(out)]) == 0
    lm = LoraModel(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    lm.load_adapter(a, "a", activate=False)
    lm.load_adapter(b, "b", activate=False)
    lm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", "dare_ties", density=0.5, seed=3)
    lm.set_adapter("ab")
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    saved = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, lm(ids).logits, atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main(["combine", "--model", "/nonexistent/model", "--adapter", f"a={a}:0.6", "--adapter", f"b={b}:0.4",
                 "--method", "ties", "--out", str(tmp_path / "never")]) == 2  # the missing density, before any load
    assert "needs a density" in capsys.readouterr().err and not (tmp_path / "never").exists()
