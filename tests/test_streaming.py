"""data.streaming: the training data is read, tokenized and packed a buffer at a time. A stream
whose buffer holds all the data trains exactly as the in-memory run; a streamed run resumed after
an interruption equals the uninterrupted one across buffers and passes over the data; the data
past the validation head is not read until the run needs it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_tokenizer, interrupt_at
from lorakit import LorakitError
from lorakit.config import DataConfig, run_config_from_dict
from lorakit.data.dataset import prepare_data
from lorakit.data.packing import stream_plan
from lorakit.data.templates import Encoded
from lorakit.training.loop import train

QUIET = dict(show_progress=False, echo=lambda s: None)


def _rows(path, n, start=0):
    path.write_text("".join(json.dumps({"instruction": f"add {i} and {i}", "output": str(2 * i)}) + "\n"
                            for i in range(start, start + n)))
    return path


def _cfg(model_dir, tmp_path, out, stream, **data):
    return run_config_from_dict({
        "model": {"name": str(model_dir)},
        "data": {"path": str(_rows(tmp_path / "train.jsonl", 40)), "eval_path": str(_rows(tmp_path / "val.jsonl", 4, 100)),
                 "max_len": 64, "streaming": stream, **data},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"out_dir": str(tmp_path / out), "lr": 3e-3, "max_steps": 8, "batch_size": 2, "grad_accum": 2,
                  "warmup": 1, "log_every": 1, "threads": 1, "plot": False},
    })


def _adapter(folder):
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_a_stream_in_one_buffer_trains_as_the_in_memory_run(tiny_model_dir, tmp_path):
    memory = train(_cfg(tiny_model_dir, tmp_path, "memory", False), **QUIET)
    streamed = train(_cfg(tiny_model_dir, tmp_path, "stream", True, stream_buffer=4096), **QUIET)
    assert streamed.before["eval_loss"] == pytest.approx(memory.before["eval_loss"], abs=1e-6)
    assert streamed.tokens == memory.tokens and streamed.final_loss == pytest.approx(memory.final_loss, abs=1e-6)
    _assert_same(_adapter(tmp_path / "memory"), _adapter(tmp_path / "stream"))


def test_a_streamed_run_resumes_exactly_across_buffers_and_passes(tiny_model_dir, tmp_path, monkeypatch):
    # 40 examples in buffers of 6: several buffers per pass, and 14 steps x 4 micro-batches reach a second pass
    cfg = lambda out: _cfg(tiny_model_dir, tmp_path, out, True, stream_buffer=6, packing=False)  # noqa: E731
    full_cfg, cut_cfg = cfg("full"), cfg("cut")
    full_cfg.train.max_steps = cut_cfg.train.max_steps = 14
    full = train(full_cfg, **QUIET)
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        assert train(cut_cfg, **QUIET).interrupted
    cut_cfg.train.resume = "latest"
    resumed = train(cut_cfg, **QUIET)
    assert resumed.steps == full.steps == 14 and resumed.tokens == full.tokens
    assert full.tokens > sum(len(e.input_ids) for e in prepare_data(
        DataConfig(path=[str(tmp_path / "train.jsonl")], max_len=64, val_size=0, cache=False), build_tokenizer(), 0).train)
    _assert_same(_adapter(tmp_path / "full"), _adapter(tmp_path / "cut"))


def test_the_data_past_the_head_is_read_only_when_the_run_needs_it(tmp_path):
    data = _rows(tmp_path / "big.jsonl", 50)
    with data.open("a") as f:
        f.write("{not json\n")  # line 51: an in-memory read stops here before anything trains
    cfg = DataConfig(path=[str(data)], max_len=64, val_size=5, streaming=True, stream_buffer=8)
    prepared = prepare_data(cfg, build_tokenizer(), seed=0)
    assert prepared.train == [] and len(prepared.val) == 5 and prepared.stats["val_records"] == 5
    assert [c[0][-1]["content"] for c in prepared.val_chats] == [f"add {i} and {i}" for i in range(5)]
    assert len(prepared.first(3)) == 3  # reads 3 records past the head, not the bad line
    stream = prepared.stream()
    assert len([next(stream) for _ in range(45)]) == 45  # records 6..50
    with pytest.raises(LorakitError, match=r"big.jsonl:51: not valid JSON"):
        next(stream)
    with pytest.raises(LorakitError, match=r"big.jsonl:51"):
        prepare_data(DataConfig(path=[str(data)], max_len=64, cache=False), build_tokenizer(), seed=0)


def test_stream_plan_packs_each_buffer_and_keeps_pairs_whole():
    examples = [Encoded(list(range(n)), list(range(n))) for n in (5, 3, 7, 2, 6, 4, 8)]
    items = list(stream_plan(examples, 10, 2, True, seed=0, buffer=3))
    seen = sorted(len(chunk[i].input_ids) for item, chunk in items for row in item for i in row)
    assert seen == sorted(len(e.input_ids) for e in examples)  # every example once
    assert {len(chunk) for _, chunk in items} <= {3, 1} and all(sum(len(chunk[i].input_ids) for i in row) <= 10
                                                              for item, chunk in items for row in item)
    pairs = list(stream_plan(examples[:6], 64, 1, True, seed=0, buffer=3, pairs=True))  # buffer 3 -> 4: pairs whole
    for item, chunk in pairs:
        for row in item:
            assert sorted(row) == sorted({i for j in row for i in (j - j % 2, j - j % 2 + 1)})


def test_streaming_needs_max_steps_and_data_files(tmp_path):
    with pytest.raises(LorakitError, match="data.streaming reads the data without knowing its length: set train.max_steps"):
        run_config_from_dict({"data": {"streaming": True}})
    with pytest.raises(LorakitError, match="data.streaming reads data files or hub datasets: give --data"):
        prepare_data(DataConfig(streaming=True), build_tokenizer(), seed=0)


def test_sample_items_keeps_the_head_and_a_uniform_seeded_sample_in_one_pass():
    from lorakit.data.sample import sample_items

    n, kept = sample_items(iter(range(50)), 0)
    assert n == 50 and [i for i, _ in kept] == list(range(50))  # 0: all of them
    n, kept = sample_items((x * 10 for x in range(7)), 20, head=3)
    assert n == 7 and [x for _, x in kept] == [0, 10, 20, 30, 40, 50, 60]  # fewer than k: all
    hits = [0] * 200
    for seed in range(400):
        n, kept = sample_items(iter(range(200)), 25, seed=seed, head=5)
        idx = [i for i, _ in kept]
        assert n == 200 and len(idx) == 25 and idx[:5] == [0, 1, 2, 3, 4] and idx == sorted(set(idx))
        for i in idx[5:]:
            hits[i] += 1
    assert sample_items(iter(range(200)), 25, seed=7)[1] == sample_items(iter(range(200)), 25, seed=7)[1]
    # each later item is drawn with probability 20/195: 41 of 400 draws on average, none far off
    later = hits[5:]
    assert sum(later) == 400 * 20 and min(later) > 20 and max(later) < 65


def test_inspect_and_recommend_sample_a_large_file_in_one_pass(tiny_model_dir, tmp_path, capsys):
    from lorakit.cli.main import main
    from lorakit.data.inspect import inspect_data
    from lorakit.planning.recommend import profile_data

    tok = build_tokenizer()
    path = _rows(tmp_path / "big.jsonl", 3000)
    report = inspect_data(str(path), tok, "chatml", sample=120, head=4)
    assert report.records == 3000 and report.sampled and len(report.encoded) == len(report.wheres) == 120
    assert report.wheres[:4] == [f"{path}:{i}" for i in (1, 2, 3, 4)]  # the first examples are rendered
    lines = sorted(int(w.rsplit(":", 1)[1]) for w in report.wheres)
    assert lines == [int(w.rsplit(":", 1)[1]) for w in report.wheres] and lines[-1] > 1500  # in order, from all over
    assert not inspect_data(str(path), tok, "chatml", sample=0).sampled
    profile = profile_data(DataConfig(path=str(path)), tok, sample=100)
    assert profile.examples == 3000 and profile.measured == 100
    assert main(["data", "inspect", str(path), "--model", str(tiny_model_dir), "--sample", "50"]) == 0
    out = capsys.readouterr().out
    assert "records: 3,000 (token lengths from a uniform sample of 50" in out and "of 50 sampled" in out
