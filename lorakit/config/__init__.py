"""Run configuration: plain dataclasses (``model``, ``data``, ``lora``, ``train`` sections) whose
field docstrings are the ``--help`` text (``sections``, ``train_section``), the choice lists every other room reads (``choices``),
rank schedules as a value (``rank_schedule``), YAML files and flag strings (``loading``), and the
Hugging Face / axolotl key names a user's existing config may use (``aliases``).

May import: ``lorakit.errors`` only, and no torch, transformers or other heavy library — a config
must be readable (and ``--help`` fast) without them."""

from .aliases import translate_aliases
from .fields import default_of, field_docs, from_dict
from .loading import coerce_value, dump_yaml, load_yaml, merge_nested, run_config_from_dict
from .rank_schedule import RankSchedule, parse_rank_schedule, stage_alpha
from .choices import (ADAPTER_LR, BEFORE_LABELS, BIAS_CHOICES, COMBINE_METHODS, DEFAULT_MODEL, DTYPE_CHOICES, INIT_CHOICES,
                      METHODS, OBJECTIVES, OPTIMIZERS, PRECISIONS, PREFERENCE_BETA, QUANT_CHOICES, QUANT_ROUNDINGS,
                      SHARED_INPUT_NAMES, SIGN_METHODS, TASK_MERGES, TRACKERS, WEIGHT_LR, WEIGHT_METHODS, one_of, valid_init)
from .sections import SECTIONS, DataConfig, LoraConfig, ModelConfig, RunConfig, resolve_batch_tokens
from .train_section import SCHEDULES, TrainConfig

__all__ = ["SHARED_INPUT_NAMES", "BEFORE_LABELS", "translate_aliases", "default_of", "field_docs", "from_dict", "coerce_value", "dump_yaml", "load_yaml",
           "merge_nested", "run_config_from_dict", "RankSchedule", "parse_rank_schedule", "stage_alpha",
           "BIAS_CHOICES", "COMBINE_METHODS", "SIGN_METHODS", "TASK_MERGES", "DEFAULT_MODEL", "DTYPE_CHOICES", "INIT_CHOICES", "METHODS", "OPTIMIZERS", "PRECISIONS", "QUANT_CHOICES",
           "QUANT_ROUNDINGS", "SCHEDULES", "SECTIONS", "DataConfig", "LoraConfig", "ModelConfig", "RunConfig",
           "TrainConfig", "ADAPTER_LR", "WEIGHT_LR", "WEIGHT_METHODS", "OBJECTIVES", "PREFERENCE_BETA", "TRACKERS", "one_of", "resolve_batch_tokens", "valid_init"]
