"""Preference objectives (train.objective dpo | orpo | simpo): pair formats, encoding and batching,
the losses against their formulas, per-token log-probs against plain logits, and training runs
(the preference rate rises, kill-and-resume equals an uninterrupted run)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import VOCAB, interrupt_at, tiny_llama
from lorakit import LorakitError
from lorakit.config import run_config_from_dict
from lorakit.data.dataset import prepare_data
from lorakit.data.formats import load_examples
from lorakit.data.packing import batch_plan, collate
from lorakit.ops.loss import token_logprobs
from lorakit.ops.preference import dpo_losses, orpo_losses, sequence_sums, simpo_losses
from lorakit.training.loop import train

QUIET = dict(show_progress=False, echo=lambda s: None)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prefs(tmp_path, n=28):
    rows = [{"prompt": f"normalize the date March {d % 28 + 1}", "chosen": f"2021-03-{d % 28 + 1:02d}",
             "rejected": ["March", "the 3rd of March", "Mar"][d % 3] + f" {d % 28 + 1}, 2021"} for d in range(n)]
    return _write(tmp_path / "prefs.jsonl", rows)


def test_pair_layouts_of_trl_and_llama_factory_normalise_to_one_shape(tmp_path):
    user = {"role": "user", "content": "Q?"}
    layouts = [
        {"prompt": "Q?", "chosen": "yes", "rejected": "no"},  # TRL standard
        {"prompt": [user], "chosen": [{"role": "assistant", "content": "yes"}],  # TRL conversational
         "rejected": [{"role": "assistant", "content": "no"}]},
        {"chosen": [user, {"role": "assistant", "content": "yes"}],  # TRL implicit prompt
         "rejected": [user, {"role": "assistant", "content": "no"}]},
        {"instruction": "Q?", "chosen": "yes", "rejected": "no"},  # LLaMA-Factory alpaca ranking
        {"conversations": [{"from": "human", "value": "Q?"}], "chosen": {"from": "gpt", "value": "yes"},  # sharegpt
         "rejected": {"from": "gpt", "value": "no"}},
    ]
    for i, rec in enumerate(layouts):
        (ex,) = [e for _, e in load_examples([_write(tmp_path / f"{i}.jsonl", [rec])])]
        assert ex == {"messages": [user, {"role": "assistant", "content": "yes"}], "rejected": "no"}, rec
    (ex,) = [e for _, e in load_examples([_write(tmp_path / "s.jsonl", [{**layouts[0], "system": "Be brief."}])])]
    assert ex["messages"][0] == {"role": "system", "content": "Be brief."}
    bad = [({"prompt": "Q?", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
             "rejected": "no"}, "'chosen' must be one assistant answer to the prompt, got 2 turn"),
           ({"chosen": "yes", "rejected": "no"}, "no prompt: give a 'prompt'"),
           ({"prompt": "Q?", "chosen": "yes", "rejected": ""}, "field 'rejected' is empty")]
    for rec, message in bad:
        with pytest.raises(LorakitError, match=message) as err:
            load_examples([_write(tmp_path / "bad.jsonl", [rec])])
        assert "bad.jsonl:1" in str(err.value)


def test_pairs_encode_the_answer_only_and_stay_together(tmp_path):
    from conftest import build_tokenizer

    tok = build_tokenizer()
    cfg = run_config_from_dict({"data": {"path": str(_prefs(tmp_path)), "max_len": 64, "val_size": 6}}).data
    p = prepare_data(cfg, tok, seed=0, pairs=True)
    assert p.pairs and len(p.train) == 2 * 22 and len(p.val) == 2 * 6
    for j in range(0, len(p.train), 2):
        c, r = p.train[j], p.train[j + 1]
        first = next(i for i, x in enumerate(c.labels) if x != -100)
        assert c.input_ids[:first] == r.input_ids[:first]  # one prompt, two answers
        answer = tok.decode([x for x in c.labels if x != -100])
        assert answer.startswith("2021-03-") and answer.endswith("<|im_end|>")
        assert tok.decode([x for x in r.labels if x != -100]).endswith(", 2021<|im_end|>")
    # the validation pairs are the held-out records, whole
    assert {tuple(e.input_ids) for e in p.val}.isdisjoint({tuple(e.input_ids) for e in p.train})
    for packing in (True, False):
        plan = batch_plan(p.train, 64, 3, packing, seed=1, pairs=True)
        flat = [i for item in plan for i in (sum(item, []) if packing else item)]
        assert sorted(flat) == list(range(len(p.train)))
        for item in plan:
            idx = sum(item, []) if packing else item
            assert all(idx[k] % 2 == 0 and idx[k + 1] == idx[k] + 1 for k in range(0, len(idx), 2))
            batch = collate(item, p.train, packing, tok.pad_token_id)
            assert set(batch.doc_ids[batch.doc_ids >= 0].tolist()) == set(idx)
    # the same file trains SFT on the chosen answers
    sft = prepare_data(cfg, tok, seed=0)
    assert not sft.pairs and len(sft.train) == 22
    assert tok.decode([x for x in sft.train[0].labels if x != -100]).startswith("2021-03-")
    with pytest.raises(LorakitError, match="not a preference pair"):
        prepare_data(run_config_from_dict({"data": {"path": str(_write(tmp_path / "sft.jsonl", [
            {"instruction": "hi", "output": "ho"}] * 3)), "val_size": 0}}).data, tok, seed=0, pairs=True)


def test_losses_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(5, generator=g) * 30 for _ in range(4))
    losses, c_rew, r_rew = dpo_losses(pc, pr, rc, rr, 0.1)
    want = -torch.log(torch.sigmoid(0.1 * ((pc - rc) - (pr - rr))))
    assert torch.allclose(losses, want, atol=1e-6) and torch.allclose(c_rew, 0.1 * (pc - rc))
    mc, mr = pc / 12, pr / 9  # mean per-token log-probs
    odds = lambda m: m.exp() / (1 - m.exp())  # noqa: E731
    losses, c_rew, _ = orpo_losses(mc, mr, 0.25)
    assert torch.allclose(losses, -0.25 * torch.log(torch.sigmoid(torch.log(odds(mc) / odds(mr)))), atol=1e-5)
    assert torch.allclose(c_rew, 0.25 * mc)
    losses, _, _ = simpo_losses(mc, mr, 2.0, 0.5)
    assert torch.allclose(losses, -torch.log(torch.sigmoid(2.0 * (mc - mr) - 0.5)), atol=1e-6)
    sums, counts = sequence_sums(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1, 0, 1, 3]), 4)
    assert sums.tolist() == [2.0, 4.0, 0.0, 4.0] and counts.tolist() == [1.0, 2.0, 0.0, 1.0]


@pytest.mark.parametrize("head_trains", [False, True])
def test_token_logprobs_equal_log_softmax_of_the_logits_with_gradients(head_trains):
    m = tiny_llama(seed=1)
    for p in m.parameters():
        p.requires_grad_(False)
    m.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    m.lm_head.weight.requires_grad_(head_trains)
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :4] = -100
    weights = torch.linspace(0.5, 2.0, 12)  # a per-token weighting, as a preference loss gives
    got = token_logprobs(m, ids, labels, chunk=5)
    (got * weights).sum().backward()
    g_got = m.model.layers[0].mlp.up_proj.weight.grad.clone()
    m.zero_grad()
    logp = F.log_softmax(m(ids).logits.float(), -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    want = logp[labels[:, 1:] != -100]
    (want * weights).sum().backward()
    assert got.shape == (12,) and torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(g_got, m.model.layers[0].mlp.up_proj.weight.grad, atol=1e-5)


def _cfg(model_dir, data, out, objective, **train):
    return run_config_from_dict({
        "model": {"name": str(model_dir)},
        "data": {"path": str(data), "max_len": 64, "val_size": 6},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"out_dir": str(out), "objective": objective, "lr": 3e-3, "max_steps": 7, "batch_size": 2,
                  "grad_accum": 2, "warmup": 1, "log_every": 1, "threads": 1, "plot": False, **train}})


@pytest.mark.parametrize("objective", ["dpo", "orpo", "simpo"])
def test_a_preference_run_prefers_the_chosen_answers_and_logs_rewards(tiny_model_dir, tmp_path, objective):
    res = train(_cfg(tiny_model_dir, _prefs(tmp_path), tmp_path / "run", objective), **QUIET)
    assert res.steps == 7 and res.after["eval_loss"] < res.before["eval_loss"]
    assert res.after["eval_pref_acc"] == 100.0 > res.before["eval_pref_acc"]
    assert res.after["eval_reward_margin"] > res.before["eval_reward_margin"]
    if objective == "dpo":  # the base is its own reference: loss log 2, no margin
        assert res.before["eval_loss"] == pytest.approx(math.log(2), abs=1e-6) and res.before["eval_reward_margin"] == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == 7 and all({"reward_margin", "reward_acc", "logp_chosen", "logp_rejected"} <= r.keys() for r in steps)
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert ("nll" in steps[0]) == (objective == "orpo")
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_dpo_kill_and_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    data = _prefs(tmp_path)
    full = train(_cfg(tiny_model_dir, data, tmp_path / "a", "dpo"), **QUIET)
    with monkeypatch.context() as mp:
        interrupt_at(mp, 3)
        cut = train(_cfg(tiny_model_dir, data, tmp_path / "b", "dpo"), **QUIET)
    assert cut.interrupted and cut.steps == 3
    resumed = train(_cfg(tiny_model_dir, data, tmp_path / "b", "dpo", resume="latest"), **QUIET)
    assert resumed.steps == 7 and resumed.final_loss == pytest.approx(full.final_loss, abs=1e-6)
    a, b = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    logged = [[json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("a", "b")]
    margins = [[r["reward_margin"] for r in lines if "loss" in r] for lines in logged]
    assert margins[0] == pytest.approx(margins[1], abs=1e-5)


def test_dpo_needs_an_adapter_and_orpo_trains_a_freeze_run(tiny_model_dir, tmp_path):
    with pytest.raises(LorakitError, match="train.objective dpo compares with a reference"):
        _cfg(tiny_model_dir, "x.jsonl", tmp_path / "r", "dpo", method="full")
    with pytest.raises(LorakitError, match="train.objective must be sft, dpo, orpo or simpo"):
        _cfg(tiny_model_dir, "x.jsonl", tmp_path / "r", "kto")
    res = train(_cfg(tiny_model_dir, _prefs(tmp_path), tmp_path / "run", "orpo", method="freeze", freeze_layers=1,
                     lr=1e-3), **QUIET)
    assert res.after["eval_loss"] < res.before["eval_loss"] and (tmp_path / "run" / "model" / "config.json").is_file()
