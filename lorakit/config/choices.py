"""The choice lists every room reads (methods, objectives, dtypes, trackers...) and the checks on
single values that several config sections share."""

from __future__ import annotations

import re
from typing import Any

from ..errors import LorakitError

__all__ = ["BEFORE_LABELS", "BIAS_CHOICES", "QUANT_CHOICES", "QUANT_ROUNDINGS", "OPTIMIZERS", "METHODS", "WEIGHT_METHODS",
           "OBJECTIVES", "TRACKERS", "PREFERENCE_BETA", "ADAPTER_LR", "WEIGHT_LR", "DEFAULT_MODEL", "DTYPE_CHOICES",
           "PRECISIONS", "INIT_CHOICES", "TASK_MERGES", "COMBINE_METHODS", "SIGN_METHODS", "SHARED_INPUT_NAMES",
           "tracker_names", "one_of", "valid_init", "check_regex"]

# What metrics.jsonl and the tables call the model before training: the base, or (train.init_adapter)
# the adapter as it started
BEFORE_LABELS = ("base", "start")

BIAS_CHOICES = ("none", "all", "lora_only")
QUANT_CHOICES = ("none", "nf4", "fp4", "int8")
QUANT_ROUNDINGS = ("nearest", "gptq")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
METHODS = ("lora", "dora", "full", "freeze")  # train.method
WEIGHT_METHODS = ("full", "freeze")  # methods that train the model's own weights (no adapter)
OBJECTIVES = ("sft", "dpo", "orpo", "simpo")  # train.objective; all but sft train on preference pairs
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")  # train.report_to
PREFERENCE_BETA = {"dpo": 0.1, "orpo": 0.1, "simpo": 2.0}  # train.beta when unset (TRL's and the SimPO paper's)
ADAPTER_LR, WEIGHT_LR = 2e-4, 5e-5  # train.lr when unset: adapters, and full/freeze tuning
DEFAULT_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct (lorakit.base.source)
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # weights and compute dtypes (torch's names)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # training precision (autocast)
INIT_CHOICES = ("default", "gaussian", "pissa", "pissa_niter_<N>", "eora")
# Adapter combination (lorakit.core.combine): tensor-merge rules, and every method built from them.
TASK_MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINE_METHODS = ("cat", "svd", *TASK_MERGES, *(f"{m}_svd" for m in TASK_MERGES[1:]))
SIGN_METHODS = ("total", "frequency")  # TIES's sign election
# Child names that, within one parent module, are applied to the same input tensor (one stacked A
# matmul and one dropout mask: lorakit.core.shared_input; the estimate counts one mask for them).
SHARED_INPUT_NAMES: tuple[frozenset[str], ...] = (
    frozenset({"q_proj", "k_proj", "v_proj"}),  # Llama, Mistral, Qwen, Gemma, OPT, ...
    frozenset({"gate_proj", "up_proj"}),  # gated MLPs
    frozenset({"query", "key", "value"}),  # BERT-style
    frozenset({"w1", "w3"}),  # SwiGLU written as w1/w2/w3
)


def tracker_names(value: Any) -> list[str]:
    """train.report_to as a list of tracker names ("none" or nothing: [])."""
    names = [] if value is None else value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip() and str(n).strip() != "none"]
    for n in names:
        if n not in TRACKERS:
            raise LorakitError(f"train.report_to: unknown tracker {n!r}; lorakit logs to {one_of(TRACKERS)}")
    return list(dict.fromkeys(names))


def one_of(choices: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]


def valid_init(init: str) -> bool:
    return init in INIT_CHOICES[:3] or init == "eora" or re.fullmatch(r"pissa_niter_\d+", init) is not None


def check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise LorakitError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from None
