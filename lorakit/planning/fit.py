"""Fitting a run to the memory it has, before it starts: the estimate (``lorakit.planning.estimate``)
of the configured step against the memory available, and the changes that make it fit.

On CPU the estimate's live-tensor peak is scaled by the peak RSS / estimate ratio `lorakit train`
measured under mimalloc (``CPU_RSS_RATIO``: the allocator's and oneDNN's memory beyond the live
tensors), so a run planned near the edge of the machine's memory is not killed by the part the
estimate does not see. The rule, in order, while that expected peak is above 90% of what is available:
1. turn on gradient checkpointing (activations: every token's per-layer tensors → one per layer);
2. halve the micro-batch and double the accumulation (the same examples per optimizer step, the
   same result up to rounding: the loss is one mean over the step's label tokens);
and when a micro-batch of one row with checkpointing still does not fit, refuse, with the numbers
and the longest ``data.max_len`` that would fit. (``recommend``, which also may choose a 4-bit
base, plans with the same estimate against the device's memory.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import WEIGHT_METHODS
from ..errors import LorakitError
from .estimate import ModelShape, estimate_memory, parse_size

__all__ = ["MemoryFit", "fit_to_memory", "apply_fit", "available_memory", "estimate_method", "estimate_run", "HEADROOM",
           "MEMORY_ENV", "CPU_RSS_RATIO", "rss_ratio", "OVERHEAD_BYTES", "device_kind", "auto_precision",
           "planned_precision", "planned_estimate", "machine_plan", "resident_note"]

HEADROOM = 0.9  # the fraction of the available memory a run may plan to use
# What the process holds before any model exists (interpreter, torch, transformers): measured RSS
# after `import lorakit.training.loop` on CPU; on CUDA the context and kernels lorakit loads, typical value.
OVERHEAD_BYTES = {"cpu": 420 * 2**20, "cuda": 600 * 2**20}
# Peak RSS over the estimate, measured by `lorakit train` on CPU under mimalloc (SmolLM2-135M, steps of
# 837 and 4,096 tokens, 2026-12-07; docs/planning.md): fp32 1.04-1.15x, bf16 1.16-1.21x.
CPU_RSS_RATIO = {"fp32": 1.15, "bf16": 1.21, "fp16": 1.21}
MEMORY_ENV = "LORAKIT_AVAILABLE_MEMORY"  # e.g. 8GB: plan for this much instead of what the system reports


@dataclass
class MemoryFit:
    batch_size: int
    grad_accum: int
    grad_checkpointing: bool
    estimate: float  # bytes, the planned step's peak of live tensors
    changes: list[str] = field(default_factory=list)
    rss_ratio: float = 1.0  # the process's expected peak over ``estimate`` (CPU_RSS_RATIO on CPU)

    @property
    def expected_peak(self) -> float:
        """Bytes the process is expected to peak at: the estimate times ``rss_ratio``."""
        return self.estimate * self.rss_ratio


def device_kind(device: str) -> str:
    """cpu or cuda: which framework overhead to count."""
    if device != "auto":
        return "cuda" if device.startswith("cuda") else "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def auto_precision(kind: str, quantize: str = "none") -> str:
    """The precision `lorakit train` would pick (planning for CUDA from any machine assumes bf16)."""
    if kind == "cuda":
        return "bf16"
    import torch

    from ..base import resolve_precision

    return resolve_precision("auto", torch.device("cpu"), quantize)


def planned_precision(cfg, kind: str) -> str:
    """The precision a RunConfig trains in on a device of ``kind``: its own, else what auto picks."""
    from ..config import DTYPE_CHOICES, PRECISIONS

    if cfg.train.precision != "auto":
        return cfg.train.precision
    if cfg.model.dtype != "auto":  # the weights' dtype named explicitly: activations follow it
        return PRECISIONS[DTYPE_CHOICES.index(cfg.model.dtype)]
    return auto_precision(kind, cfg.model.quantize)


def rss_ratio(device_kind: str, precision: str) -> float:
    """The measured peak RSS / estimate to plan a run with: CPU_RSS_RATIO on CPU, 1 on a GPU (whose
    allocator's reserve the estimate's framework overhead covers)."""
    return CPU_RSS_RATIO.get(precision, max(CPU_RSS_RATIO.values())) if device_kind == "cpu" else 1.0


def available_memory(device_kind: str) -> float:
    """Bytes this run can use: ``$LORAKIT_AVAILABLE_MEMORY`` when set, else the GPU's free memory
    (CUDA) or the system's available memory (MemAvailable)."""
    if os.environ.get(MEMORY_ENV):
        return parse_size(os.environ[MEMORY_ENV])
    if device_kind == "cuda":
        import torch

        return float(torch.cuda.mem_get_info()[0])
    import psutil

    return float(psutil.virtual_memory().available)


def estimate_method(cfg: Any) -> str:
    """The estimate's method for a RunConfig: full | freeze | qlora (a 4-bit base) | lora (and DoRA)."""
    if cfg.train.method in WEIGHT_METHODS:
        return cfg.train.method
    return "qlora" if cfg.model.quantize in ("nf4", "fp4") else "lora"


