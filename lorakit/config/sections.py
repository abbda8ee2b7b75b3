"""Typed configs. Field docstrings (the string under each field) are the help text; every
``__post_init__`` rejects bad values with a message that says what to do."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Union

from ..errors import LorakitError
from .choices import (BIAS_CHOICES, DEFAULT_MODEL, DTYPE_CHOICES, INIT_CHOICES, QUANT_CHOICES, QUANT_ROUNDINGS,
                      WEIGHT_METHODS, check_regex, one_of, valid_init)
from .fields import field_docs
from .train_section import TrainConfig

__all__ = ["LoraConfig", "ModelConfig", "DataConfig", "RunConfig", "SECTIONS", "resolve_batch_tokens"]
@dataclass
class LoraConfig:
    """Which modules get adapters, and their rank, scaling and init."""

    r: int = 8
    """Rank of the update B·A (A is r×in, B is out×r)."""
    alpha: float = 16.0
    """Scaling numerator: s = alpha/r (or alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training (0 = off, the fast path)."""
    target_modules: Union[list[str], str, None] = None
    """Modules to adapt: names or '.suffix' matches (list), a regex (full match), or 'all-linear'. None: the model's default."""
    exclude_modules: Union[list[str], str, None] = None
    """Modules never adapted, in the same forms as target_modules."""
    layers_to_transform: Union[list[int], int, None] = None
    """Only adapt these layer indices (the first number in a module's path)."""
    layers_pattern: Union[list[str], str, None] = None
    """Name of the layer list whose index layers_to_transform refers to (e.g. 'layers', 'h')."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module ranks: {regex: r}, matched against the end of the module path (PEFT semantics)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alphas: {regex: alpha}, like rank_pattern."""
    modules_to_save: Union[list[str], None] = None
    """Modules trained in full and saved with the adapter (e.g. ['lm_head'])."""
    bias: str = "none"
    """Which base biases train too: none | all | lora_only (biases of adapted modules)."""
    use_rslora: bool = False
    """rsLoRA scaling alpha/sqrt(r): keeps updates stable at large ranks."""
    use_dora: bool = False
    """DoRA: a trained per-output magnitude times the normalised W + s·B·A (Linear/Conv1D targets; PEFT's use_dora)."""
    init: str = "default"
    """A/B init: default (kaiming A, zero B: no-op at start) | gaussian | pissa | pissa_niter_<N> | eora (4-bit base: start from the rank-r correction of its rounding error on calibration rows)."""
    fan_in_fan_out: bool = False
    """Base weights stored (in, out), as GPT-2's Conv1D; set automatically for Conv1D."""
    task_type: Union[str, None] = None
    """PEFT task type written to adapter_config.json; None: CAUSAL_LM for language models, else unset."""
    base_model_name_or_path: Union[str, None] = None
    """Where the base model came from (written to adapter_config.json)."""

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise LorakitError(f"lora.r must be a positive integer (typical: 8, 16, 32), got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise LorakitError(f"lora.alpha must be a positive number (typical: 2·r), got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorakitError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_CHOICES:
            raise LorakitError(f"lora.bias must be one of {', '.join(BIAS_CHOICES)}, got {self.bias!r}")
        if not valid_init(self.init):
            raise LorakitError(f"lora.init must be {one_of(INIT_CHOICES)}, got {self.init!r}")
        for key in ("target_modules", "exclude_modules"):
            value = getattr(self, key)
            if isinstance(value, (tuple, set)):
                setattr(self, key, sorted(value))
            elif isinstance(value, list) and not value:
                raise LorakitError(f"lora.{key} is an empty list; leave it unset to use the default")
            if isinstance(value, str) and value != "all-linear":
                check_regex(value, f"lora.{key}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        for key, table, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            for pattern, value in table.items():
                check_regex(pattern, f"lora.{key}[{pattern!r}]")
                if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                    raise LorakitError(f"lora.{key}[{pattern!r}] must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its docstring (used as CLI help)."""
        return field_docs(cls)


@dataclass
class ModelConfig:
    """The base model."""

    name: str = DEFAULT_MODEL
    """Base model: a local folder, a .gguf file, a hub id, or the embedded 'smollm2-135m'."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""
    dtype: str = "auto"
    """Weights dtype: auto (bf16 when training runs in bf16 — see train.precision — and on CUDA GPUs with bf16; float32 otherwise) | float32 | bfloat16 | float16."""
    trust_remote_code: bool = False
    """Allow model code from the hub (off unless you trust the repository)."""
    quantize: str = "none"
    """Store the frozen linear weights quantized (QLoRA): none | nf4 | fp4 | int8 (needs lorakit[qlora])."""
    double_quant: bool = True
    """4-bit only: quantize the block scales too (4.127 instead of 4.5 bits per weight)."""
    compute_dtype: str = "auto"
    """4-bit only: dtype the quantized layers compute in: auto (bf16 on CUDA that supports it, else float32) | float32 | bfloat16 | float16."""
    quant_rounding: str = "nearest"
    """4-bit only: nearest (each weight to its nearest level, as bitsandbytes does) | gptq (error-compensating rounding calibrated on training rows: same format, closer outputs)."""
    quant_calibration: int = 128
    """quant_rounding gptq or lora.init eora: how many training examples calibrate them."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise LorakitError(f"model.dtype must be {one_of(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.quantize not in QUANT_CHOICES:
            raise LorakitError(f"model.quantize must be one of {', '.join(QUANT_CHOICES)}, got {self.quantize!r}")
        if self.compute_dtype not in DTYPE_CHOICES:
            raise LorakitError(f"model.compute_dtype must be {one_of(DTYPE_CHOICES)}, got {self.compute_dtype!r}")
        if self.quant_rounding not in QUANT_ROUNDINGS:
            raise LorakitError(f"model.quant_rounding must be {' or '.join(QUANT_ROUNDINGS)}, got {self.quant_rounding!r}")
        if self.quant_rounding == "gptq" and self.quantize not in ("nf4", "fp4"):
            raise LorakitError(f"model.quant_rounding gptq rounds 4-bit weights: it needs model.quantize nf4 or fp4 "
                               f"(got {self.quantize!r})")
        if self.quant_calibration < 1:
            raise LorakitError(f"model.quant_calibration must be at least 1 example, got {self.quant_calibration}")


@dataclass
class DataConfig:
    """Training data and how it becomes token rows."""

    path: Union[list[str], str, None] = None
    """Data file(s) or folder(s): .json, .jsonl, .csv, .parquet. None: the built-in demo task."""
    format: str = "auto"
    """auto | alpaca | sharegpt | messages | text."""
    columns: dict[str, str] = field(default_factory=dict)
    """Map our field names to the file's, e.g. {instruction: question, output: answer}."""
    template: str = "auto"
    """auto (the tokenizer's chat template, else chatml) | tokenizer | chatml | human-assistant."""
    max_len: int = 1024
    """Longest example in tokens (and the packed row length)."""
    truncation: str = "truncate"
    """Examples longer than max_len: truncate | drop."""
    train_on_prompt: bool = False
    """Train on prompt tokens too (default: assistant turns and their end-of-turn token only)."""
    packing: bool = True
    """Pack several examples per row (no attention across them); False: padded, length-grouped batches."""
    val_size: float = 0.05
    """Validation split: a fraction (< 1) or a number of examples (>= 1); 0 for none."""
    eval_path: Union[list[str], str, None] = None
    """Separate validation file(s); replaces val_size."""
    cache: bool = True
    """Cache tokenized data (keyed by data, tokenizer, template and max_len)."""
    streaming: bool = False
    """Read, tokenize and pack the training data as the run goes, a buffer at a time (data larger than memory; needs train.max_steps). Validation: the first val_size records (a fraction: the first 200), or eval_path."""
    stream_buffer: int = 2048
    """Streaming: examples read, packed and shuffled together (memory grows with it; more mixes better)."""

    def __post_init__(self) -> None:
        if self.max_len < 8:
            raise LorakitError(f"data.max_len must be at least 8 tokens, got {self.max_len}")
        if self.truncation not in ("truncate", "drop"):
            raise LorakitError(f"data.truncation must be truncate or drop, got {self.truncation!r}")
        if self.val_size < 0:
            raise LorakitError(f"data.val_size must be >= 0, got {self.val_size}")
        if isinstance(self.path, str):
            self.path = [self.path]
        if isinstance(self.eval_path, str):
            self.eval_path = [self.eval_path]


@dataclass
class RunConfig:
    """Everything one `lorakit train` run needs; saved as config.yaml in the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32, target_modules="all-linear"))
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.method == "dora":
            self.lora.use_dora = True
        if self.train.method in WEIGHT_METHODS:
            _check_weight_method(self)
        if self.train.objective == "dpo" and self.train.method in WEIGHT_METHODS:
            raise LorakitError(f"train.objective dpo compares with a reference: the base with the adapter switched off, "
                               f"which train.method {self.train.method} does not have; use --train.method lora, or "
                               "--train.objective orpo or simpo (no reference)")
        if self.data.streaming and self.train.max_steps < 1:
            raise LorakitError("data.streaming reads the data without knowing its length: set train.max_steps "
                               "(the run ends there; the stream restarts when it runs out)")
        if self.data.streaming and self.data.stream_buffer < 2:
            raise LorakitError(f"data.stream_buffer must be at least 2 examples, got {self.data.stream_buffer}")
        clash = [k for k, on in (("train.rank_schedule", self.train.rank_schedule is not None),
                                 ("train.fsdp", self.train.fsdp)) if on]
        if self.train.init_adapter is not None and clash:
            raise LorakitError(f"train.init_adapter cannot be combined with {clash[0]} yet; drop one of them")
        if self.lora.init == "eora" and self.model.quantize not in ("nf4", "fp4"):
            raise LorakitError(f"lora.init eora corrects a 4-bit base's rounding error: it needs model.quantize nf4 or "
                               f"fp4 (got {self.model.quantize!r})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def micro_tokens(self, world: int = 1) -> int:
        """An unpacked run's token budget per micro-batch (0: batch_size rows); see train.batch_tokens."""
        if self.data.packing or not self.train.batch_tokens:
            return 0
        return max(1, self.train.batch_tokens // (self.train.grad_accum * world))


def resolve_batch_tokens(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """A packed run's train.batch_tokens as rows: batch_size = batch_tokens // max_len (at least
    one), grad_accum 1, batch_tokens then 0 — the config a run saves, resumes and fits to memory.
    Unpacked runs keep it (their micro-batches are formed by it). Returns the config and a line
    saying what was resolved (None when nothing was)."""
    t, max_len = cfg.train, cfg.data.max_len
    if not t.batch_tokens or not cfg.data.packing:
        return cfg, None
    rows = max(1, t.batch_tokens // max_len)
    line = (f"train.batch_tokens {t.batch_tokens:,}: {rows} packed row(s) of {max_len} tokens per step"
            + (f" (max_len is larger than the budget: one row of {max_len})" if t.batch_tokens < max_len else ""))
    return replace(cfg, train=replace(t, batch_size=rows, grad_accum=1, batch_tokens=0)), line


def _check_weight_method(cfg: RunConfig) -> None:
    """Options that only mean something for an adapter are refused with full/freeze tuning."""
    method, t = cfg.train.method, cfg.train
    refused = [("model.quantize", cfg.model.quantize != "none", "a quantized base cannot train its weights; QLoRA is "
                "--train.method lora with --model.quantize nf4"),
               ("lora.use_dora", cfg.lora.use_dora, "DoRA is an adapter: --train.method dora"),
               ("train.rank_schedule", t.rank_schedule is not None, "a rank schedule grows an adapter"),
               ("train.lora_plus_ratio", t.lora_plus_ratio > 0, "LoRA+ sets B's learning rate"),
               ("train.fsdp", t.fsdp, "FSDP runs shard adapters only for now"),
               ("lora.init", cfg.lora.init != "default", "the init is an adapter's"),
               ("train.init_adapter", t.init_adapter is not None, "it trains an adapter further; to start from one, "
                "merge it into a model folder (lorakit merge) and pass that as --model")]
    for key, bad, why in refused:
        if bad:
            raise LorakitError(f"train.method {method} trains the model's own weights and cannot use {key}: {why}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig}


