"""Reading configs: YAML files, nested {section: {key: value}} layers merged in order, command-line
strings typed by their field, and the resolved config written back as YAML."""

from __future__ import annotations

import difflib
from dataclasses import asdict
from typing import Any

from ..errors import LorakitError, read_text
from .aliases import translate_aliases
from .fields import from_dict
from .sections import SECTIONS, RunConfig

__all__ = ["run_config_from_dict", "merge_nested", "load_yaml", "coerce_value", "dump_yaml"]


def run_config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    """RunConfig from nested {section: {key: value}}; other tools' key names are translated
    (``aliases``); unknown sections/keys name the closest."""
    if not isinstance(data, dict):
        raise LorakitError(f"{where}: expected a mapping with sections {', '.join(SECTIONS)}")
    data, _ = translate_aliases(data, where)
    parts = {}
    for section, value in data.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; sections: {', '.join(SECTIONS)}"
            raise LorakitError(f"{where}: unknown section {section!r}{hint}")
        base = asdict(RunConfig())[section]
        base.update(value or {})
        parts[section] = from_dict(SECTIONS[section], base, f"{where}: {section}")
    return RunConfig(**parts)


def merge_nested(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge_nested(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k in SECTIONS else v
    return out


def load_yaml(path: str) -> dict[str, Any]:
    import yaml

    text = read_text(path, "config file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise LorakitError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}")
    return data


def coerce_value(cls: type, key: str, raw: Any) -> Any:
    """A command-line string as the type of field ``key`` of ``cls`` (lists/dicts as YAML)."""
    import typing

    import yaml

    hints = typing.get_type_hints(cls)
    if key not in hints:
        close = difflib.get_close_matches(key, list(hints), n=1)
        raise LorakitError(f"unknown option {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
    if not isinstance(raw, str):
        return raw
    kind = hints[key]
    inner = [t for t in typing.get_args(kind) if t is not type(None)]  # an Optional's type
    try:
        if kind is bool:
            low = raw.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return low in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if type(None) in typing.get_args(kind) and raw.strip().lower() in ("none", "null", "~", ""):
            return None  # an optional field: unset (YAML alone would read "none" as a string)
        if inner in ([int], [float]):  # an optional number (YAML would read 2e-4 as a string)
            return inner[0](raw)
        return yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError):
        name = getattr(inner[0] if len(inner) == 1 else kind, "__name__", str(kind))
        raise LorakitError(f"{cls.__name__.lower().replace('config', '')}.{key}: cannot read {raw!r} as {name}") from None


def dump_yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)
