"""train.batch_tokens: a step's size in tokens. Packed runs turn it into rows (and train exactly as
the same rows given directly); unpacked runs form micro-batches that stay within the budget with
their padding; the memory fit keeps the budget and raises the accumulation."""

import json

import pytest

from lorakit.config import resolve_batch_tokens, run_config_from_dict
from lorakit.data.packing import padded_rows, rounded_length
from lorakit.planning.fit import HEADROOM, fit_to_memory
from lorakit.training.loop import train
from test_memory_fit import OVERHEAD, SMOL
from test_train import _cfg, _data

QUIET = dict(show_progress=False, echo=lambda s: None)


def test_padded_groups_stay_within_the_token_budget():
    lengths = [5, 40, 7, 12, 33, 90, 8, 8, 21, 64, 3, 17]
    groups = padded_rows(lengths, batch_size=99, seed=0, max_tokens=64)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each example once
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 64 or len(g) == 1  # a 90-token example goes alone
    assert [90] in [[lengths[i] for i in g] for g in groups]
    assert len(groups) < len(lengths)  # short examples share a micro-batch
    assert padded_rows(lengths, 4, 0) == padded_rows(lengths, 4, 0, max_tokens=0)  # off: batch_size groups
    # run padding-free (as training runs them), a group is one row of its lengths' sum, rounded up,
    # filled best-fit as packed rows are
    free = padded_rows(lengths, batch_size=99, seed=0, max_tokens=64, padding_free=True)
    assert sorted(i for g in free for i in g) == list(range(len(lengths)))
    assert all(rounded_length(sum(lengths[i] for i in g)) <= 64 or len(g) == 1 for g in free)
    assert sorted(sorted(lengths[i] for i in g) for g in free) == [[3, 21, 40], [5, 7, 8, 8], [12, 17, 33], [64], [90]]
    assert len(free) < len(groups)  # no padding: fewer, fuller micro-batches
    # the rounding counts: a row of 833 tokens is padded to 896, so a budget of 833 holds rows of 832 at most
    near = [400, 433, 5]
    assert sorted(sorted(near[i] for i in g) for g in padded_rows(near, 1, 0, 833, padding_free=True)) == [[5, 433], [400]]
    assert padded_rows(near, 1, 0, 896, padding_free=True) == [[1, 0, 2]]


def test_packed_budget_is_rows_and_trains_as_those_rows(tiny_model_dir, tmp_path):
    data = _data(tmp_path)
    by_tokens = _cfg(tiny_model_dir, data, tmp_path / "tokens", batch_tokens=200, batch_size=7, grad_accum=3, max_steps=4)
    resolved, line = resolve_batch_tokens(by_tokens)
    assert (resolved.train.batch_size, resolved.train.grad_accum, resolved.train.batch_tokens) == (3, 1, 0)
    assert line == "train.batch_tokens 200: 3 packed row(s) of 64 tokens per step"
    assert resolve_batch_tokens(resolved) == (resolved, None)  # a saved (resolved) config stays as it is
    rows = _cfg(tiny_model_dir, data, tmp_path / "rows", batch_size=3, grad_accum=1, max_steps=4)
    train(by_tokens, **QUIET)
    train(rows, **QUIET)
    losses = lambda run: [json.loads(x)["loss"] for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
                          if '"loss"' in x]
    assert losses("tokens") == losses("rows") and len(losses("rows")) == 4
    saved = run_config_from_dict(__import__("yaml").safe_load((tmp_path / "tokens" / "config.yaml").read_text()))
    assert (saved.train.batch_size, saved.train.batch_tokens) == (3, 0)


def test_unpacked_budget_forms_padding_free_micro_batches_by_tokens(tiny_model_dir, tmp_path, monkeypatch):
    import lorakit.training.loop as loop

    cfg = _cfg(tiny_model_dir, _data(tmp_path), tmp_path / "run", batch_tokens=120, grad_accum=2, max_steps=3)
    cfg.data.packing = False
    assert cfg.micro_tokens() == 60 and resolve_batch_tokens(cfg)[0] is cfg
    seen = []
    real = loop.collate

    def spy(item, *a, **k):
        batch = real(item, *a, **k)
        seen.append(batch.input_ids.shape)
        assert batch.attention_mask is None  # one row of several examples, per-document attention
        return batch
    monkeypatch.setattr(loop, "collate", spy)
    res = train(cfg, **QUIET)
    assert res.steps == 3 and len(seen) >= 6
    assert all(rows == 1 and 0 < n <= 60 for rows, n in seen)


def test_memory_fit_keeps_the_token_budget_and_raises_accumulation():
    cfg = run_config_from_dict({"train": {"batch_tokens": 8192, "grad_accum": 1, "grad_checkpointing": True},
                                "data": {"max_len": 1024, "packing": False}})
    two_rows = fit_to_memory(SMOL, run_config_from_dict({"train": {"batch_size": 2, "grad_checkpointing": True},
                                                          "data": {"max_len": 1024}}), "bf16", OVERHEAD, float("inf"))
    fit = fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, two_rows.estimate / HEADROOM + 1)
    assert fit.grad_accum == 4 and fit.batch_size == cfg.train.batch_size
    assert fit.changes == [f"train.grad_accum 1 → 4 (micro-batches of 2,048 of the step's 8,192 tokens; estimated peak "
                           f"{fit.estimate / 2**30:.2f} GiB)"]
    with pytest.raises(Exception, match="batch_tokens must be 0"):
        run_config_from_dict({"train": {"batch_tokens": -1}})
