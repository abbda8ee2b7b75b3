"""Model sources: local folders, GGUF detection, hub ids that cannot be reached, bad paths."""

import pytest
import torch

from lorakit import LorakitError
from lorakit.base import load_model, resolve_dtype, resolve_source


def test_local_folder_loads_with_pad_token(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir), device="cpu")
    assert model.config.vocab_size == len(tok) and tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU


def test_source_kinds(tmp_path, tiny_model_dir):
    assert resolve_source(str(tiny_model_dir)).kind == "dir"
    assert resolve_source("org/model").kind == "hub"
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert resolve_source(str(tmp_path / "m.gguf")).kind == "gguf"
    assert resolve_source(str(tmp_path)).gguf_file == "m.gguf"  # a folder with one .gguf


@pytest.mark.parametrize("name, message", [
    ("./no/such/folder", "does not exist"),
    ("/etc/hostname", "not .gguf"),
])
def test_bad_paths(name, message):
    with pytest.raises(LorakitError, match=message):
        resolve_source(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(LorakitError, match="no config.json"):
        resolve_source(str(tmp_path))


def test_offline_hub_id_fails_fast_with_a_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LorakitError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE=1"):
        load_model("someone/not-cached-model", device="cpu")


def test_unreachable_hub_fails_fast(monkeypatch):
    import huggingface_hub

    def refuse(*a, **k):
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "model_info", refuse)
    with pytest.raises(LorakitError, match="cannot reach 'someone/not-cached-model'.*Name or service not known"):
        load_model("someone/not-cached-model", device="cpu")


def test_dtype_and_device_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(LorakitError, match="dtype must be"):
        resolve_dtype("int3", torch.device("cpu"))
    with pytest.raises(LorakitError, match="device must be"):
        load_model("x", device="tpu")
