"""Typed configs. Field docstrings (the string under each field) are the help text; every
``__post_init__`` rejects bad values with a message that says what to do."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Union

from ..errors import LorakitError
from .fields import field_docs
from .rank_schedule import parse_rank_schedule

__all__ = ["LoraConfig", "ModelConfig", "DataConfig", "TrainConfig", "RunConfig", "SECTIONS", "BIAS_CHOICES", "DEFAULT_MODEL",
           "QUANT_CHOICES", "QUANT_ROUNDINGS", "METHODS", "WEIGHT_METHODS", "ADAPTER_LR", "WEIGHT_LR", "TASK_MERGES", "COMBINE_METHODS", "SIGN_METHODS", "OPTIMIZERS", "SCHEDULES", "DTYPE_CHOICES", "PRECISIONS", "INIT_CHOICES",
           "valid_init", "one_of", "resolve_batch_tokens", "OBJECTIVES", "PREFERENCE_BETA", "BEFORE_LABELS"]
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


def _trackers(value: Any) -> list[str]:
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
                _check_regex(value, f"lora.{key}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        for key, table, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, (int, float))):
            for pattern, value in table.items():
                _check_regex(pattern, f"lora.{key}[{pattern!r}]")
                if not isinstance(value, kind) or isinstance(value, bool) or value <= 0:
                    raise LorakitError(f"lora.{key}[{pattern!r}] must be a positive number, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Field name -> its docstring (used as CLI help)."""
        return field_docs(cls)


def _check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as err:
        raise LorakitError(f"{where}: {pattern!r} is not a valid regular expression ({err})") from None


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


SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    """The optimisation loop, evaluation, checkpoints and logging."""

    out_dir: str = "runs/lorakit"
    """Run folder: adapter/, checkpoints/, metrics.jsonl, loss.png, config.yaml."""
    method: str = "lora"
    """What trains: lora (A and B) | dora (DoRA: A, B and a per-output magnitude; same as lora.use_dora true) | full (the model's own weights, in fp32 master copies; saves a transformers folder) | freeze (only the last train.freeze_layers decoder blocks, as full)."""
    objective: str = "sft"
    """What the loss is: sft (next-token loss on the answers) | dpo (preference pairs; the reference is the base with the adapter off, or train.init_adapter as it started: no second copy) | orpo (pairs; the chosen answers' loss plus an odds-ratio term, no reference) | simpo (pairs; length-normalised margin, no reference)."""
    beta: Union[float, None] = None
    """dpo/orpo/simpo: β, how strongly the preference pulls (unset: 0.1 for dpo and orpo, 2.0 for simpo)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin γ."""
    freeze_layers: int = 2
    """freeze: how many of the last decoder blocks train (negative: the first |N| blocks)."""
    trainable_modules: Union[list[str], str, None] = None
    """full/freeze: only these modules train (names or '.suffix' matches, or a regex), inside the trained blocks for freeze; None: all of them."""
    freeze_embeddings: bool = False
    """full: keep the input embeddings and the output head frozen (a large share of a small model's weights)."""
    lr: Union[float, None] = None
    """Peak learning rate (AdamW); unset: 2e-4 for lora/dora, 5e-5 for full/freeze (their weights move at a tenth of an adapter's rate)."""
    optimizer: str = "adamw"
    """adamw | adamw8bit (8-bit states, bitsandbytes) | paged_adamw8bit (CUDA paging; plain 8-bit on CPU)."""
    lora_plus_ratio: float = 0.0
    """LoRA+: learning rate of B = ratio × lr (0: off; 16 is the paper's choice)."""
    weight_decay: float = 0.0
    """AdamW weight decay on A/B (the seeds' L2 regularisation)."""
    batch_size: int = 4
    """Rows per micro-batch (packed rows hold several examples)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    batch_tokens: int = 0
    """Tokens per optimizer step instead of rows (0: off). Packed: batch_tokens // max_len rows per step (batch_size and grad_accum are set from it); unpacked: each micro-batch holds as many examples as fit batch_tokens / grad_accum tokens with padding (batch_size is then not used)."""
    epochs: float = 1.0
    """Passes over the data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps to run (0: from epochs)."""
    warmup: float = 0.03
    """Warm-up: a fraction of the steps (< 1) or a number of steps (>= 1)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up: constant | linear | cosine."""
    clip: float = 1.0
    """Gradient-norm clipping (0: off)."""
    seed: int = 42
    """Seed for init, data order and dropout."""
    grad_checkpointing: bool = False
    """Recompute activations in backward (less memory, ~30% slower)."""
    precision: str = "auto"
    """auto (bf16 autocast on CUDA GPUs with bf16 and on CPUs with native bf16 matmuls, AVX512-BF16/AMX; fp32 on other CPUs and for a 4-bit base on CPU) | fp32 | bf16 | fp16."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    eval_samples: int = 64
    """Held-out examples scored by generation (exact match) where the data has a scorer."""
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end and on interrupt)."""
    keep_last: int = 2
    """Checkpoints kept."""
    log_every: int = 5
    """Write metrics (and refresh the loss plot) every N steps."""
    plot: bool = True
    """Write loss.png (train and eval loss) into the run folder."""
    report_to: Union[list[str], str, None] = None
    """Trackers that also log the run: tensorboard, wandb, mlflow, trackio (a list, or comma-separated; each needs lorakit[NAME]); all log locally by default (docs/training.md#trackers-trainreport_to)."""
    tracker_project: str = "lorakit"
    """The trackers' project (MLflow: experiment) name; the run's name is its folder's."""
    threads: int = 0
    """CPU threads for torch (0: the number of physical cores)."""
    overwrite: bool = False
    """Reuse an existing out_dir (its old files are replaced)."""
    resume: Union[str, None] = None
    """Resume from 'latest' or a checkpoint folder."""
    init_adapter: Union[str, None] = None
    """Train a saved adapter further (its folder or its run folder): its rank, α and targets replace the lora section's; before/after and DPO's reference are this adapter as it starts (a frozen copy), not the bare base."""
    rank_schedule: Union[str, list, None] = None
    """Progressive rank: '2@0,8@200,16@600' (rank@step) or 'plateau:2,8,16' (grow when eval loss stalls); lora.r = the last rank."""
    fsdp: bool = False
    """Shard the base's decoder blocks (and their adapters) over the processes with FSDP2; needs torchrun / --nproc."""
    rank_patience: int = 2
    """Plateau schedule: evaluations without a 1% eval-loss improvement before the rank grows."""

    @property
    def preference_beta(self) -> float:
        """train.beta, or the objective's default when it is unset."""
        return float(self.beta) if self.beta is not None else PREFERENCE_BETA.get(self.objective, 0.0)

    @property
    def peak_lr(self) -> float:
        """train.lr, or the method's default when it is unset."""
        if self.lr is not None:
            return float(self.lr)
        return WEIGHT_LR if self.method in WEIGHT_METHODS else ADAPTER_LR

    @property
    def before_label(self) -> str:
        """What the run's "before" is called: base, or start when init_adapter is trained further."""
        return BEFORE_LABELS[self.init_adapter is not None]

    def __post_init__(self) -> None:
        for key in ("lr", "beta"):
            value = getattr(self, key)
            if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
                try:
                    value = float(value)
                except ValueError:
                    raise LorakitError(f"train.{key} must be a number, got {value!r}") from None
                setattr(self, key, value)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise LorakitError(f"train.{key} must be positive, got {value!r}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise LorakitError("train.batch_size and train.grad_accum must be at least 1")
        if self.batch_tokens < 0:
            raise LorakitError(f"train.batch_tokens must be 0 (off) or a number of tokens per step, got {self.batch_tokens}")
        if self.schedule not in SCHEDULES:
            raise LorakitError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.method not in METHODS:
            raise LorakitError(f"train.method must be {one_of(METHODS)}, got {self.method!r}")
        if self.objective not in OBJECTIVES:
            raise LorakitError(f"train.objective must be {one_of(OBJECTIVES)}, got {self.objective!r}")
        if self.freeze_layers == 0:
            raise LorakitError("train.freeze_layers 0 trains nothing; give the number of last blocks to train (e.g. 2)")
        if isinstance(self.trainable_modules, list) and not self.trainable_modules:
            raise LorakitError("train.trainable_modules is an empty list; leave it unset to train every module")
        if isinstance(self.trainable_modules, str):
            _check_regex(self.trainable_modules, "train.trainable_modules")
        if self.optimizer not in OPTIMIZERS:
            raise LorakitError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise LorakitError(f"train.precision must be {one_of(PRECISIONS)}, got {self.precision!r}")
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            raise LorakitError("set train.max_steps > 0 or train.epochs > 0")
        self.report_to = _trackers(self.report_to)
        if self.keep_last < 1:
            raise LorakitError(f"train.keep_last must be at least 1, got {self.keep_last}")
        if self.rank_schedule is not None:
            schedule = parse_rank_schedule(self.rank_schedule)
            if schedule.steps is None and self.eval_every < 1:
                raise LorakitError("train.rank_schedule plateau:... grows on the eval loss: set train.eval_every too")


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


