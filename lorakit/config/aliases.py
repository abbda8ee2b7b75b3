"""Key names from other tools' configs, so that a user's existing YAML mostly just works: Hugging
Face ``TrainingArguments`` (and TRL's ``SFTConfig``), PEFT's ``LoraConfig`` and axolotl's names.
Each is mapped to lorakit's key with a one-line note; keys that have no meaning here (logging
strategies, hub uploads...) are named as ignored; anything else stays an unknown key."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import LorakitError

__all__ = ["ALIASES", "IGNORED", "translate_aliases"]

_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
_OPTIMIZERS = {"adamw": "adamw", "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
               "adamw_8bit": "adamw8bit", "adamw_bnb_8bit": "adamw8bit", "paged_adamw_8bit": "paged_adamw8bit"}


def _table(values: dict[str, str], name: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value not in values:
            raise LorakitError(f"{name} {value!r} has no lorakit equivalent; use one of {', '.join(values)}")
        return values[value]
    return convert


def _report_to(value: Any) -> list[str]:
    """HF's report_to: "all" is every tracker lorakit logs to whose package is installed."""
    import importlib.util

    from .choices import TRACKERS

    targets = [value] if isinstance(value, str) else list(value or [])
    if "all" in targets:
        return [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    return [t for t in targets if t != "none"]


def _precision(name: str) -> Callable[[Any], Any]:
    return lambda on: name if on else None  # bf16: false says nothing


def _max_steps(value: Any) -> Any:
    return 0 if isinstance(value, int) and value < 0 else value  # HF's -1: "from the epochs"


def _quantize(on: Any) -> Any:
    return "nf4" if on else None


def _all_linear(on: Any) -> Any:
    return "all-linear" if on else None


# their key -> (section, our key, conversion or None, whose name it is)
ALIASES: dict[str, tuple[str, str, Callable[[Any], Any] | None, str]] = {
    "learning_rate": ("train", "lr", None, "TrainingArguments"),
    "per_device_train_batch_size": ("train", "batch_size", None, "TrainingArguments"),
    "gradient_accumulation_steps": ("train", "grad_accum", None, "TrainingArguments"),
    "num_train_epochs": ("train", "epochs", None, "TrainingArguments"),
    "max_steps": ("train", "max_steps", _max_steps, "TrainingArguments"),
    "max_grad_norm": ("train", "clip", None, "TrainingArguments"),
    "lr_scheduler_type": ("train", "schedule", _table(_SCHEDULES, "lr_scheduler_type"), "TrainingArguments"),
    "output_dir": ("train", "out_dir", None, "TrainingArguments"),
    "overwrite_output_dir": ("train", "overwrite", None, "TrainingArguments"),
    "resume_from_checkpoint": ("train", "resume", None, "TrainingArguments"),
    "save_total_limit": ("train", "keep_last", None, "TrainingArguments"),
    "logging_steps": ("train", "log_every", None, "TrainingArguments"),
    "save_steps": ("train", "save_every", None, "TrainingArguments"),
    "eval_steps": ("train", "eval_every", None, "TrainingArguments"),
    "warmup_ratio": ("train", "warmup", None, "TrainingArguments"),
    "warmup_steps": ("train", "warmup", None, "TrainingArguments"),
    "weight_decay": ("train", "weight_decay", None, "TrainingArguments"),
    "gradient_checkpointing": ("train", "grad_checkpointing", None, "TrainingArguments"),
    "optim": ("train", "optimizer", _table(_OPTIMIZERS, "optim"), "TrainingArguments"),
    "bf16": ("train", "precision", _precision("bf16"), "TrainingArguments"),
    "fp16": ("train", "precision", _precision("fp16"), "TrainingArguments"),
    "report_to": ("train", "report_to", _report_to, "TrainingArguments"),
    "tensorboard": ("train", "report_to", lambda on: ["tensorboard"] if on else None, "lorakit 0.1"),
    "model_name_or_path": ("model", "name", None, "transformers' examples"),
    "max_seq_length": ("data", "max_len", None, "TRL's SFTConfig"),
    "max_length": ("data", "max_len", None, "TRL's SFTConfig"),
    "lora_alpha": ("lora", "alpha", None, "PEFT's LoraConfig"),
    "lora_dropout": ("lora", "dropout", None, "PEFT's LoraConfig"),
    "init_lora_weights": ("lora", "init", lambda v: "default" if v is True else v, "PEFT's LoraConfig"),
    "lora_r": ("lora", "r", None, "axolotl"),
    "lora_target_modules": ("lora", "target_modules", None, "axolotl"),
    "lora_target_linear": ("lora", "target_modules", _all_linear, "axolotl"),
    "base_model": ("model", "name", None, "axolotl"),
    "load_in_4bit": ("model", "quantize", _quantize, "axolotl"),
    "sequence_len": ("data", "max_len", None, "axolotl"),
    "sample_packing": ("data", "packing", None, "axolotl"),
    "val_set_size": ("data", "val_size", None, "axolotl"),
    "micro_batch_size": ("train", "batch_size", None, "axolotl"),
    "num_epochs": ("train", "epochs", None, "axolotl"),
}
# Known to those tools, meaningless to lorakit's loop (it evaluates, logs and saves on its own terms).
IGNORED = {"do_train", "do_eval", "do_predict", "evaluation_strategy", "eval_strategy", "save_strategy",
           "logging_strategy", "logging_dir", "logging_first_step", "push_to_hub", "hub_model_id", "hub_strategy",
           "run_name", "disable_tqdm", "remove_unused_columns", "dataloader_num_workers", "dataloader_pin_memory",
           "group_by_length", "ddp_find_unused_parameters", "load_best_model_at_end", "metric_for_best_model",
           "greater_is_better", "save_safetensors", "task_type", "peft_type", "inference_mode", "bias_type"}


def translate_aliases(data: dict[str, Any], where: str = "config") -> tuple[dict[str, Any], list[str]]:
    """``data`` with other tools' key names moved to lorakit's (at the top level or inside a section),
    and one note per key moved or ignored. Two spellings of one key with different values are an error."""
    from .sections import SECTIONS

    if not isinstance(data, dict):
        return data, []
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) and k in SECTIONS else v) for k, v in data.items()}
    notes: list[str] = []
    places = [(None, k) for k in list(out) if k not in SECTIONS]
    places += [(s, k) for s in SECTIONS if isinstance(out.get(s), dict) for k in list(out[s])
               if k not in SECTIONS[s].__dataclass_fields__]
    for section, key in places:
        holder = out if section is None else out[section]
        shown = key if section is None else f"{section}.{key}"
        if key in IGNORED:
            holder.pop(key)
            notes.append(f"{where}: {shown} has no meaning in lorakit; ignored")
        elif key in ALIASES:
            target, ours, convert, origin = ALIASES[key]
            value = holder.pop(key)
            value = convert(value) if convert is not None else value
            if value is None:
                continue
            dest = out.setdefault(target, {})
            if not isinstance(dest, dict):
                raise LorakitError(f"{where}: section {target!r} must be a mapping")
            if ours in dest and dest[ours] != value:
                raise LorakitError(f"{where}: {shown} ({origin}'s name) and {target}.{ours} give different values "
                                   f"({value!r} and {dest[ours]!r}); keep one")
            dest[ours] = value
            notes.append(f"{where}: {shown} read as {target}.{ours} ({origin}'s name)")
        elif section is None:  # a flat key that names one section's field (HF's seed, warmup...)
            owners = [s for s, cls in SECTIONS.items() if key in cls.__dataclass_fields__]
            if len(owners) == 1 and key not in out.get(owners[0], {}):
                out.setdefault(owners[0], {})[key] = holder.pop(key)
                notes.append(f"{where}: {key} read as {owners[0]}.{key}")
    return out, notes
