"""``lorakit eval``: the base and one or more adapters side by side on held-out data — loss,
perplexity, exact and "contains" match of short answers, sample answers — and a forgetting check
(perplexity on general text with each adapter against the base)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import LorakitError
from .model_args import add_model_args, quant_kwargs

__all__ = ["EVAL_COMMAND"]


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapters", nargs="*", metavar="[NAME=]PATH",
                   help="adapter folder or run folder (its adapter/); several are scored side by side; none: the base alone")
    add_model_args(p, adapters="none", int8=False, quantize_default=None)
    p.add_argument("--data", action="append", default=None, metavar="FILE",
                   help="held-out data (repeatable): files or folders of the formats train reads, every record scored "
                        "(default: the first adapter's run's own validation split; without a run: the demo's held-out set)")
    p.add_argument("--general", default=None, metavar="FILE",
                   help="general text for the forgetting check: .txt/.md (every token) or a data file (default: the "
                        "base's own answers to built-in everyday prompts)")
    p.add_argument("--no-general", action="store_true", help="skip the forgetting check")
    p.add_argument("--samples", type=int, default=64,
                   help="held-out prompts with a short reference (≤ 48 tokens) answered by generation (0: none)")
    p.add_argument("--show", type=int, default=3, help="answers printed side by side (default: 3)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's train.batch_size, else 8")
    p.add_argument("--max-len", type=int, default=None, help="default: the run's data.max_len, else 1024")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every score and answer to FILE as JSON")


def _adapter_folders(specs: list[str]) -> list[tuple[str, Path]]:
    """(name, adapter folder) per spec; a run folder stands for its adapter/, named after the run."""
    from ..core.peft_format import find_adapter_folder
    from ..inference.engine import parse_adapter_spec

    out: list[tuple[str, Path]] = []
    for spec in specs:
        name, path = parse_adapter_spec(spec)
        folder = find_adapter_folder(path)
        if "=" not in spec and folder.name == "adapter":
            name = folder.parent.name or name
        if name in [n for n, _ in out]:
            name = f"{name}-{len(out) + 1}"
        out.append((name, folder))
    return out


def _run_config(folder: Path | None):
    """The RunConfig saved next to an adapter (its run's config.yaml), or None."""
    from ..config import load_yaml, run_config_from_dict

    path = folder.parent / "config.yaml" if folder is not None else None
    if path is None or not path.is_file():
        return None
    return run_config_from_dict(load_yaml(str(path)), str(path))


def _eval_data(args: argparse.Namespace, cfg, tokenizer):
    """(Prepared held-out set, what it is, objective or None)."""
    from ..config import DataConfig
    from ..data import demo
    from ..data.dataset import prepare_data
    from ..training.objective import make_objective

    pairs = cfg is not None and cfg.train.objective != "sft"
    objective = make_objective(cfg.train) if pairs else None
    seed = cfg.train.seed if cfg is not None else 0
    if args.data:
        base = cfg.data if cfg is not None else DataConfig()
        data = DataConfig(path=args.data, template=base.template, max_len=args.max_len or base.max_len,
                          train_on_prompt=base.train_on_prompt, val_size=0, cache=False)
        prepared = prepare_data(data, tokenizer, seed, pairs=pairs, held_out=True)
        what = f"{', '.join(args.data)} (every record)"
    elif cfg is not None:
        prepared = prepare_data(cfg.data, tokenizer, seed, pairs=pairs)
        what = "the run's own validation split" + (" (built-in demo task)" if cfg.data.path is None else
                                                   f" of {', '.join(cfg.data.eval_path or cfg.data.path)}")
    else:
        prepared = prepare_data(DataConfig(**demo.DEMO_OVERRIDES["data"]), tokenizer, seed)
        what = "the built-in demo task's held-out set"
    if not prepared.val:
        raise LorakitError("no held-out examples to score: the run has no validation split (data.val_size 0); "
                           "give --data FILE")
    kind = "pairs" if pairs else "examples"
    return prepared, f"{what}: {len(prepared.val) // (2 if pairs else 1)} {kind}", objective


def _load(args: argparse.Namespace, adapters: list[tuple[str, Path]], cfg):
    from ..base import load_model, resolve_device
    from ..core.lora_model import LoraModel
    from .model_args import base_model

    args.adapter = [str(p) for _, p in adapters]
    if args.quantize is None:
        args.quantize = cfg.model.quantize if cfg is not None else "none"
    dtype = args.dtype
    if dtype == "auto" and cfg is not None:
        from ..training.setup import run_precision

        dtype = run_precision(cfg, resolve_device(args.device))[1]  # the dtype the run evaluated in
    name = args.model or (cfg.model.name if cfg is not None else base_model(args))
    trust = cfg.model.trust_remote_code if cfg is not None else False
    model, tok = load_model(name, args.device, dtype, trust, **quant_kwargs(args))
    lm = LoraModel(model)
    for adapter_name, folder in adapters:
        lm.load_adapter(folder, adapter_name, activate=False)
    if cfg is not None and cfg.train.objective == "dpo" and cfg.train.init_adapter is not None:
        from ..training.objective import INIT_ADAPTER

        lm.load_adapter(cfg.train.init_adapter, INIT_ADAPTER, activate=False)  # the run's DPO reference
    return lm, tok, name


def _cmd_eval(args: argparse.Namespace) -> int:
    from ..training.assess import evaluate_models, general_set

    if args.samples < 0 or args.show < 0:
        raise LorakitError("--samples and --show must be >= 0")
    adapters = _adapter_folders(args.adapters)
    cfg = _run_config(adapters[0][1]) if adapters else None
    lm, tok, model_name = _load(args, adapters, cfg)
    prepared, data_what, objective = _eval_data(args, cfg, tok)
    max_len = args.max_len or (cfg.data.max_len if cfg is not None else 1024)
    batch_size = args.batch_size or (cfg.train.batch_size if cfg is not None else 8)
    device = next(lm.model.parameters()).device
    general = None if args.no_general else general_set(lm, tok, prepared.template, max_len, args.general)
    report = evaluate_models(lm, tok, prepared, [n for n, _ in adapters], max_len, batch_size, args.samples, device,
                             general, objective, data_what)
    _print_report(report, model_name, args.show)
    if args.json:
        from ..atomic import atomic_file

        record = {"model": model_name, "adapters": {n: str(p) for n, p in adapters}, **report.to_json()}
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nscores and answers written to {args.json}", file=sys.stderr)
    return 0


CONTAINS_ROW = ("contains", "contains", "{:.1f}%")
GENERAL_ROWS = (("general ppl", "general_ppl", "{:.4f}"), ("forgetting", "forgetting", "{:+.1%}"))


def _fmt(v, fmt: str) -> str:
    return "-" if v is None or v != v else fmt.format(v)


def _print_report(report, model_name: str, show: int) -> None:
    from ..training.model_card import SCORE_ROWS

    models = report.models
    print(f"model:        {model_name}")
    print(f"held-out:     {report.data}" + (f"; {len(report.prompts)} short answers generated" if report.prompts else ""))
    print(f"general text: {report.general}")
    width = max(12, *(len(m.name) + 2 for m in models))
    print()
    print(f"  {'':<14}" + "".join(f"{m.name:>{width}}" for m in models))
    rows = [r for row in SCORE_ROWS for r in ((row, CONTAINS_ROW) if row[1] == "exact_match" else (row,))]
    for label, key, fmt in (*rows, *GENERAL_ROWS):
        if any(key in m.scores for m in models):
            print(f"  {label:<14}" + "".join(f"{_fmt(m.scores.get(key), fmt):>{width}}" for m in models))
    base = models[0].scores
    for m in models[1:]:
        print(f"  {m.name}: " + _gain_line(base, m.scores))
    label = max(12, *(len(m.name) + 2 for m in models))
    for i in range(min(show, len(report.prompts))):
        print()
        print(f"  Q: {report.prompts[i]!r}")
        print(f"     {'reference:':<{label}}{report.references[i]!r}")
        for m in models:
            print(f"     {m.name + ':':<{label}}{m.answers[i]!r}")


def _gain_line(base: dict, new: dict) -> str:
    """The adapter's gain and forgetting in words: points of match, % change of loss and of general ppl."""
    parts = []
    for key, label in (("exact_match", "exact match"), ("contains", "contains"), ("eval_pref_acc", "prefers chosen")):
        if key in base and key in new:
            parts.append(f"{label} {new[key] - base[key]:+.1f} points")
    if base.get("eval_loss") and new.get("eval_loss") == new.get("eval_loss"):
        parts.append(f"eval loss {new['eval_loss'] / base['eval_loss'] - 1:+.1%}")
    if "forgetting" in new:
        parts.append(f"general perplexity {new['forgetting']:+.1%} (forgetting)")
    return ", ".join(parts) or "no score to compare"


EVAL_COMMAND = {
    "eval": ("Score the base and adapters side by side on held-out data: loss, match of short answers, samples, "
             "and forgetting (perplexity on general text).", _add_eval, _cmd_eval),
}
