"""What a training run resolves before its first step, in named steps: the run folder and what
resumes (``check_run``), the base model and its precision (``load_base``), the quantized base a
calibrated run builds (``calibrate_base``), the adapter (``make_adapter``), the optimizer, schedule
and mixed precision (``make_optimization``), and the state a resumed run continues from
(``restore``). Everything is validated before the run folder is written (``open_run_folder``)."""

from __future__ import annotations

import math
import random
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from ..base import load_model, physical_cores, quant_spec, resolve_device, resolve_dtype, resolve_precision
from ..config import WEIGHT_METHODS, RunConfig
from ..config.rank_schedule import RankSchedule, parse_rank_schedule, stage_alpha
from ..core.full_tuning import FullTuning, select_trainable
from ..core.lora_model import LoraModel, get_lora_model
from ..core.peft_format import find_adapter_folder, read_adapter_config
from ..core.start import drop_all as drop_start_factors
from ..data.dataset import Prepared
from ..data.formats import data_files
from ..data.packing import batch_plan, make_batches
from ..errors import LorakitError
from ..quant.bnb import prepare_for_kbit_training, quant_summary
from ..quant.saved_base import QUANTIZED_BASE, save_quantized_base
from .trackers import check_trackers
from .objective import INIT_ADAPTER
from .checkpoint import Progress, find_checkpoint, load_trainer_state, set_rng_state
from .distributed import DistContext
from .optim import build_optimizer, lr_lambda
from .rank_schedule import PlateauTracker

__all__ = ["with_init_adapter", "RunPlan", "BaseSetup", "Optimization", "check_run", "run_precision", "load_base", "calibrate_base", "data_line",
           "make_adapter", "output_name", "make_optimization", "restore", "load_states", "open_run_folder"]

Echo = Callable[[str], None]


def with_init_adapter(cfg: RunConfig) -> RunConfig:
    """``cfg`` with train.init_adapter's own LoRA config (rank, α, targets, dropout...) as its lora
    section and the adapter folder resolved (a run folder stands for its adapter/); unchanged without one."""
    if cfg.train.init_adapter is None:
        return cfg
    folder = find_adapter_folder(cfg.train.init_adapter)  # (it holds adapter_config.json)
    config = read_adapter_config(folder)
    return replace(cfg, lora=replace(config, init="default"), train=replace(cfg.train, init_adapter=str(folder)))


@dataclass
class RunPlan:
    """What the config and the run folder say before anything is loaded."""

    out: Path
    resume_from: Path | None
    schedule: RankSchedule | None


def _rank_schedule(cfg: RunConfig) -> RankSchedule | None:
    """The run's RankSchedule (None without one), checked against the rest of the config."""
    if cfg.train.rank_schedule is None:
        return None
    schedule = parse_rank_schedule(cfg.train.rank_schedule)
    if schedule.final != cfg.lora.r:
        raise LorakitError(f"train.rank_schedule ends at rank {schedule.final} but lora.r is {cfg.lora.r}; "
                           f"set lora.r {schedule.final} (the saved adapter's rank)")
    if cfg.lora.rank_pattern or cfg.lora.alpha_pattern:
        raise LorakitError("train.rank_schedule grows one rank for every layer; it cannot be combined with lora.rank_pattern")
    if cfg.lora.init.startswith("pissa"):
        raise LorakitError("train.rank_schedule cannot grow a PiSSA adapter; use lora.init default")
    if cfg.train.optimizer != "adamw":
        raise LorakitError("train.rank_schedule needs train.optimizer adamw (8-bit states cannot be resized)")
    return schedule


def _check_fsdp(cfg: RunConfig, ctx: DistContext, resume_from: Path | None, schedule: RankSchedule | None) -> None:
    if not ctx.enabled:
        raise LorakitError("train.fsdp shards the model over several processes: start with --nproc N or torchrun")
    if cfg.model.quantize != "none":
        raise LorakitError("train.fsdp with a quantized base is not supported; use model.quantize none")
    if schedule is not None:
        raise LorakitError("train.fsdp cannot be combined with train.rank_schedule")
    if resume_from is not None:
        raise LorakitError("resuming an FSDP run is not supported (its optimizer state is sharded); start a new run")


