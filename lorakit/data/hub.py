"""Datasets by name: a Hugging Face hub id ``org/name[:split][#config]`` read through the
``datasets`` library (lorakit[hub]) and its cache — offline, the latest cached copy — or a folder
written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``path[:split]``).

Rows come out as plain dicts, so the formats, ``data.columns`` and every check of a data file
apply unchanged; ``streaming`` reads them one by one (``load_dataset(streaming=True)``) for data
larger than memory.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import LorakitError

__all__ = ["HubSource", "hub_source", "hub_records", "hub_fingerprint"]

# org/name or name, then :split and/or #config (split may hold a slice: train[:1000])
_HUB_ID = re.compile(r"(?P<name>[\w.-]+(?:/[\w.-]+)?)(?::(?P<split>[\w.\-\[\]%:]+?))?(?:#(?P<config>[\w.-]+))?")
_SAVED = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass(frozen=True)
class HubSource:
    """A dataset read through ``datasets``: a hub id, or a saved folder (``saved``)."""

    name: str
    split: str | None = None
    config: str | None = None
    saved: bool = False

    def __str__(self) -> str:
        return self.name + (f":{self.split}" if self.split else "") + (f"#{self.config}" if self.config else "")


def _is_saved(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in _SAVED)


def hub_source(entry: str, data_suffixes: tuple[str, ...]) -> HubSource | None:
    """``entry`` as a dataset read through ``datasets``, or None when it is a plain path (an existing
    file or folder, or a name with a data file's suffix)."""
    path = Path(entry).expanduser()
    if _is_saved(path):
        return HubSource(str(path), saved=True)
    if path.exists():
        return None
    base, _, split = entry.rpartition(":")
    if base and _is_saved(Path(base).expanduser()):
        return HubSource(str(Path(base).expanduser()), split or None, saved=True)
    m = _HUB_ID.fullmatch(entry)
    if m is None or Path(m["name"]).suffix in data_suffixes:
        return None
    return HubSource(m["name"], m["split"], m["config"])


def _open(source: HubSource, streaming: bool) -> Any:
    if importlib.util.find_spec("datasets") is None:
        raise LorakitError(f"data.path {source}: no such file or folder; reading it as a dataset by hub id needs the "
                           "datasets package (lorakit's 'hub' extra): pip install 'lorakit[hub]' "
                           "(in a lorakit checkout: scripts/setup hub)")
    import datasets

    try:
        if source.saved:
            ds = datasets.load_from_disk(source.name)
            if isinstance(ds, datasets.DatasetDict):
                split = source.split or ("train" if "train" in ds else next(iter(ds)))
                if split not in ds:
                    raise LorakitError(f"{source.name}: no split {split!r}; it has {', '.join(ds)} (name:SPLIT picks one)")
                ds = ds[split]
            return ds.to_iterable_dataset() if streaming else ds
        return datasets.load_dataset(source.name, source.config, split=source.split or "train", streaming=streaming)
    except LorakitError:
        raise
    except ConnectionError as err:
        raise LorakitError(f"data.path {source}: not a local file or folder, and the dataset {source.name!r} could not be "
                           f"read from the hub or its cache ({err}); check the name, or download it once with network "
                           "access (the cache is used offline)") from None
    except (ValueError, FileNotFoundError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LorakitError(f"data.path {source}: {first}") from None


def hub_records(source: HubSource, streaming: bool = False) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of the dataset's split, in order."""
    for n, row in enumerate(_open(source, streaming), 1):
        yield f"{source}: row {n}", dict(row)


def hub_fingerprint(source: HubSource) -> str:
    """What identifies the dataset's content for the tokenized-data cache (``datasets``' fingerprint)."""
    ds = _open(source, streaming=False)
    return str(getattr(ds, "_fingerprint", "")) or f"{len(ds)}"
