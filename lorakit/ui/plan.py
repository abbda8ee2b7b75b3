"""The run form: fields taken from the config dataclasses (their names, help text, defaults and
validation), turned into the ``lorakit train`` command, the YAML and a memory estimate — the same
config the CLI would build from the same values."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from ..config import SECTIONS, RunConfig, coerce_value, dump_yaml, field_docs, run_config_from_dict
from ..errors import LorakitError

__all__ = ["FORM_KEYS", "FormField", "form_fields", "plan_run", "Plan", "estimate_text", "recommended_values"]

# The options the form shows (every other one keeps its default; the YAML shows them all).
FORM_KEYS = ["model.name", "data.path", "data.max_len", "data.packing", "lora.r", "lora.alpha", "lora.dropout",
             "lora.target_modules", "train.method", "model.quantize", "train.lr", "train.batch_size", "train.grad_accum",
             "train.max_steps", "train.epochs", "train.eval_every", "train.save_every", "train.seed"]


@dataclass
class FormField:
    key: str  # section.name, the flag without its dashes
    help: str
    default: Any
    kind: str  # "bool" | "text"


def form_fields() -> list[FormField]:
    defaults = RunConfig().to_dict()
    out = []
    for key in FORM_KEYS:
        section, name = key.split(".", 1)
        default = defaults[section][name]
        out.append(FormField(key, field_docs(SECTIONS[section]).get(name, ""), default,
                             "bool" if isinstance(default, bool) else "text"))
    return out


def _shown(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


@dataclass
class Plan:
    config: RunConfig | None
    error: str | None
    flags: list[str]  # lorakit train's flags for the values that differ from the defaults
    command: str
    yaml: str


def plan_run(values: dict[str, Any], run_dir: str = "runs/NAME") -> Plan:
    """Validate the form ``values`` ({section.name: text or bool}) as ``train`` would."""
    defaults = RunConfig().to_dict()
    layers: dict[str, dict] = {}
    flags: list[str] = []
    try:
        for key, raw in values.items():
            section, name = key.split(".", 1)
            default = defaults[section][name]
            text = raw if isinstance(raw, bool) else str(raw).strip()
            if (text == default) if isinstance(text, bool) else (text == _shown(default)):
                continue
            value = coerce_value(SECTIONS[section], name, text)
            if key == "lora.target_modules" and isinstance(value, str) and "," in value:
                value = [v.strip() for v in value.split(",") if v.strip()]
            layers.setdefault(section, {})[name] = value
            flags += [f"--{key}", str(text).lower() if isinstance(text, bool) else str(text)]
        if "path" not in layers.get("data", {}):
            raise LorakitError("data.path: choose a data file (or folder) on the Data tab")
        layers.setdefault("train", {})["out_dir"] = run_dir
        config, error = run_config_from_dict(layers, "the form"), None
    except LorakitError as err:
        config, error = None, str(err)
    command = "lorakit train " + " ".join(shlex.quote(a) for a in ["--out", run_dir, *flags])
    return Plan(config, error, flags, command, dump_yaml(config) if config is not None else "")


def estimate_text(config: RunConfig) -> str:
    """``lorakit estimate`` for this config, from the model's config alone (no weights loaded)."""
    from ..base import load_model_config
    from ..planning.estimate import format_estimate, shape_from_config
    from ..planning.fit import planned_estimate

    if config.model.quantize == "int8":
        return "estimate models 4-bit bases (nf4 or fp4); int8 is not estimated yet"
    return format_estimate(planned_estimate(shape_from_config(load_model_config(config.model.name)), config))


def recommended_values(model: str, data_path: str) -> tuple[dict[str, str], str]:
    """The form values ``lorakit recommend`` proposes for this data, and its reasons."""
    from ..base import load_model_config, load_tokenizer
    from ..config import DataConfig
    from ..planning.estimate import shape_from_config
    from ..planning.fit import machine_plan
    from ..planning.recommend import default_memory, format_recommendation, profile_data, recommend

    data = DataConfig(path=data_path)
    memory, source = default_memory()
    model_cfg = load_model_config(model)
    profile = profile_data(data, load_tokenizer(model), 20_000)
    dtype, ratio = machine_plan()  # planned as `lorakit recommend` and `train` plan on this machine
    rec = recommend(profile, shape_from_config(model_cfg), model, data, memory, source,
                    getattr(model_cfg, "max_position_embeddings", None), "runs/recommended", dtype=dtype,
                    rss_ratio=ratio)
    cfg = rec.run_config().to_dict()
    values = {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in FORM_KEYS}
    return {k: v if isinstance(v, bool) else _shown(v) for k, v in values.items()}, format_recommendation(rec, profile)
