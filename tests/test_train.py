"""The training loop on a tiny local model: results, resume equals an uninterrupted run,
checkpoints survive a kill, and bad runs stop with a clear message."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_at
from lorakit import LorakitError, LoraModel
from lorakit.config import run_config_from_dict
from lorakit.training.loop import train

ROOT = Path(__file__).resolve().parents[1]


def _data(tmp_path, n=40):
    path = tmp_path / "train.jsonl"
    rows = [{"instruction": f"normalize the date {m} {d}", "output": f"2021-{i % 12 + 1:02d}-{d:02d}"}
            for i, (m, d) in enumerate((["March", "May", "June", "July"][i % 4], i % 27 + 1) for i in range(n))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(model_dir, data, out, **train):
    return run_config_from_dict({
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_len": 64, "val_size": 8},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"out_dir": str(out), "lr": 3e-3, "max_steps": 6, "batch_size": 2, "grad_accum": 2,
                  "warmup": 1, "log_every": 1, "threads": 1, **train},
    })


def test_tiny_run_writes_a_peft_adapter_logs_and_plot(tiny_model_dir, tmp_path, ids=None):
    res = train(_cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run"), show_progress=False, echo=lambda s: None)
    out = tmp_path / "run"
    assert res.steps == 6 and not res.interrupted and res.tokens > 0 and res.tokens_per_s > 0
    assert res.peak_flops > 1e8 and 0 < res.mfu < 1  # a tiny model is far from any matmul peak
    # the MFU counts the decoder per token and the head (V x 64, frozen) per label position
    from transformers import AutoModelForCausalLM

    from lorakit.training.mfu import head_flops_per_label, mfu, train_flops_per_token
    lm = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter", is_trainable=True)
    per_token, per_label = train_flops_per_token(lm.model), head_flops_per_label(lm.model)
    assert per_label == 4 * 64 * lm.model.config.vocab_size
    assert 0 < res.loop_labels < res.tokens
    assert res.mfu == pytest.approx(mfu(res.tokens_per_s, per_token, res.peak_flops, res.loop_labels / res.train_s,
                                        per_label), rel=1e-3)
    assert res.mfu > 1.01 * mfu(res.tokens_per_s, per_token, res.peak_flops)
    assert res.after["eval_loss"] < res.before["eval_loss"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3, 4, 5, 6]
    # the adapter loads in PEFT with the same logits as in lorakit
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    x = torch.randint(3, 200, (2, 10))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter").eval()
    ours = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(ours(x).logits, AutoModelForCausalLM.from_pretrained(tiny_model_dir)(x).logits, atol=1e-4)


@pytest.mark.parametrize("packing", [True, False])
def test_interrupt_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path, monkeypatch, packing):
    data = _data(tmp_path)
    quiet = dict(show_progress=False, echo=lambda s: None)
    cfg = _cfg(tiny_model_dir, data, tmp_path / "cut", max_steps=8)
    cfg.data.packing = packing
    full_cfg = _cfg(tiny_model_dir, data, tmp_path / "full2", max_steps=8)
    full_cfg.data.packing = packing
    full = train(full_cfg, **quiet)
    with monkeypatch.context() as m:
        interrupt_at(m, 3)
        first = train(cfg, **quiet)
    assert first.interrupted and first.steps == 3
    assert (tmp_path / "cut" / "checkpoints" / "step-00000003" / "adapter" / "adapter_model.safetensors").is_file()
    cfg.train.resume = "latest"
    second = train(cfg, **quiet)
    assert second.steps == 8 and not second.interrupted
    assert second.before["eval_loss"] == pytest.approx(first.before["eval_loss"], abs=1e-5)  # read back from metrics.jsonl
    a = load_file(tmp_path / "full2" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    losses = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses("cut") == pytest.approx(losses("full2"), abs=1e-6)


KILLER = r"""
import os, signal, sys
import lorakit.training.checkpoint as ck
from lorakit.config import load_yaml, run_config_from_dict
from lorakit.training.loop import train
real = ck.torch.save
def save_then_die(obj, path, *a, **k):
    real(obj, path, *a, **k)
    if "step-00000004" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)   # dies in the middle of writing the step-4 checkpoint
