"""One flag vocabulary. A concept has one flag in every command that takes it: the run flags of
``train`` (``--section.key`` for every config field, plus the short spellings below) are also
``estimate``'s, and the short spellings mean the same in generate/chat/serve/merge/recommend.

``SHORT`` is the table: flag -> (dotted config key, metavar, help). ``run_config`` builds a
``RunConfig`` from parsed flags exactly as ``train`` does (defaults, then the demo settings when
no data is given, then ``--config FILE``, then the flags)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["SHORT", "add_run_flags", "flag_overrides", "run_config", "deprecated"]

# flag -> (section.key, metavar, help); the help says what it stands for in train's YAML.
SHORT: dict[str, tuple[str, str, str]] = {
    "--model": ("model.name", "M", "base model: folder, .gguf file, hub id or 'smollm2-135m' (= --model.name)"),
    "--data": ("data.path", "FILE", "training data file(s) or folder(s) (= --data.path)"),
    "--out": ("train.out_dir", "DIR", "run folder (= --train.out_dir)"),
    "--device": ("model.device", "D", "auto | cpu | cuda | cuda:N | mps (= --model.device)"),
    "--dtype": ("model.dtype", "D", "auto | float32 | bfloat16 | float16 (= --model.dtype)"),
    "--template": ("data.template", "T", "auto | tokenizer | chatml | human-assistant (= --data.template)"),
    "--format": ("data.format", "F", "auto | alpaca | sharegpt | messages | text (= --data.format)"),
    "--quantize": ("model.quantize", "Q", "none | nf4 | fp4 | int8: a quantized base, QLoRA (= --model.quantize)"),
    "--compute-dtype": ("model.compute_dtype", "D", "4-bit compute dtype (= --model.compute_dtype)"),
    "--quant-rounding": ("model.quant_rounding", "R", "nearest | gptq (= --model.quant_rounding)"),
    "--optimizer": ("train.optimizer", "O", "adamw | adamw8bit | paged_adamw8bit (= --train.optimizer)"),
}


def _dest(key: str) -> str:
    return "short:" + key


def add_run_flags(p: argparse.ArgumentParser, data_nargs: str = "+") -> None:
    """``--config FILE``, the short flags and ``--section.key`` for every config field."""
    from ..config import SECTIONS, RunConfig, field_docs

    p.add_argument("--config", metavar="FILE", help="YAML run config (sections model, data, lora, train); flags override it")
    for flag, (key, metavar, text) in SHORT.items():
        nargs = data_nargs if flag == "--data" else None
        p.add_argument(flag, dest=_dest(key), metavar=metavar, nargs=nargs, help=text)
    p.add_argument("--double-quant", dest=_dest("model.double_quant"), action=argparse.BooleanOptionalAction,
                   default=None, help="4-bit: quantize the block scales too (= --model.double_quant)")
    defaults = RunConfig().to_dict()
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} ({cls.__doc__.strip().splitlines()[0]})")
        for name, doc in field_docs(cls).items():
            default = defaults[section][name]
            shown = "" if default in (None, {}, []) else f" (default: {default})"
            group.add_argument(f"--{section}.{name}", dest=f"{section}.{name}", metavar="V",
                               help=(doc + shown).replace("%", "%%"))


def flag_overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Nested {section: {key: value}} from the flags that were given, values typed by their field;
    a dotted flag wins over its short spelling when both are given."""
    from ..config import SECTIONS, coerce_value

    out: dict[str, dict[str, Any]] = {}
    given = {k: v for k, v in vars(args).items() if v is not None}
    for dest in sorted(given, key=lambda d: not d.startswith("short:")):  # short spellings first
        if dest.startswith("short:"):
            section, key = dest[len("short:"):].split(".", 1)
        elif "." in dest:
            section, key = dest.split(".", 1)
        else:
            continue
        out.setdefault(section, {})[key] = coerce_value(SECTIONS[section], key, given[dest])
    return out


def run_config(args: argparse.Namespace, demo: bool = True, extra: dict | None = None):
    """(RunConfig, uses_demo) as ``train`` builds it: defaults < demo settings (no data given and
    ``demo``) < ``--config FILE`` (Hugging Face names translated) < ``extra`` < the flags."""
    from ..config import WEIGHT_METHODS, load_yaml, merge_nested, run_config_from_dict, translate_aliases
    from ..data.demo import DEMO_OVERRIDES, PREFERENCE_DEMO_OVERRIDES

    file_cfg: dict = {}
    if args.config:
        file_cfg, notes = translate_aliases(load_yaml(args.config), args.config)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    flags = merge_nested(extra or {}, flag_overrides(args))
    uses_demo = demo and "path" not in flags.get("data", {}) and "path" not in (file_cfg.get("data") or {})
    layers = merge_nested({}, DEMO_OVERRIDES) if uses_demo else {}
    user = merge_nested(merge_nested({}, file_cfg), flags)
    if uses_demo and (user.get("train") or {}).get("method") in WEIGHT_METHODS and "lr" not in (user.get("train") or {}):
        # the demo's rate is an adapter's; full/freeze take their own default
        layers["train"] = {k: v for k, v in layers["train"].items() if k != "lr"}
    if uses_demo and (user.get("train") or {}).get("objective", "sft") != "sft":
        layers = merge_nested(layers, PREFERENCE_DEMO_OVERRIDES)  # the preference demo: its own run folder
    layers = merge_nested(layers, user)
    return run_config_from_dict(layers, args.config or "flags"), uses_demo


def deprecated(old: str, new: str) -> None:
    """Say once that ``old`` is an old spelling (it keeps working for one release)."""
    print(f"note: {old} is now {new} (the old spelling works for one more release)", file=sys.stderr)
