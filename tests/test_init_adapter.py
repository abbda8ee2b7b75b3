"""train.init_adapter: a saved adapter trained further — its own shape, its scores as the "before",
and for DPO its frozen copy as the reference (an SFT adapter aligned without merging it)."""

import json
import math

import pytest
import torch
import yaml

from conftest import VOCAB, interrupt_at, tiny_llama
from lorakit import LorakitError
from lorakit.config import LoraConfig, run_config_from_dict
from lorakit.core.lora_model import get_lora_model
from lorakit.training.loop import train

QUIET = dict(show_progress=False, echo=lambda s: None)


def _prefs(tmp_path, n=28):
    rows = [{"prompt": f"normalize the date March {d % 28 + 1}", "chosen": f"2021-03-{d % 28 + 1:02d}",
             "rejected": ["March", "the 3rd of March", "Mar"][d % 3] + f" {d % 28 + 1}, 2021"} for d in range(n)]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, out, objective="sft", lora=None, **train):
    return run_config_from_dict({
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_len": 64, "val_size": 6},
        "lora": lora or {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"out_dir": str(out), "objective": objective, "lr": 3e-3, "max_steps": 7, "batch_size": 2,
                  "grad_accum": 2, "warmup": 1, "log_every": 1, "threads": 1, "plot": False, **train}})


def test_using_adapter_runs_a_frozen_adapter_and_leaves_what_trains_alone():
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    lm.add_adapter("other", LoraConfig(r=2, alpha=2, target_modules=["v_proj", "up_proj"]), activate=False)
    for name, p in lm.named_parameters():
        if "lora_" in name:  # B starts at zero: give both adapters an effect
            torch.nn.init.normal_(p.data, std=0.05)
    x = torch.randint(3, VOCAB, (2, 9))
    trains = {n for n, p in lm.named_parameters() if p.requires_grad}
    lm.set_adapter("other")
    want = lm(input_ids=x).logits
    lm.set_adapter("default")
    with torch.no_grad():
        default = lm(input_ids=x).logits
        with lm.using_adapter("other"):
            got = lm(input_ids=x).logits
        again = lm(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(got, default, atol=1e-3)
    assert torch.equal(again, default) and {n for n, p in lm.named_parameters() if p.requires_grad} == trains
    assert trains and all(n.endswith(".default") for n in trains)
    with pytest.raises(LorakitError, match="unknown adapter"):
        with lm.using_adapter("nope"):
            pass


def test_the_starting_model_runs_without_dropout_and_gives_back_train_mode():
    from lorakit.training.objective import INIT_ADAPTER, starting_model

    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]))
    lm.add_adapter(INIT_ADAPTER, LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["q_proj", "v_proj"]),
                   activate=False)
    for name, p in lm.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(p.data, std=0.2)
    x = torch.randint(3, VOCAB, (2, 9))
    lm.train()
    with torch.no_grad():
        with starting_model(lm):
            a, b = lm(input_ids=x).logits, lm(input_ids=x).logits
            assert not lm.model.training
        c, d = lm(input_ids=x).logits, lm(input_ids=x).logits
    assert torch.equal(a, b) and not torch.allclose(c, d)  # the reference is fixed; the policy's dropout is on
    assert all(m.training for m in lm.model.modules())


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    data = _prefs(tmp)
    return data, train(_cfg(tiny_model_dir, data, tmp / "sft", lora={"r": 4, "alpha": 8, "dropout": 0.0,
                                                                       "target_modules": ["q_proj", "v_proj"]}), **QUIET)


def test_an_adapter_trained_further_starts_where_it_ended(tiny_model_dir, tmp_path, sft_run):
    data, first = sft_run
    # the run folder stands for its adapter; the lora section given (r 8, all-linear) yields to the adapter's
    res = train(_cfg(tiny_model_dir, data, tmp_path / "more", lora={"r": 8, "alpha": 16}, max_steps=4,
                     init_adapter=str(first.out_dir)), **QUIET)
    assert res.before_label == "start"
    assert res.before["eval_loss"] == pytest.approx(first.after["eval_loss"], abs=1e-5)  # the same model
    assert res.after["eval_loss"] < res.before["eval_loss"]
    saved = yaml.safe_load((tmp_path / "more" / "config.yaml").read_text())
    assert saved["lora"]["r"] == 4 and saved["train"]["init_adapter"] == str(first.adapter_dir)
    config = json.loads((res.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert not (res.adapter_dir / "init").exists()  # the frozen copy is not saved
    first_line = json.loads((tmp_path / "more" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_line["model"] == "start"
    assert "trained further from" in (res.adapter_dir / "README.md").read_text()


def test_dpo_from_an_sft_adapter_uses_its_frozen_copy_as_reference(tiny_model_dir, tmp_path, sft_run, monkeypatch):
    from safetensors.torch import load_file

    data, first = sft_run
    cfg = lambda out, **kw: _cfg(tiny_model_dir, data, tmp_path / out, "dpo", init_adapter=str(first.adapter_dir), **kw)
    full = train(cfg("a"), **QUIET)
    plain = train(_cfg(tiny_model_dir, data, tmp_path / "plain", "dpo", max_steps=1), **QUIET)
    # the reference is the start: loss log 2 and no margin before training, on a model that is not the base
    assert full.before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and full.before["eval_reward_margin"] == 0
    assert abs(full.before["eval_logp_chosen"] - plain.before["eval_logp_chosen"]) > 0.1
    assert full.after["eval_reward_margin"] > 0.1 and full.after["eval_loss"] < math.log(2)
    # the SFT adapter itself trains (not a fresh one) and the copy stays put: resuming reloads both
    start, trained = (load_file(d / "adapter_model.safetensors") for d in (first.adapter_dir, full.adapter_dir))
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)
    with monkeypatch.context() as mp:
        interrupt_at(mp, 3)
        cut = train(cfg("b"), **QUIET)
    assert cut.interrupted
    resumed = train(cfg("b", resume="latest"), **QUIET)
    assert resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.allclose(trained[k], b[k], atol=1e-6) for k in trained)


def test_init_adapter_mistakes_are_refused_before_anything_runs(tiny_model_dir, tmp_path, sft_run):
    data, first = sft_run
    with pytest.raises(LorakitError, match="not an adapter folder"):
        train(_cfg(tiny_model_dir, data, tmp_path / "x", init_adapter=str(tmp_path)), **QUIET)
    with pytest.raises(LorakitError, match="cannot use train.init_adapter: it trains an adapter further"):
        _cfg(tiny_model_dir, data, tmp_path / "x", method="full", init_adapter=str(first.adapter_dir))
    with pytest.raises(LorakitError, match="train.init_adapter cannot be combined with train.rank_schedule"):
        _cfg(tiny_model_dir, data, tmp_path / "x", lora={"r": 4}, rank_schedule="2@0,4@3",
             init_adapter=str(first.adapter_dir))
    assert not (tmp_path / "x").exists()
