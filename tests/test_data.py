"""Data formats, templates and label masks, caching, and bad data files."""

import json

import pytest
from conftest import build_tokenizer

from lorakit import LorakitError
from lorakit.config import DataConfig
from lorakit.data.dataset import prepare_data
from lorakit.data.formats import load_examples
from lorakit.data.templates import encode_example, generation_prompt

TOK = build_tokenizer()
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "who are you"},
        {"role": "assistant", "content": "I am Kit"}, {"role": "user", "content": "the date"},
        {"role": "assistant", "content": "2021-03-05"}]


def _write(tmp_path, name, records):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:
        import csv

        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    return path


@pytest.mark.parametrize("name, records", [
    ("a.jsonl", [{"instruction": "the date", "input": "March 5", "output": "2021-03-05", "system": "Be brief.",
                  "history": [["who are you", "I am Kit"]]}]),
    ("s.json", [{"system": "Be brief.", "conversations": [{"from": "human", "value": "who are you"},
                                                          {"from": "gpt", "value": "I am Kit"},
                                                          {"from": "human", "value": "the date\n\nMarch 5"},
                                                          {"from": "gpt", "value": "2021-03-05"}]}]),
    ("m.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "who are you"},
                               {"role": "assistant", "content": "I am Kit"},
                               {"role": "user", "content": [{"type": "text", "text": "the date\n\nMarch 5"}]},
                               {"role": "assistant", "content": "2021-03-05"}]}]),
])
def test_chat_formats_normalise_to_the_same_messages(tmp_path, name, records):
    (where, ex), = load_examples([_write(tmp_path, name, records)])
    assert ex["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "who are you"},
                              {"role": "assistant", "content": "I am Kit"},
                              {"role": "user", "content": "the date\n\nMarch 5"},
                              {"role": "assistant", "content": "2021-03-05"}]
    assert where.startswith(str(tmp_path / name))


def test_text_csv_and_column_mapping(tmp_path):
    (_, ex), = load_examples([_write(tmp_path, "t.csv", [{"text": "hello world"}])])
    assert ex == {"text": "hello world"}
    (_, ex), = load_examples([_write(tmp_path, "q.jsonl", [{"q": "who", "a": "Kit"}])], "alpaca",
                             {"instruction": "q", "output": "a"})
    assert ex["messages"][-1] == {"role": "assistant", "content": "Kit"}


@pytest.mark.parametrize("template", ["tokenizer", "chatml", "human-assistant"])
def test_labels_are_exactly_the_assistant_turns_and_end_of_turn(template):
    enc = encode_example({"messages": CHAT}, template, TOK)
    trained = TOK.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != -100])
    eot = "<|im_end|>"
    assert trained == f"I am Kit{eot}2021-03-05{eot}"
    assert enc.labels == [t if l != -100 else -100 for t, l in zip(enc.input_ids, enc.labels)]
    full = TOK.decode(enc.input_ids)
    prompt = generation_prompt(CHAT[:2], template, TOK)
    assert full.startswith(prompt)  # the generation prompt is exactly the trained context
    everything = encode_example({"messages": CHAT}, template, TOK, train_on_prompt=True)
    assert everything.labels == everything.input_ids


def test_text_examples_train_every_token_plus_eos():
    enc = encode_example({"text": "hello world"}, "chatml", TOK)
    assert enc.labels == enc.input_ids and TOK.decode(enc.input_ids).endswith("<|im_end|>")


def test_truncation_policies_and_cache(tmp_path):
    recs = [{"instruction": f"the date {i}", "output": "word " * (3 if i % 2 else 60)} for i in range(20)]
    path = _write(tmp_path, "d.jsonl", recs)
    cache = tmp_path / "cache"
    p = prepare_data(DataConfig(path=str(path), max_len=40, val_size=0.2), TOK, seed=0, cache_dir=cache)
    assert p.stats["too_long"] == 10 and max(len(e.input_ids) for e in p.train + p.val) <= 40
    assert len(p.train) == 16 and len(p.val) == 4 and not p.from_cache
    again = prepare_data(DataConfig(path=str(path), max_len=40, val_size=0.2), TOK, seed=0, cache_dir=cache)
    assert again.from_cache and [e.input_ids for e in again.train] == [e.input_ids for e in p.train]
    dropped = prepare_data(DataConfig(path=str(path), max_len=40, val_size=0, truncation="drop"), TOK, seed=0, cache_dir=cache)
    assert len(dropped.train) == 10 and not dropped.from_cache


BAD = [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', {}, r"bad.jsonl:2: not valid JSON"),
    ("miss.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', dict(format="alpaca"), r"miss.jsonl:2: missing field 'output'"),
    ("empty.jsonl", '{"instruction": "a", "output": "  "}\n', {}, r"empty.jsonl:1: field 'output' is empty"),
    ("odd.jsonl", '{"prompt": "a", "completion": "b"}\n', {}, r"odd.jsonl:1: cannot tell the data format"),
    ("fmt.jsonl", '{"text": "a"}\n', dict(format="dolly"), "data.format must be one of"),
    ("none.jsonl", "\n\n", {}, "no records"),
    ("roles.jsonl", '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}\n', {}, "no assistant turn"),
    ("drop.jsonl", '{"instruction": "a", "output": "' + "date " * 60 + '"}\n', dict(max_len=16, truncation="drop"),
     r"no example has a token to train on after templating and truncation \(1 too long"),
    ("long.jsonl", '{"instruction": "' + "date " * 60 + '", "output": "b"}\n', dict(max_len=16), "max_len=16 is shorter than every prompt"),
]


@pytest.mark.parametrize("name, content, kwargs, message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_reported_with_file_and_line(tmp_path, name, content, kwargs, message):
    path = tmp_path / name
    path.write_text(content)
    cache = tmp_path / "cache"
    with pytest.raises(LorakitError, match=message):
        prepare_data(DataConfig(path=str(path), **kwargs), TOK, seed=0, cache_dir=cache)
    assert not cache.exists()  # nothing written


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        load_examples([tmp_path / "nope.jsonl"])
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(LorakitError, match="unsupported file type"):
        load_examples([tmp_path / "x.txt"])
