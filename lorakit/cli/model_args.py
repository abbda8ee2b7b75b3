"""The flags that name a base model and its adapters, shared by the commands that load them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..config import DEFAULT_MODEL, QUANT_CHOICES
from ..errors import LorakitError

__all__ = ["add_model_args", "gptq_base", "quant_kwargs", "base_model"]


def add_model_args(p: argparse.ArgumentParser, adapters: str = "many", int8: bool = True,
                   quantize_default: str | None = "none") -> None:
    """--model, --adapter (many: repeatable; one: required; none), --device, --dtype, the quantization flags, --int8."""
    p.add_argument("--model", default=None, help="base model: folder, .gguf file, hub id or 'smollm2-135m' (default: the "
                   "first adapter's base_model_name_or_path, else smollm2-135m)")
    if adapters == "many":
        p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH", help="adapter folder (repeatable)")
    elif adapters == "one":
        p.add_argument("--adapter", required=True, metavar="PATH", help="adapter folder (PEFT format)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--quantize", default=quantize_default, choices=QUANT_CHOICES,
                   help="store the base's linear layers quantized (needs lorakit[qlora]); use the run's setting"
                        + ("" if quantize_default else " (default: the run's)"))
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                   help="4-bit: quantize the block scales too (default: on)")
    p.add_argument("--compute-dtype", default="auto", help="4-bit compute dtype: auto | float32 | bfloat16 | float16")
    if int8:
        p.add_argument("--int8", action="store_true",
                       help="CPU: int8 weights and int8 dynamic activations in every linear layer (one adapter is "
                            "merged first; several run in float beside the int8 base); see docs/export.md")


def gptq_base(adapter: str) -> tuple[bool, "Path | None"]:
    """Whether the run that wrote ``adapter`` (its config.yaml next to it) used GPTQ rounding, and
    the 4-bit base that run saved (next to the adapter, or in the run folder of a checkpoint's)."""
    from ..config import load_yaml
    from ..quant.saved_base import QUANTIZED_BASE

    folder = Path(adapter.split("=", 1)[-1]).parent
    config = folder / "config.yaml"
    try:
        model = load_yaml(str(config)).get("model") if config.is_file() else None
    except (LorakitError, OSError):  # not a readable run config: nothing to say
        return False, None
    if not (isinstance(model, dict) and model.get("quant_rounding") == "gptq"):
        return False, None
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    return True, next((f for f in (folder / QUANTIZED_BASE, run / QUANTIZED_BASE) if f.is_file()), None)


def quant_kwargs(args: argparse.Namespace) -> dict:
    """load_model's quantization keywords from the flags (and the GPTQ-rounded base a run saved)."""
    kwargs = {"quantize": args.quantize, "double_quant": args.double_quant, "compute_dtype": args.compute_dtype}
    adapters = [args.adapter] if isinstance(getattr(args, "adapter", None), str) else getattr(args, "adapter", [])
    found = [gptq_base(a) for a in adapters] if args.quantize != "none" else []
    bases = list(dict.fromkeys(path for gptq, path in found if path is not None))
    if bases:
        kwargs["quantized_base"] = bases[0]
        print(f"4-bit base: the GPTQ-rounded weights saved with the run ({bases[0]})", file=sys.stderr)
        if len(bases) > 1:
            print(f"warning: the adapters come from runs with {len(bases)} different GPTQ-rounded bases; all of them "
                  f"run over the first", file=sys.stderr)
    elif any(gptq for gptq, _ in found):
        print(f"warning: the adapter was trained over a GPTQ-rounded base that its run folder no longer holds; "
              f"--quantize {args.quantize} rounds to nearest, a different base (on the demo task: eval loss 0.0247 "
              "instead of 0.0135). Leave out --quantize to use it over the original weights.", file=sys.stderr)
    return kwargs


def base_model(args: argparse.Namespace) -> str:
    """--model, else the base the (first) adapter records, else the embedded default."""
    from ..inference.engine import parse_adapter_spec

    if args.model:
        return args.model
    adapters = [args.adapter] if isinstance(getattr(args, "adapter", None), str) else getattr(args, "adapter", [])
    if adapters:
        config = Path(parse_adapter_spec(adapters[0])[1]) / "adapter_config.json"
        try:
            recorded = json.loads(config.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            recorded = None  # an unreadable adapter is reported when it is loaded
        if isinstance(recorded, str) and recorded:
            return recorded
    return DEFAULT_MODEL
