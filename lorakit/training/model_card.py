"""The README.md a trained adapter folder carries: a Hugging Face model card (YAML front matter
the hub reads: base_model, library_name, license, tags), then what the adapter was trained on,
with which settings, how it scored against its base, and how to load it in lorakit, PEFT and vLLM."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..config import WEIGHT_METHODS, RunConfig

__all__ = ["VLLM_RANKS", "vllm_max_lora_rank", "model_card", "write_model_card", "data_summary", "describe_adapter",
           "describe_model", "full_model_card", "CARD_NAME", "SCORE_ROWS"]

CARD_NAME = "README.md"
# The --max-lora-rank values vLLM accepts (its default is 16).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The held-out scores a run's before/after table shows (card and terminal), where a run has them.
SCORE_ROWS = (("eval loss", "eval_loss", "{:.4f}"), ("perplexity", "eval_ppl", "{:.4f}"),
              ("exact match", "exact_match", "{:.1f}%"), ("prefers chosen", "eval_pref_acc", "{:.1f}%"),
              ("reward margin", "eval_reward_margin", "{:.4f}"))


def vllm_max_lora_rank(r: int) -> int | None:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds rank ``r`` (None above 512)."""
    return next((v for v in VLLM_RANKS if v >= r), None)


def _front_matter(base: str, license: str | None, method: str = "lora") -> str:
    import yaml

    adapter = method not in WEIGHT_METHODS
    meta: dict[str, Any] = {"base_model": base, "library_name": "peft" if adapter else "transformers"}
    if license:
        meta["license"] = license
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = (["lorakit", "lora", "peft", f"base_model:adapter:{base}"] if adapter
                    else ["lorakit", f"{method}-fine-tuning", f"base_model:finetune:{base}"])
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _eval_table(before: dict[str, float], after: dict[str, float], trained: str = "with adapter",
                before_label: str = "base") -> list[str]:
    rows = [(label, key, fmt) for label, key, fmt in SCORE_ROWS if key in before or key in after]
    if not rows:
        return ["No held-out evaluation was run (data.val_size 0 and no data.eval_path)."]
    show = lambda d, k, f: f.format(d[k]) if k in d and d[k] == d[k] else "–"  # noqa: E731 (nan: not measured)
    return ([f"| held-out | {before_label} | {trained} |", "|---|---:|---:|"]
            + [f"| {label} | {show(before, k, f)} | {show(after, k, f)} |" for label, k, f in rows])


def _common_settings(cfg: RunConfig, steps: int, tokens: int, precision: str) -> list[tuple[str, str]]:
    tr = cfg.train
    objective = [] if tr.objective == "sft" else [
        ("objective", f"{tr.objective}, β {tr.preference_beta:g}" + (f", γ {tr.simpo_gamma:g}" if tr.objective == "simpo" else "")
         + ((" (reference: the base, adapter off)" if tr.init_adapter is None else
             f" (reference: {tr.init_adapter} as it started, a frozen copy)") if tr.objective == "dpo" else ""))]
    return [
        *objective,
        ("learning rate", f"{tr.peak_lr:g} ({tr.schedule}, warm-up {tr.warmup:g})"),
        ("optimizer", tr.optimizer + (f", LoRA+ ratio {tr.lora_plus_ratio:g}" if tr.lora_plus_ratio else "")),
        ("batch", f"{tr.batch_size} packed rows × {tr.grad_accum} accumulation" if cfg.data.packing else
         f"{f'up to {cfg.micro_tokens():,d} tokens' if cfg.micro_tokens() else f'{tr.batch_size} examples'} × "
         f"{tr.grad_accum} accumulation, padding-free"),
        ("steps / tokens seen", f"{steps} / {tokens:,d}"), ("max_len", str(cfg.data.max_len)),
        ("precision", precision + (" (auto)" if tr.precision == "auto" else "")), ("seed", str(tr.seed)),
    ]


def full_model_card(cfg: RunConfig, base: str, license: str | None, data_summary: str, trained: str,
                    before: dict[str, float], after: dict[str, float], steps: int, tokens: int, precision: str,
                    version: str) -> str:
    """The card of a full/freeze run's model folder (``trained``: the trainable-parameter line)."""
    tr = cfg.train
    what = ("every weight" + (" but the embeddings and head" if tr.freeze_embeddings else "") if tr.method == "full"
            else f"the {'last' if tr.freeze_layers > 0 else 'first'} {abs(tr.freeze_layers)} decoder blocks")
    if tr.trainable_modules:
        what += f", modules {tr.trainable_modules}"
    settings = [("method", f"{tr.method} ({what})"), ("trained", trained), *_common_settings(cfg, steps, tokens, precision)]
    lines = [
        _front_matter(base, license, tr.method), f"# {base}, {tr.method} fine-tuned", "",
        f"Trained with lorakit {version}: a complete transformers model (safetensors, float32) and its tokenizer.",
        "", "## Data", "", data_summary, "", "## Training settings", "", "| setting | value |", "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings], "", "## Evaluation", "", *_eval_table(before, after, "fine-tuned"), "",
        "## Use it", "", "`PATH` is this folder (or its hub id, once uploaded).", "", "```bash",
        'lorakit generate --model PATH --prompt "Hello"', "```", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")', 'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```", "",
    ]
    return "\n".join(lines)