def estimate_run(shape: ModelShape, cfg: Any, precision: str, overhead: float, batch: int | None = None,
                 ckpt: bool | None = None, device_memory: float | None = None, optimizer: str | None = None):
    """The estimate of the step RunConfig ``cfg`` describes (``batch``/``ckpt`` override its own)."""
    optimizer = optimizer or ("adamw8bit" if cfg.train.optimizer.endswith("adamw8bit") else "adamw")
    targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, list) else "all-linear"  # a regex: the upper bound
    return estimate_memory(shape, estimate_method(cfg), cfg.lora.r, targets,
                           cfg.train.batch_size if batch is None else batch, cfg.data.max_len,
                           cfg.train.grad_checkpointing if ckpt is None else ckpt, precision, optimizer,
                           cfg.model.double_quant, overhead_bytes=overhead, device_memory=device_memory,
                           dora=cfg.lora.use_dora, freeze_layers=cfg.train.freeze_layers, dropout=cfg.lora.dropout > 0)


def planned_estimate(shape: ModelShape, cfg: Any, device_memory: float | None = None, optimizer: str | None = None):
    """``estimate_run`` for ``cfg`` on the device it names (``lorakit estimate``, the web UI): the
    precision it would train in there and that device's framework overhead."""
    kind = device_kind(cfg.model.device)
    return estimate_run(shape, cfg, planned_precision(cfg, kind), OVERHEAD_BYTES[kind], device_memory=device_memory,
                        optimizer=optimizer)


def machine_plan() -> tuple[str, float]:
    """(precision, rss_ratio) a run on this machine is planned with (``recommend``, the web UI)."""
    kind = device_kind("auto")
    precision = auto_precision(kind)
    return precision, rss_ratio(kind, precision)


def _gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def resident_note(estimate: float, ratio: float, approx: str = "~") -> str:
    """" (~X GiB resident)": the resident peak a run planned with ``ratio`` expects, or "" when the
    ratio is 1 (a GPU: the estimate is the plan)."""
    return f" ({approx}{_gib(estimate * ratio)} resident)" if ratio != 1.0 else ""


def fit_to_memory(shape: ModelShape, cfg: Any, precision: str, overhead: float, available: float,
                  ratio: float = 1.0) -> MemoryFit:
    """The micro-batch, accumulation and checkpointing whose estimated peak times ``ratio`` (the
    expected peak RSS over the estimate: ``rss_ratio``) fits ``available`` bytes (``cfg`` is a
    RunConfig; it is not changed). Raises LorakitError, with the numbers, when nothing fits."""
    t = cfg.train
    by_tokens = cfg.micro_tokens() > 0  # unpacked with train.batch_tokens: micro-batches of a token budget
    # the budget as rows of max_len (the estimate's unit); halving it is doubling the accumulation
    batch = max(1, cfg.micro_tokens() // cfg.data.max_len) if by_tokens else t.batch_size
    accum, ckpt = t.grad_accum, t.grad_checkpointing
    room = HEADROOM * available / ratio  # the live tensors' share of what may be planned
    est = estimate_run(shape, cfg, precision, overhead, batch, ckpt).total
    first, changes = est, []
    if est > room and not ckpt:
        ckpt = True
        est = estimate_run(shape, cfg, precision, overhead, batch, ckpt).total
        changes.append(f"train.grad_checkpointing true (estimated peak {_gib(first)} → {_gib(est)})")
    rows, start = batch * accum, batch
    while est > room and batch > 1:
        batch = (batch + 1) // 2
        accum = math.ceil(rows / batch)
        est = estimate_run(shape, cfg, precision, overhead, batch, ckpt).total
    if batch != start and by_tokens:
        changes.append(f"train.grad_accum {t.grad_accum} → {accum} (micro-batches of {t.batch_tokens // accum:,} of "
                       f"the step's {t.batch_tokens:,} tokens; estimated peak {_gib(est)})")
    elif batch != start:
        changes.append(f"train.batch_size {t.batch_size} → {batch} and train.grad_accum {t.grad_accum} → {accum} "
                       f"({batch * accum} rows per step as configured: {rows}; estimated peak {_gib(est)})")
    if est > room:
        longest = estimate_run(shape, cfg, precision, overhead, 1, True, device_memory=room).max_seq or 0
        hint = (f"data.max_len {longest} would fit (with batch 1 and checkpointing); lower it, use --quantize nf4"
                if longest >= 16 else "the weights and the framework alone take about that: use --quantize nf4")
        raise LorakitError(
            f"this run needs about {_gib(est)}{resident_note(est, ratio, 'about ')} even with a micro-batch of 1 row of {cfg.data.max_len} tokens and "
            f"gradient checkpointing, and {_gib(available)} is available ({int(HEADROOM * 100)}% of it may be "
            f"planned); {hint} or free memory (${MEMORY_ENV} overrides what the system reports)")
    # a budget leaves batch_size unused
    return MemoryFit(t.batch_size if by_tokens else batch, accum, ckpt, est, changes, ratio)


def apply_fit(cfg: Any, fit: MemoryFit) -> Any:
    """``cfg`` with the fitted batch, accumulation and checkpointing (a new RunConfig)."""
    return replace(cfg, train=replace(cfg.train, batch_size=fit.batch_size, grad_accum=fit.grad_accum,
                                      grad_checkpointing=fit.grad_checkpointing))
