"""The ``train`` section: the optimisation loop, evaluation, checkpoints and logging."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ..errors import LorakitError
from .choices import (ADAPTER_LR, BEFORE_LABELS, METHODS, OBJECTIVES, OPTIMIZERS, PRECISIONS, PREFERENCE_BETA,
                      WEIGHT_LR, WEIGHT_METHODS, check_regex, one_of, tracker_names)
from .rank_schedule import parse_rank_schedule

__all__ = ["SCHEDULES", "TrainConfig"]

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
    """Tokens per optimizer step instead of rows (0: off). Packed: batch_tokens // max_len rows per step (batch_size and grad_accum are set from it); unpacked: each micro-batch holds as many examples as fit batch_tokens / grad_accum tokens in one padding-free row (batch_size is then not used)."""
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
            check_regex(self.trainable_modules, "train.trainable_modules")
        if self.optimizer not in OPTIMIZERS:
            raise LorakitError(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.precision not in PRECISIONS:
            raise LorakitError(f"train.precision must be {one_of(PRECISIONS)}, got {self.precision!r}")
        if self.max_steps < 0 or self.epochs <= 0 and self.max_steps == 0:
            raise LorakitError("set train.max_steps > 0 or train.epochs > 0")
        self.report_to = tracker_names(self.report_to)
        if self.keep_last < 1:
            raise LorakitError(f"train.keep_last must be at least 1, got {self.keep_last}")
        if self.rank_schedule is not None:
            schedule = parse_rank_schedule(self.rank_schedule)
            if schedule.steps is None and self.eval_every < 1:
                raise LorakitError("train.rank_schedule plateau:... grows on the eval loss: set train.eval_every too")
