"""Datasets by name (lorakit.data.hub): a folder saved by ``datasets`` and a hub id found offline
in the datasets cache read as the same examples as the JSONL file they were made from; splits and
configs are picked by name; bad names are one clear line."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import build_tokenizer
from lorakit import LorakitError
from lorakit.config import DataConfig
from lorakit.data.dataset import prepare_data
from lorakit.data.formats import data_files
from lorakit.data.hub import HubSource, hub_source

datasets = pytest.importorskip("datasets")

ROWS = [{"q": f"add {i} and {i}", "a": str(2 * i)} for i in range(20)]
COLUMNS = {"instruction": "q", "output": "a"}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _encoded(path, **kw):
    cfg = DataConfig(path=[str(path)], columns=COLUMNS, max_len=48, val_size=0, cache=False, **kw)
    return [(e.input_ids, e.labels) for e in prepare_data(cfg, build_tokenizer(), seed=0).train]


def test_hub_ids_and_plain_paths_are_told_apart(tmp_path):
    assert hub_source("acme/dates", (".jsonl",)) == HubSource("acme/dates")
    assert hub_source("acme/dates:test#en", (".jsonl",)) == HubSource("acme/dates", "test", "en")
    assert hub_source("acme/dates:train[:100]", (".jsonl",)).split == "train[:100]"
    assert hub_source("data/missing.jsonl", (".jsonl",)) is None  # a data file's name: reported as missing
    (tmp_path / "folder").mkdir()
    assert hub_source(str(tmp_path / "folder"), (".jsonl",)) is None  # an existing folder of files
    with pytest.raises(LorakitError, match="data file .*missing.jsonl does not exist"):
        data_files([str(tmp_path / "missing.jsonl")])


def test_a_saved_dataset_reads_as_its_jsonl(tmp_path):
    want = _encoded(_jsonl(tmp_path / "rows.jsonl", ROWS))
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert _encoded(tmp_path / "saved") == want
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]), "test": datasets.Dataset.from_list(ROWS)})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert _encoded(f"{tmp_path / 'dict'}:test") == want  # name:SPLIT
    assert len(_encoded(tmp_path / "dict")) == 5  # the train split by default
    with pytest.raises(LorakitError, match=r"no split 'validation'; it has train, test"):
        _encoded(f"{tmp_path / 'dict'}:validation")


def test_without_datasets_a_hub_id_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real(name, *a))
    with pytest.raises(LorakitError, match=r"data.path acme/dates: no such file or folder; .*pip install 'lorakit\[hub\]'"):
        _encoded("acme/dates")


# Runs in a fresh interpreter: the datasets cache and offline mode are read when datasets is imported.
HUB_SCRIPT = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    root, src = Path(sys.argv[1]), Path(sys.argv[2])
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.json.json import Json

    # a dataset as a download leaves it in the datasets cache: acme___dates/default/0.0.0/<hash>/dates-<split>.arrow
    files = DataFilesDict.from_patterns({"train": [str(src / "train.jsonl")], "test": [str(src / "test.jsonl")]})
    Json(cache_dir=str(root), dataset_name="acme___dates", data_files=files, hash="0123456789abcdef").download_and_prepare()
    folder = root / "acme___dates"
    next(c for c in folder.iterdir() if c.name.startswith("default-")).rename(folder / "default")
    for f in folder.rglob("acme___dates-*.arrow"):
        f.rename(f.with_name(f.name.replace("acme___dates-", "dates-")))

    sys.path.insert(0, sys.argv[3])
    from conftest import build_tokenizer
    from lorakit import LorakitError
    from lorakit.config import DataConfig
    from lorakit.data.dataset import prepare_data

    out = {}
    for name in ("acme/dates", "acme/dates:test", "acme/dates:validation", "acme/elsewhere"):
        cfg = DataConfig(path=[name], columns={"instruction": "q", "output": "a"}, max_len=48, val_size=0, cache=False)
        try:
            out[name] = [[e.input_ids, e.labels] for e in prepare_data(cfg, build_tokenizer(), seed=0).train]
        except LorakitError as err:
            out[name] = str(err)
    streamed = prepare_data(DataConfig(path=["acme/dates"], columns={"instruction": "q", "output": "a"}, max_len=48,
                                       val_size=2, streaming=True), build_tokenizer(), seed=0)
    out["streamed"] = [[e.input_ids, e.labels] for e in streamed.first(3)]
    out["streamed_val"] = [[e.input_ids, e.labels] for e in streamed.val]
    print(json.dumps(out))
''')


def test_a_hub_id_loads_offline_from_the_datasets_cache(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _jsonl(src / "train.jsonl", ROWS[:12])
    _jsonl(src / "test.jsonl", ROWS[12:])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets")}
    tests = os.path.dirname(__file__)
    proc = subprocess.run([sys.executable, "-c", HUB_SCRIPT, str(tmp_path / "hf" / "datasets"), str(src), tests],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["acme/dates"] == [list(x) for x in _encoded(src / "train.jsonl")]
    assert got["acme/dates:test"] == [list(x) for x in _encoded(src / "test.jsonl")]
    assert "acme/dates:validation" in got["acme/dates:validation"] and "validation" in got["acme/dates:validation"]
    rows = [list(x) for x in _encoded(src / "train.jsonl")]
    assert got["streamed_val"] == rows[:2] and got["streamed"] == rows[2:5]  # streamed: the head held out
    assert got["acme/elsewhere"].startswith("data.path acme/elsewhere: not a local file or folder, and the dataset "
                                            "'acme/elsewhere' could not be read from the hub or its cache")