def check_run(cfg: RunConfig, ctx: DistContext) -> RunPlan:
    """Validate the run folder, the checkpoint to resume and the options that exclude each other;
    then fix the threads and seeds. Nothing is loaded or written yet."""
    for paths in (cfg.data.path, cfg.data.eval_path):  # a missing data file fails before the model loads
        if paths is not None:
            data_files(paths)
    t_cfg, out = cfg.train, Path(cfg.train.out_dir)
    if not t_cfg.resume and out.exists() and any(out.iterdir()) and not t_cfg.overwrite:
        raise LorakitError(f"{out} already holds a run; pass --train.overwrite true to replace it, "
                           f"--train.resume latest to continue it, or choose another --train.out_dir")
    ctx.barrier()  # every rank has checked the folder before rank 0 writes to it
    resume_from = find_checkpoint(out, t_cfg.resume) if t_cfg.resume else None
    if resume_from is not None and cfg.lora.init.startswith("pissa"):
        # Checkpoints hold PiSSA adapters converted for the original weights (rank 2r), which the
        # optimizer state (rank r, on the residual weights) does not match.
        raise LorakitError("resuming a run with lora.init=pissa is not supported; restart it, or use init=default")
    check_trackers(t_cfg.report_to)
    schedule = _rank_schedule(cfg)
    if t_cfg.fsdp:
        _check_fsdp(cfg, ctx, resume_from, schedule)
    torch.set_num_threads(t_cfg.threads or max(1, physical_cores() // ctx.local_world))
    random.seed(t_cfg.seed)
    torch.manual_seed(t_cfg.seed)
    return RunPlan(out, resume_from, schedule)


@dataclass
class BaseSetup:
    """The loaded base and how it is to be trained."""

    model: Any
    tokenizer: Any
    device: torch.device
    precision: str  # fp32 | bf16 | fp16, resolved
    calibrate: bool  # quantized after the data is read (GPTQ rounding and/or EoRA)
    eora: bool  # this run starts an EoRA adapter (not on resume: the checkpoint holds it)
    spec: Any = None  # the QuantSpec a calibrated run quantizes with
    saved_base: Path | None = None  # a resumed GPTQ run's own 4-bit base


def run_precision(cfg: RunConfig, target: torch.device) -> tuple[str, str]:
    """(precision, dtype the base is loaded in) of a run of ``cfg`` on ``target``.

    Under bf16 autocast the frozen base is kept in bf16 too: half the memory, no per-step casts.
    Full/freeze runs load the weights as stored (they train from the exact values; make_adapter
    casts what stays frozen)."""
    m_cfg, t_cfg = cfg.model, cfg.train
    precision = resolve_precision(t_cfg.precision, target, m_cfg.quantize)
    dtype = ("bfloat16" if m_cfg.dtype == "auto" and precision == "bf16" and m_cfg.quantize == "none"
             and t_cfg.method not in WEIGHT_METHODS else m_cfg.dtype)
    return precision, dtype


def load_base(cfg: RunConfig, plan: RunPlan, echo: Echo) -> BaseSetup:
    m_cfg, t_cfg = cfg.model, cfg.train
    target = resolve_device(m_cfg.device)
    precision, dtype = run_precision(cfg, target)
    # GPTQ rounding quantizes after the data is read (its rows calibrate it); a missing bitsandbytes is said first.
    # A resumed GPTQ run reloads the base it saved when it started (bit for bit, no recalibration).
    saved = plan.out / QUANTIZED_BASE if m_cfg.quant_rounding == "gptq" and plan.resume_from is not None else None
    saved = saved if saved is not None and saved.is_file() else None
    eora = cfg.lora.init == "eora" and plan.resume_from is None
    calibrate = (m_cfg.quant_rounding == "gptq" and saved is None) or eora
    spec = quant_spec(m_cfg.quantize, m_cfg.double_quant, m_cfg.compute_dtype, target) if calibrate else None
    # GPTQ takes the float model to the device one decoder block at a time: it is loaded on the CPU,
    # in the dtype it would have had on the device.
    load_dtype = resolve_dtype(dtype, target) if calibrate else dtype
    model, tok = load_model(m_cfg.name, "cpu" if calibrate else m_cfg.device, load_dtype, m_cfg.trust_remote_code,
                            quantize="none" if calibrate else m_cfg.quantize,
                            double_quant=m_cfg.double_quant, compute_dtype=m_cfg.compute_dtype, quantized_base=saved)
    device = target if calibrate else next(model.parameters()).device
    echo(f"precision: {precision}" + (f", base weights {dtype}" if dtype != "auto" else "")
         + (" (auto: this CPU has native bf16 matmuls; --train.precision fp32 for full fp32)"
            if t_cfg.precision == "auto" and precision == "bf16" and device.type == "cpu" else ""))
    return BaseSetup(model, tok, device, precision, calibrate, eora, spec, saved)


def calibrate_base(cfg: RunConfig, base: BaseSetup, prepared: Prepared, echo: Echo) -> None:
    """Quantize a calibrated run's base on its first training examples (GPTQ rounding, and with
    EoRA the corrections its adapter starts from), or say which saved base a resumed run uses;
    then get a quantized base ready for LoRA training."""
    if base.calibrate:
        from ..quant.gptq import calibrated_quantize

        examples = prepared.first(cfg.model.quant_calibration)
        rows = make_batches(examples, cfg.data.max_len, 1, True, 0, seed=cfg.train.seed, shape_padding=False)  # no padding
        rank = max([cfg.lora.r, *cfg.lora.rank_pattern.values()]) if base.eora else 0
        done = calibrated_quantize(base.model, base.spec, rows, base.device, rounding=cfg.model.quant_rounding,
                                   residual_rank=rank)
        what = " and ".join(w for w, on in (("GPTQ rounding", cfg.model.quant_rounding == "gptq"),
                                            (f"EoRA init (rank {rank})", base.eora)) if on)
        echo(f"{what}: {done['layers']} layers calibrated on {len(examples)} training examples "
             f"({done['tokens']} tokens) in {done['seconds']:.0f} s")
    elif base.saved_base is not None:
        echo(f"GPTQ-rounded base restored from {base.saved_base}")
    if cfg.model.quantize != "none":
        prepare_for_kbit_training(base.model)
        echo(f"base quantized: {quant_summary(base.model)}")


def data_line(cfg: RunConfig, prepared: Prepared) -> str:
    stats = prepared.stats
    what, n = ("preference pairs", 2) if prepared.pairs else ("examples", 1)
    if prepared.stream is not None:
        held = "data.eval_path" if cfg.data.eval_path else f"the first {stats['val_records']} records"
        return (f"data: streamed (read, tokenized and packed {cfg.data.stream_buffer} examples at a time); "
                f"{len(prepared.val) // n} validation {what} from {held}, template {prepared.template}")
    return (f"data: {len(prepared.train) // n} train / {len(prepared.val) // n} validation {what}, template {prepared.template}"
            + (" (tokenized data from cache)" if prepared.from_cache else "")
            + (f"; {stats['too_long']} longer than max_len={cfg.data.max_len} ({cfg.data.truncation})"
               if stats.get("too_long") else "")
            + (f"; dropped {stats['dropped_no_labels']} with no trainable token" if stats.get("dropped_no_labels") else ""))


def output_name(lm: LoraModel | FullTuning) -> str:
    """The folder a run's result has in the run folder and in each checkpoint: adapter | model."""
    return lm.output if isinstance(lm, FullTuning) else "adapter"


def _full_tuning(cfg: RunConfig, base: BaseSetup) -> FullTuning:
    """A full/freeze run's trained weights in fp32; under bf16 the frozen ones are cast to bf16, as
    a LoRA run's base (half the memory, no per-step casts)."""
    t = cfg.train
    names = select_trainable(base.model, t.method, t.freeze_layers, t.trainable_modules, t.freeze_embeddings)
    tuned = FullTuning(base.model, names, t.method)
    if base.precision == "bf16" and cfg.model.dtype == "auto":
        for p in base.model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    return tuned


def make_adapter(cfg: RunConfig, base: BaseSetup, schedule: RankSchedule | None, echo: Echo) -> LoraModel | FullTuning:
    """The trainable adapter over the base: at the schedule's first rank (with the α that keeps
    the final stage's scaling), from the EoRA corrections when this run starts one. A full/freeze
    run gets its model's own weights to train instead (``lorakit.core.full_tuning``)."""
    lm = _full_tuning(cfg, base) if cfg.train.method in WEIGHT_METHODS else _lora_adapter(cfg, base, schedule)
    if cfg.train.grad_checkpointing:
        base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    echo(lm.trainable_report()[0])
    return lm


def _lora_adapter(cfg: RunConfig, base: BaseSetup, schedule: RankSchedule | None) -> LoraModel:
    lora_cfg = cfg.lora if schedule is None else replace(
        cfg.lora, r=schedule.first, alpha=stage_alpha(cfg.lora.alpha, schedule.first, schedule.final, cfg.lora.use_rslora))
    if cfg.lora.init == "eora" and not base.eora:  # resumed: the adapter comes from the checkpoint
        lora_cfg = replace(lora_cfg, init="default")
    if cfg.train.init_adapter is not None:  # a frozen copy, then the one that trains (a resumed run's is replaced)
        lm = LoraModel(base.model)
        lm.load_adapter(cfg.train.init_adapter, INIT_ADAPTER, activate=False)
        lm.load_adapter(cfg.train.init_adapter, "default", is_trainable=True)
        return lm
    lm = get_lora_model(base.model, lora_cfg)
    if base.eora:
        drop_start_factors(base.model)  # the corrections are in the adapter now
    return lm


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    autocast: Any
    scaler: Any  # a GradScaler for fp16, else None
    total_steps: int
    batches_per_epoch: int
    step_micro: int  # micro-batches per optimizer step, all ranks together


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def epoch_plan(cfg: RunConfig, prepared: Prepared, seed: int, world: int) -> list[list]:
    """One epoch of the training set's micro-batches (``lorakit.data.packing.batch_plan``): packed rows,
    or unpacked groups run padding-free (one row each, per-document attention)."""
    return batch_plan(prepared.train, cfg.data.max_len, cfg.train.batch_size, cfg.data.packing, seed,
                      cfg.micro_tokens(world), pairs=prepared.pairs, padding_free=True)


def make_optimization(cfg: RunConfig, lm: LoraModel | FullTuning, prepared: Prepared, base: BaseSetup, world: int) -> Optimization:
    """Steps, optimizer, lr schedule and mixed precision, over the adapter's trainable tensors
    as they are now (after a resumed adapter is loaded, after FSDP sharding)."""
    t_cfg = cfg.train
    per_epoch = len(epoch_plan(cfg, prepared, t_cfg.seed, world))
    step_micro = t_cfg.grad_accum * world
    total = t_cfg.max_steps or max(1, math.ceil(t_cfg.epochs * per_epoch / step_micro))
    warmup = int(t_cfg.warmup * total) if t_cfg.warmup < 1 else int(t_cfg.warmup)
    optimizer = build_optimizer(lm, t_cfg.peak_lr, t_cfg.weight_decay, t_cfg.lora_plus_ratio, t_cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t_cfg.schedule, warmup, total))
    autocast, scaler = _autocast(base.device, base.precision)
    return Optimization(optimizer, scheduler, autocast, scaler, total, per_epoch, step_micro)


def restore(plan: RunPlan, lm: LoraModel | FullTuning, world: int) -> tuple[Progress, dict[str, Any]]:
    """A resumed run's progress and trainer state, with its adapter loaded from the checkpoint."""
    progress, state = load_trainer_state(plan.resume_from)
    if int(state.get("world", 1)) != world:
        raise LorakitError(f"{plan.resume_from} was written by a run on {int(state.get('world', 1))} process(es) and "
                           f"this one has {world}: the data order depends on it; resume with the same number of processes")
    if isinstance(lm, FullTuning):
        lm.load_trained(plan.resume_from / lm.output)
    else:
        lm.delete_adapter("default")
        lm.load_adapter(plan.resume_from / "adapter", "default", is_trainable=True)
    return progress, state


def load_states(state: dict[str, Any], opt: Optimization, plateau: PlateauTracker | None) -> None:
    """Optimizer, schedule, scaler, plateau and RNG states of a checkpoint (after ``make_optimization``:
    a new LambdaLR resets the groups' lr to step 0's, so the states are loaded once both exist)."""
    opt.optimizer.load_state_dict(state["optimizer"])
    opt.scheduler.load_state_dict(state["scheduler"])
    if opt.scaler is not None and "scaler" in state:
        opt.scaler.load_state_dict(state["scaler"])
    if plateau is not None and "plateau" in state:
        plateau.load_state_dict(state["plateau"])
    set_rng_state(state["rng"])


def open_run_folder(cfg: RunConfig, plan: RunPlan, base: BaseSetup, config_yaml: str, echo: Echo) -> None:
    """Rank 0 writes the run folder: replaced with --overwrite, the resolved config, and a GPTQ
    run's own 4-bit base (the adapter is right over this base only, and only this run rebuilds it)."""
    out = plan.out
    if cfg.train.overwrite and plan.resume_from is None and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(config_yaml)
    if base.calibrate and cfg.model.quant_rounding == "gptq":
        save_quantized_base(base.model, out / QUANTIZED_BASE)
        echo(f"saved the GPTQ-rounded base with the run: {out / QUANTIZED_BASE} "
             f"({(out / QUANTIZED_BASE).stat().st_size / 2**20:.1f} MiB; inference with --quantize uses it)")
