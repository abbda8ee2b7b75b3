"""Full and freeze fine-tuning (train.method full | freeze): what trains, fp32 master weights,
kill-and-resume equals an uninterrupted run, and the saved folder loads in transformers with the
trained model's scores."""

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_at, tiny_gpt2, tiny_llama, tiny_train_cmd
from lorakit import LorakitError
from lorakit.config import run_config_from_dict
from lorakit.core.full_tuning import FullTuning, select_trainable
from lorakit.training.loop import train
from lorakit.training.optim import build_optimizer
from test_train import _cfg, _data

QUIET = dict(show_progress=False, echo=lambda s: None)


def test_select_trainable_full_freeze_and_module_patterns():
    m = tiny_llama(tie=True)
    everything = [n for n, _ in m.named_parameters()]
    assert select_trainable(m, "full") == everything
    # the tied embedding/head is one parameter: freezing the embeddings freezes the head too
    assert select_trainable(m, "full", freeze_embeddings=True) == [n for n in everything if "embed_tokens" not in n]
    assert select_trainable(m, "full", modules=["lm_head"]) == ["model.embed_tokens.weight"]
    last = select_trainable(m, "freeze", 1)
    assert last == [n for n in everything if n.startswith("model.layers.1.")] and len(last) == 9
    assert select_trainable(m, "freeze", -1, ["mlp"]) == [f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    assert select_trainable(m, "freeze", 2, r".*\.q_proj") == [f"model.layers.{i}.self_attn.q_proj.weight" for i in (0, 1)]
    g = tiny_gpt2()  # Conv1D blocks are found too
    assert select_trainable(g, "freeze", 1, ["c_attn"]) == ["transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias"]
    with pytest.raises(LorakitError, match="has 2 decoder blocks; give a number from 1 to 2"):
        select_trainable(m, "freeze", 3)
    with pytest.raises(LorakitError, match="matches no module with weights in the trained blocks"):
        select_trainable(m, "freeze", 1, ["lm_head"])


def test_master_weights_keep_updates_that_bf16_would_round_away():
    m = tiny_llama().to(torch.bfloat16)
    tuned = FullTuning(m, select_trainable(m, "freeze", 1), "freeze")
    trained = dict(m.named_parameters())
    assert {trained[n].dtype for n in tuned.names} == {torch.float32}
    assert {p.dtype for n, p in trained.items() if n not in tuned.names} == {torch.bfloat16}
    assert all(p.requires_grad == (n in tuned.names) for n, p in trained.items())
    w = trained["model.layers.1.mlp.up_proj.weight"]
    before = w.detach().clone()
    opt = torch.optim.SGD([w], lr=1.0)
    w.grad = torch.full_like(w, 1e-5)  # an update far below bf16's resolution for weights of size ~0.02
    opt.step()
    assert torch.allclose(w - before, torch.full_like(w, -1e-5), atol=1e-8, rtol=0)
    # the same step taken on bf16 weights leaves most of them where they were
    w16 = before.bfloat16()
    assert (w16 - torch.full_like(w16, 1e-5) == w16).float().mean() > 0.8


def test_full_runs_exclude_biases_and_norms_from_weight_decay():
    m = tiny_gpt2()
    opt = build_optimizer(FullTuning(m, select_trainable(m, "full"), "full"), 1e-3, 0.1, 0.0)
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in m.named_parameters():
        assert (id(p) in decay) == (p.ndim >= 2), name


@pytest.mark.parametrize("method", ["full", "freeze"])
def test_interrupt_and_resume_equals_uninterrupted_and_the_folder_loads_in_transformers(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, method):
    from transformers import AutoModelForCausalLM

    from lorakit.data.dataset import prepare_data
    from lorakit.training.evaluate import eval_loss

    data = _data(tmp_path)
    extra = dict(method=method, lr=1e-3, max_steps=7, freeze_layers=1)
    whole = train(_cfg(tiny_model_dir, data, tmp_path / "whole", **extra), **QUIET)
    assert whole.steps == 7 and whole.adapter_dir == tmp_path / "whole" / "model"
    cfg = _cfg(tiny_model_dir, data, tmp_path / "cut", **extra)
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        first = train(cfg, **QUIET)
    assert first.interrupted and first.steps == 3
    saved = load_file(tmp_path / "cut" / "checkpoints" / "step-00000003" / "model" / "trained.safetensors")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = select_trainable(base, method, 1)
    assert sorted(saved) == sorted(names) and {t.dtype for t in saved.values()} == {torch.float32}
    cfg.train.resume = "latest"
    second = train(cfg, **QUIET)
    assert second.steps == 7 and second.adapter_dir == tmp_path / "cut" / "model"
    a, b = load_file(tmp_path / "whole" / "model" / "model.safetensors"), load_file(second.adapter_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    losses = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in x]
    assert losses("cut") == pytest.approx(losses("whole"), abs=1e-6)
    # what trained changed, what was frozen is the base's, bit for bit
    base_state = base.state_dict()
    for k, v in a.items():
        changed = not torch.equal(v, base_state[k])
        assert changed == (k in names), k
    # the folder is a transformers model whose held-out loss is the run's final eval loss
    loaded = AutoModelForCausalLM.from_pretrained(second.adapter_dir)
    assert loaded.dtype == torch.float32
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(second.adapter_dir)
    prepared = prepare_data(cfg.data, tok, cfg.train.seed, tmp_path / "cache")
    loss = eval_loss(loaded, prepared.val, cfg.data.max_len, cfg.train.batch_size, tok.pad_token_id, torch.device("cpu"))
    assert loss == pytest.approx(second.after["eval_loss"], abs=1e-5)
    assert second.after["eval_loss"] < second.before["eval_loss"]
    card = (second.adapter_dir / "README.md").read_text()
    assert f"{method} fine-tuned" in card and "library_name: transformers" in card


def test_bf16_freeze_run_trains_fp32_masters_over_a_bf16_frozen_base(tiny_model_dir, tmp_path):
    res = train(_cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", method="freeze", freeze_layers=1,
                     precision="bf16", max_steps=3), **QUIET)
    state = load_file(res.adapter_dir / "model.safetensors")
    assert {t.dtype for t in state.values()} == {torch.float32}
    assert json.loads((res.adapter_dir / "config.json").read_text())["dtype"] == "float32"
    assert res.after["eval_loss"] < res.before["eval_loss"]


