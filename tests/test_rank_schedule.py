"""Progressive rank: growth keeps the output and the optimizer state, the grown adapter round-trips
through PEFT, schedules parse (and bad ones are named), and a training run grows on schedule and
resumes mid-schedule to the same adapter as an uninterrupted run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import tiny_convnet, tiny_llama
from lorakit import LorakitError, LoraModel
from lorakit.config import LoraConfig
from lorakit.core.embedding_conv import LoraConv2d, LoraEmbedding
from lorakit.core.layers import LoraLinear
from lorakit.core.lora_model import get_lora_model
from lorakit.training.rank_schedule import PlateauTracker, grow_adapter_rank, parse_rank_schedule, stage_alpha


def _trained_llama(r=2, alpha=16.0, rslora=False, r_final=8):
    model = tiny_llama()
    cfg = LoraConfig(r=r, alpha=stage_alpha(alpha, r, r_final, rslora), use_rslora=rslora, target_modules="all-linear")
    lm = get_lora_model(model, cfg)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 96, (2, 12))
    lm.train()
    for _ in range(3):  # B is non-zero and Adam has state: growth must keep both
        lm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return lm, opt, ids


@pytest.mark.parametrize("rslora", [False, True])
def test_growth_keeps_the_output_and_the_old_slice_of_adam_state(rslora):
    lm, opt, ids = _trained_llama(rslora=rslora)
    lm.eval()
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    layer = lm.model.model.layers[0].self_attn.q_proj
    old_A, old_B = layer.lora_A["default"].detach().clone(), layer.lora_B["default"].detach().clone()
    state_A = {k: v.clone() for k, v in opt.state[layer.lora_A["default"]].items()}
    scaling = layer.scaling["default"]
    grown = grow_adapter_rank(lm, "default", 8, 8, 16.0, opt)
    assert grown == 14 and layer.r["default"] == 8 and layer.scaling["default"] == scaling
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, before, atol=1e-6, rtol=0)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (8, 64) and torch.equal(A[:2], old_A) and torch.equal(B[:, :2], old_B)
    assert torch.count_nonzero(B[:, 2:]) == 0 and torch.count_nonzero(A[2:]) > 0  # new rows initialised like A
    new_state = opt.state[A]
    assert torch.equal(new_state["exp_avg"][:2], state_A["exp_avg"]) and torch.count_nonzero(new_state["exp_avg"][2:]) == 0
    assert torch.equal(new_state["step"], state_A["step"])
    assert any(p is A for g in opt.param_groups for p in g["params"])
    assert lm.configs["default"].r == 8 and lm.configs["default"].alpha == pytest.approx(16.0)
    # Training goes on with the grown parameters.
    lm.train()
    lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert torch.count_nonzero(layer.lora_B["default"][:, 2:]) > 0


def test_grown_adapter_round_trips_through_peft(tmp_path):
    peft = pytest.importorskip("peft")
    lm, opt, ids = _trained_llama()
    grow_adapter_rank(lm, "default", 8, 8, 16.0, opt)
    lm.save_pretrained(tmp_path / "a")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == pytest.approx(16.0)
    assert load_file(tmp_path / "a" / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    lm.eval()
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
        torch.testing.assert_close(theirs(input_ids=ids).logits, lm(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_embedding_and_conv_layers_grow_without_changing_output():
    torch.manual_seed(0)
    emb = LoraEmbedding(nn.Embedding(20, 8))
    emb.add_adapter("default", 2, 4)
    nn.init.normal_(emb.lora_A["default"])
    conv = LoraConv2d(nn.Conv2d(3, 6, 3, padding=1))
    conv.add_adapter("default", 2, 4)
    nn.init.normal_(conv.lora_B["default"])
    x_ids, x_img = torch.randint(0, 20, (3, 5)), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = emb(x_ids), conv(x_img)
        emb.grow_adapter("default", 6, 12)
        conv.grow_adapter("default", 6, 12)
        torch.testing.assert_close(emb(x_ids), before[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(conv(x_img), before[1], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must be larger"):
        conv.grow_adapter("default", 4, 8)


@pytest.mark.parametrize("spec,message", [
    ("2@5,8@10", "start at step 0"),
    ("8@0,2@10", "ranks must be positive and increase"),
    ("2@0,8@10,16@10", "steps must increase"),
    ("2@0", "at least two ranks"),
    ("two@0", "write it like"),
    ("plateau:2,x", "write it like"),
])
def test_bad_schedules_are_named(spec, message):
    with pytest.raises(LorakitError, match=message):
        parse_rank_schedule(spec)


def test_schedules_parse_from_strings_and_lists():
    s = parse_rank_schedule("2@0, 8@200, 16@600")
    assert (s.ranks, s.steps, s.final) == ((2, 8, 16), (0, 200, 600), 16)
    assert [s.rank_at(x) for x in (0, 199, 200, 599, 600, 10_000)] == [2, 2, 8, 8, 16, 16]
    assert parse_rank_schedule([[2, 0], [4, 3]]).steps == (0, 3) and parse_rank_schedule("plateau:2,4").steps is None
    assert stage_alpha(32, 2, 16, False) / 2 == pytest.approx(32 / 16)
    assert stage_alpha(32, 2, 16, True) / 2 ** 0.5 == pytest.approx(32 / 16 ** 0.5)


def test_plateau_tracker_grows_after_patience():
    t = PlateauTracker(patience=2, min_delta=0.01)
    assert [t.update(x) for x in (1.0, 0.8, 0.799, 0.798)] == [False, False, False, True]


def _train_cfg(model_dir, data, out, **train):
    from lorakit.config import run_config_from_dict

    return run_config_from_dict({
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_len": 64, "val_size": 8},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "train": {"out_dir": str(out), "lr": 3e-3, "max_steps": 8, "batch_size": 2, "warmup": 1, "log_every": 1,
                  "threads": 1, "rank_schedule": "2@0,4@3,8@6", "plot": False, **train},
    })


def _rows(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"repeat {i}", "output": f"{i} {i}"}) + "\n" for i in range(40)))
    return path


def test_training_grows_on_schedule_and_resumes_mid_schedule(tiny_model_dir, tmp_path, monkeypatch):
    from lorakit.training.loop import train

    data = _rows(tmp_path)
    full = train(_train_cfg(tiny_model_dir, data, tmp_path / "full"), show_progress=False, echo=lambda s: None)
    events = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    assert [(e["step"], e["rank"]) for e in events] == [(3, 4), (6, 8)]
    assert json.loads((full.adapter_dir / "adapter_config.json").read_text())["r"] == 8

    # Stop after step 4 (rank 4, checkpoint), then resume: the same adapter as the uninterrupted run.
    cut = _train_cfg(tiny_model_dir, data, tmp_path / "cut", save_every=4)
    import lorakit.training.loop as train_mod

    real_save = train_mod.save_checkpoint

    def save_then_stop(out, progress, *a, **k):
        path = real_save(out, progress, *a, **k)
        if progress.step == 4:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cut, show_progress=False, echo=lambda s: None)
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    ckpt_cfg = json.loads(next((tmp_path / "cut" / "checkpoints").glob("*/adapter/adapter_config.json")).read_text())
    assert ckpt_cfg["r"] == 4  # a mid-schedule checkpoint is a valid rank-4 adapter
    resumed = train(_train_cfg(tiny_model_dir, data, tmp_path / "cut", resume="latest"), show_progress=False, echo=lambda s: None)
    a = load_file(full.adapter_dir / "adapter_model.safetensors")
    b = load_file(resumed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_schedule_config_errors(tiny_model_dir, tmp_path):
    from lorakit.config import run_config_from_dict
    from lorakit.training.loop import train

    data = _rows(tmp_path)
    with pytest.raises(LorakitError, match="ends at rank 8 but lora.r is 16"):
        cfg = _train_cfg(tiny_model_dir, data, tmp_path / "x")
        cfg.lora.r = 16
        train(cfg, show_progress=False, echo=lambda s: None)
    with pytest.raises(LorakitError, match="set train.eval_every"):
        run_config_from_dict({"train": {"rank_schedule": "plateau:2,8"}})
    assert not (tmp_path / "x").exists()


def test_cnn_conv_lora_merge_equals_unmerged():
    model = tiny_convnet()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    lm = get_lora_model(model, LoraConfig(r=4, alpha=8, target_modules=convs[-2:], rank_pattern={convs[-1]: 2}))
    for layer in (m for m in lm.modules() if isinstance(m, (LoraConv2d, LoraLinear))):
        nn.init.normal_(layer.lora_B["default"], std=0.1)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        unmerged = lm(x)
        merged = lm.merge_and_unload()(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_plateau_schedule_grows_when_eval_loss_stalls(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.training.loop as train_mod
    from lorakit.training.loop import train

    losses = iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # a flat eval loss: every evaluation is a stall

    def fake_evaluate(lm, tok, prepared, max_len, batch_size, eval_samples, device, base, objective=None):
        return {"eval_loss": next(losses, 1.0), "eval_ppl": 2.7}, []

    monkeypatch.setattr(train_mod, "evaluate_adapter", fake_evaluate)
    cfg = _train_cfg(tiny_model_dir, _rows(tmp_path), tmp_path / "run", rank_schedule="plateau:2,4,8", eval_every=1,
                     rank_patience=1, max_steps=5)
    res = train(cfg, show_progress=False, echo=lambda s: None)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"event"' in x]
    # step 1 sets the best loss, step 2 stalls -> 4, step 3 sets the new best, step 4 stalls -> 8
    assert [(e["step"], e["rank"]) for e in events] == [(2, 4), (4, 8)]
    assert json.loads((res.adapter_dir / "adapter_config.json").read_text())["r"] == 8