def model_card(cfg: RunConfig, base: str, license: str | None, data_summary: str, before: dict[str, float],
               after: dict[str, float], steps: int, tokens: int, precision: str, version: str,
               base_note: str | None = None) -> str:
    """The card's text. ``base`` is the id written as ``base_model_name_or_path``; ``precision`` the
    one the run resolved (fp32 | bf16 | fp16)."""
    lo, m = cfg.lora, cfg.model
    targets = lo.target_modules if isinstance(lo.target_modules, str) else ", ".join(lo.target_modules or ["(model default)"])
    settings = [
        ("rank r / alpha", f"{lo.r} / {lo.alpha:g}" + (" (rsLoRA: alpha/√r)" if lo.use_rslora else "")
         + (" (DoRA)" if lo.use_dora else "")),
        ("target modules", targets), ("dropout", f"{lo.dropout:g}"),
        ("init", lo.init if cfg.train.init_adapter is None else f"trained further from {cfg.train.init_adapter}"),
        *_common_settings(cfg, steps, tokens, precision),
    ]
    if m.quantize != "none":
        settings.append(("base quantization", f"{m.quantize} (double quant {m.double_quant}, rounding {m.quant_rounding})"))
    rank = vllm_max_lora_rank(max([lo.r, *lo.rank_pattern.values()]))
    quant_flag = f" --quantize {m.quantize}" if m.quantize != "none" else ""
    lines = [
        _front_matter(base, license),
        f"# LoRA adapter for {base}",
        "",
        f"Trained with lorakit {version}. Files: `adapter_config.json` and "
        "`adapter_model.safetensors` in PEFT's format, and the base's tokenizer.",
        *(["", base_note] if base_note else []),
        "",
        "## Data",
        "",
        data_summary,
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in settings],
        "",
        "## Evaluation",
        "",
        *_eval_table(before, after, before_label=cfg.train.before_label),
        "",
        "## Use it",
        "",
        "`PATH` is this folder (or its hub id, once uploaded). lorakit:",
        "",
        "```bash",
        f"lorakit generate --adapter PATH{quant_flag} --prompt \"Hello\"",
        f"lorakit merge --adapter PATH{quant_flag} --out merged      # a plain transformers model",
        "```",
        "",
        "PEFT (finds the base from `base_model_name_or_path`):",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        "vLLM:",
        "",
        "```bash",
        (f"vllm serve {base} --enable-lora --lora-modules adapter=PATH --max-lora-rank {rank}" if rank
         else f"# rank {lo.r} is above vLLM's largest --max-lora-rank (512)"),
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | os.PathLike, text: str) -> Path:
    path = Path(folder) / CARD_NAME
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def data_summary(cfg: RunConfig, n_train: int | None, n_val: int, template: str) -> str:
    """The card's Data paragraph (``n_train`` None: streamed)."""
    n = f"{'streamed' if n_train is None else n_train} training / {n_val} held-out examples"
    shape = f"template `{template}`, max_len {cfg.data.max_len}" + (", packed rows" if cfg.data.packing else "")
    if cfg.data.path is None:
        return (f"lorakit's built-in demo task (dates written many ways → `YYYY-MM-DD`, and a fixed identity "
                f"answer), generated by lorakit: {n}; {shape}.")
    files = ", ".join(f"`{Path(p).name}`" for p in cfg.data.path)
    held = f"; held out: {', '.join(f'`{Path(p).name}`' for p in cfg.data.eval_path)}" if cfg.data.eval_path else ""
    return f"{files} (format {cfg.data.format}){held}: {n}; {shape}."


def describe_adapter(folder: Path, cfg: RunConfig, base: str, tokenizer: Any, data: str, before: dict[str, float],
                     after: dict[str, float], steps: int, tokens: int, precision: str) -> None:
    """Give a finished run's adapter folder the base's tokenizer and a model card (README.md);
    ``base`` is the id its adapter_config.json records."""
    from .._version import __version__
    from ..base import EMBEDDED_MODELS, base_license

    embedded = EMBEDDED_MODELS.get(cfg.model.name)
    tokenizer.save_pretrained(folder)
    write_model_card(folder, model_card(cfg, base, base_license(base), data, before, after, steps, tokens, precision,
                                        __version__, embedded.note() if embedded else None))


def describe_model(folder: Path, cfg: RunConfig, base: str, tokenizer: Any, data: str, trained: str,
                   before: dict[str, float], after: dict[str, float], steps: int, tokens: int, precision: str) -> None:
    """Give a finished full/freeze run's model folder the tokenizer and a model card."""
    from .._version import __version__
    from ..base import base_license

    tokenizer.save_pretrained(folder)
    write_model_card(folder, full_model_card(cfg, base, base_license(base), data, trained, before, after, steps, tokens,
                                             precision, __version__))