@pytest.mark.parametrize("override, message", [
    ({"model": {"quantize": "nf4"}}, "cannot use model.quantize: a quantized base cannot train its weights"),
    ({"lora": {"use_dora": True}}, "cannot use lora.use_dora"),
    ({"train": {"rank_schedule": "2@0,8@4"}, "lora": {"r": 8}}, "cannot use train.rank_schedule"),
    ({"train": {"freeze_layers": 0}}, "train.freeze_layers 0 trains nothing"),
])
def test_adapter_options_are_refused_with_full_tuning(override, message):
    raw = {"train": {"method": "full"}}
    for section, values in override.items():
        raw.setdefault(section, {}).update(values)
    with pytest.raises(LorakitError, match=message):
        run_config_from_dict(raw)


def test_cli_freeze_run_prints_the_model_folder(tiny_model_dir, tmp_path):
    cmd, run = tiny_train_cmd(tiny_model_dir, tmp_path, "--train.method", "freeze", "--train.freeze_layers", "1",
                              "--train.max_steps", "2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"model:        {run / 'model'}  (transformers folder, float32)" in proc.stdout
    assert "freeze fine-tuning: trainable params: 36,992" in proc.stdout
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()


def test_mfu_and_estimate_count_what_a_freeze_run_computes_and_keeps():
    from transformers import LlamaConfig

    from lorakit.planning.estimate import estimate_memory, shape_from_config
    from lorakit.training.mfu import train_flops_per_token

    m = tiny_llama()
    per_block = 64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64
    FullTuning(m, select_trainable(m, "freeze", 1), "freeze")
    assert train_flops_per_token(m) == 2 * per_block + 6 * per_block  # block 0: forward only; block 1 trains
    FullTuning(m, select_trainable(m, "full"), "full")
    assert train_flops_per_token(m) == 6 * 2 * per_block  # the head (label positions only) is left out
    shape = shape_from_config(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                          num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))
    block = shape.layer_linear_params + 2 * 576
    frz = estimate_memory(shape, "freeze", batch=1, seq=512, dtype="bf16", freeze_layers=2)
    full = estimate_memory(shape, "full", batch=1, seq=512, dtype="bf16")
    assert frz.trainable_params == 2 * block and frz.frozen_params == shape.total_params - 2 * block
    assert full.trainable_params == shape.total_params and full.frozen_params == 0
    for est in (frz, full):  # fp32 master weight + fp32 gradient + AdamW's two moments + the bf16 autocast copy
        n = est.trainable_params
        assert est.components["trained weights (fp32 master copies)"] == 4 * n
        assert est.components["gradients (fp32)"] == 4 * n and est.components["optimizer state (adamw)"] == 8 * n
        assert est.components["autocast copies of the trained weights"] == 2 * n
    # only the trained blocks keep activations: 2 of 30
    assert frz.components["activations"] == pytest.approx(full.components["activations"] * 2 / 30)


def test_freeze_run_with_the_8bit_optimizer_resumes_exactly(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    data = _data(tmp_path)
    extra = dict(method="freeze", freeze_layers=1, optimizer="adamw8bit", lr=1e-3, max_steps=5)
    whole = train(_cfg(tiny_model_dir, data, tmp_path / "whole", **extra), **QUIET)
    cfg = _cfg(tiny_model_dir, data, tmp_path / "cut", **extra)
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert train(cfg, **QUIET).interrupted
    cfg.train.resume = "latest"
    again = train(cfg, **QUIET)
    a, b = load_file(whole.adapter_dir / "model.safetensors"), load_file(again.adapter_dir / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert whole.after["eval_loss"] < whole.before["eval_loss"]