ck.torch.save = save_then_die
train(run_config_from_dict(load_yaml(sys.argv[1])), show_progress=False)
"""


def test_kill_during_checkpoint_write_keeps_the_previous_one(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", save_every=2, max_steps=6)
    from lorakit.config import dump_yaml

    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tmp_path / "cfg.yaml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == ["step-00000002"]
    assert any(p.name.startswith(".step-00000004") for p in ckpts.iterdir())  # the half-written one, ignored
    cfg.train.resume = "latest"
    res = train(cfg, show_progress=False, echo=lambda s: None)
    assert res.steps == 6
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004", "step-00000006"]  # stale temp folder gone


def test_existing_out_dir_is_refused_and_left_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LorakitError, match="already holds a run.*overwrite"):
        train(_cfg(tiny_model_dir, _data(tmp_path), out), show_progress=False, echo=lambda s: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.training.objective as tr  # the SFT objective calls the loss

    real, calls = tr.causal_lm_loss_sum, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        s, n = real(*a, **k)
        return (s * float("nan"), n) if calls["n"] > 8 else (s, n)  # 2 micro-batches per step: step 5 goes bad

    monkeypatch.setattr(tr, "causal_lm_loss_sum", poisoned)
    with pytest.raises(LorakitError, match=r"loss became nan at step 5; the last good checkpoint is .*step-00000004"):
        train(_cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", save_every=2), show_progress=False, echo=lambda s: None)


@pytest.mark.parametrize("layers, message", [
    ({"lora": {"rr": 4}}, "unknown key 'rr'; did you mean 'r'"),
    ({"trian": {}}, "unknown section 'trian'; did you mean 'train'"),
    ({"train": {"schedule": "step"}}, "constant, linear, cosine"),
])
def test_config_errors_name_the_key(layers, message):
    with pytest.raises(LorakitError, match=message):
        run_config_from_dict(layers)


def test_shipped_example_configs_load():
    from lorakit.config import load_yaml

    files = sorted((ROOT / "examples").glob("*.yaml"))
    assert files, "no example configs shipped"
    for f in files:
        run_config_from_dict(load_yaml(str(f)), str(f))


def test_cli_train_flags_and_errors(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    base = [sys.executable, "-m", "lorakit", "train", "--model", str(tiny_model_dir), "--data", str(data),
            "--out", str(tmp_path / "run"), "--train.max_steps", "2", "--data.max_len", "64", "--train.threads", "1"]
    ok = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "adapter:" in ok.stdout and "eval loss" in ok.stdout
    again = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    bad = subprocess.run(base + ["--lora.r", "many"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert bad.returncode == 2 and "lora.r: cannot read 'many' as int" in bad.stderr


def test_a_run_without_held_out_data_reports_no_scores(tiny_model_dir, tmp_path, capsys):
    from lorakit.cli.report import print_train_summary

    cfg = run_config_from_dict({**_cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run").to_dict(),
                                "data": {"path": str(_data(tmp_path)), "max_len": 64, "val_size": 0}})
    lines = []
    res = train(cfg, show_progress=False, echo=lines.append)
    assert res.steps == 6 and res.before == {} and res.after == {}
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in logged if "model" in r], "no evaluation records without held-out data"
    capsys.readouterr()
    print_train_summary(res, cfg)
    out = capsys.readouterr().out
    assert "no held-out evaluation" in out and "nan" not in out and "inf" not in out
    plateau = run_config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "out_dir": str(tmp_path / "p"),
                                                               "rank_schedule": "plateau:2,4", "eval_every": 2}})
    with pytest.raises(LorakitError, match="no held-out examples: set data.val_size"):
        train(plateau, show_progress=False, echo=lambda s: None)
    assert not (tmp_path / "p").exists()


def test_gradient_checkpointing_gives_the_same_adapter(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    quiet = dict(show_progress=False, echo=lambda s: None)
    plain = _cfg(tiny_model_dir, data, tmp_path / "plain", max_steps=3)
    ckpt = _cfg(tiny_model_dir, data, tmp_path / "ckpt", max_steps=3, grad_checkpointing=True)
    for c in (plain, ckpt):
        c.lora.dropout = 0.1  # recomputation restores the RNG state: the same dropout masks
    train(plain, **quiet)
    train(ckpt, **quiet)
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "ckpt" / "adapter" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_resuming_a_pissa_run_is_refused_clearly(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", max_steps=2)
    cfg.lora.init = "pissa"
    train(cfg, show_progress=False, echo=lambda s: None)
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    cfg.train.resume = "latest"
    with pytest.raises(LorakitError, match="lora.init=pissa is not supported"):
        train(cfg, show_progress=False, echo=lambda s: None)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_eval_samples_zero_skips_generation_scoring(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_lora_model
    from lorakit.data.dataset import Prepared
    from lorakit.data.templates import encode_example
    from lorakit.base import load_tokenizer
    from lorakit.training.evaluate import evaluate_adapter

    def _evaluate(lm, tok, prepared, cfg, device, base):
        return evaluate_adapter(lm, tok, prepared, cfg.data.max_len, cfg.train.batch_size, cfg.train.eval_samples,
                                device, base)

    tok = load_tokenizer(str(tiny_model_dir))
    chat = [{"role": "user", "content": "hi"}]
    enc = encode_example({"messages": chat + [{"role": "assistant", "content": "yo"}]}, "chatml", tok)
    prepared = Prepared([enc], [enc], "chatml", val_chats=[(chat, "yo")], scorer=lambda a, b: a == b)
    lm = get_lora_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=2))
    cfg = _cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", eval_samples=0)
    scores, answers = _evaluate(lm, tok, prepared, cfg, torch.device("cpu"), base=False)
    assert "exact_match" not in scores and answers == [] and scores["eval_loss"] > 0
    cfg = _cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", eval_samples=1)
    assert "exact_match" in _evaluate(lm, tok, prepared, cfg, torch.device("cpu"), base=False)[0]


def test_mfu_counts_the_frozen_matmuls_four_times_the_adapter_six_and_the_head_per_label():
    from conftest import tiny_llama
    from lorakit import LoraConfig, get_lora_model
    from lorakit.training.mfu import head_flops_per_label, mfu, train_flops_per_token

    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    # per layer: q 64x64, k 32x64, v 32x64, o 64x64, gate/up 128x64, down 64x128; the head (96x64) excluded
    frozen = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64 + 3 * 128 * 64)
    trainable = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert train_flops_per_token(lm.model) == 4 * frozen + 6 * trainable
    # the head (96 x 64) runs at label positions only: logits forward + the hidden state's gradient
    assert head_flops_per_label(lm.model) == 4 * 96 * 64
    lm.model.get_output_embeddings().weight.requires_grad_(True)  # a trained head: + its weight's gradient
    assert head_flops_per_label(lm.model) == 6 * 96 * 64
    assert mfu(1000.0, 2e6, 4e9) == 0.5 and mfu(1.0, 1.0, 0.0) == 0.0
    assert mfu(1000.0, 2e6, 4e9, labels_per_s=250.0, flops_per_label=8e6) == 1.0  # (2e9 + 2e9) / 4e9


def test_the_matmul_peak_leaves_the_global_generator_alone():
    from lorakit.training.mfu import matmul_peak_flops

    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    assert matmul_peak_flops(torch.float32, n=64, reps=1) > 0
    assert torch.equal(torch.rand(3), want)  # measured before and after the loop: resume stays exact


def test_a_slow_matmul_peak_shrinks_to_its_time_budget():
    from lorakit.training.mfu import _shrunk_size, matmul_peak_flops

    assert _shrunk_size(1024, 0.015, 6, 1.0) == 1024  # fp32 here: 15 ms a matmul, kept
    assert _shrunk_size(1024, 2.0, 6, 1.0) == 447  # emulated bf16: 1024·(1/12)^(1/3)
    assert _shrunk_size(1024, 1e6, 6, 1.0) == 128 and _shrunk_size(100, 5.0, 6, 1.0) == 100
    assert matmul_peak_flops(torch.float32, n=256, reps=2, budget_s=1e-9) > 0  # measured at n=128


def test_the_matmul_peak_is_the_best_of_its_sizes(monkeypatch):
    import lorakit.training.mfu as mfu

    seen = []
    rates = {1024: 1.4e12, 2048: 2.3e12, 64: 1e9}  # a BLAS whose 1,024 kernel is the slow one (AMX, 2 cores)
    monkeypatch.setattr(mfu, "_matmul_flops", lambda dtype, device, size, *a: seen.append(size) or rates[size])
    assert mfu.matmul_peak_flops(torch.bfloat16) == 2.3e12 and seen == [1024, 2048]
    assert mfu.matmul_peak_flops(torch.bfloat16, n=64) == 1e9 and seen[-1] == 64


def test_the_optimizer_is_torch_fused_adamw_with_the_plain_updates():
    from lorakit import LoraConfig, get_lora_model
    from lorakit.training.optim import build_optimizer
    from conftest import tiny_llama

    torch.manual_seed(0)
    lm = get_lora_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    params = [p for p in lm.parameters() if p.requires_grad]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = build_optimizer(lm, 1e-2, 0.1, 0.0)
    plain = torch.optim.AdamW(copies, lr=1e-2, weight_decay=0.1)
    assert opt.defaults["fused"] is True
    for step in range(4):
        for p, c in zip(params, copies):
            p.grad = torch.randn_like(p)
            c.grad = p.grad.clone()
        opt.step()
        plain.step()
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.detach(), c.detach(), atol=1e-6, rtol=1e-5)
    before = [p._version for p in params]
    opt.step()
    assert all(p._version > v for p, v in zip(params, before))  # caches keyed on versions see the update
