"""``lorakit train``: the training loop, one function read top to bottom.

Setup (model, data, adapter, optimizer, schedule, resume) happens first and validates
everything before the run folder is touched; then the loop; then the final adapter, the
before/after evaluation and the summary. Logging and plotting live in ``lorakit.runlog``, the
optimizer and the learning-rate schedule in ``lorakit.optim``.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import atomic_dir, disk_size
from .attention import packed_positions, use_packed_attention
from .checkpoint import Progress, find_checkpoint, load_trainer_state, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, dump_yaml
from .data.dataset import prepare_data
from .data.packing import Batch, batch_plan, collate, make_batches
from .errors import LorakitError, require_extra
from .evaluate import eval_loss, exact_match, generate_answers, perplexity
from .loss import causal_lm_loss_sum
from .model import LoraModel, get_lora_model
from .optim import build_optimizer, lr_lambda
from .eora import drop_residuals
from .distributed import DistContext, full_tensor, init_distributed
from .models import (EMBEDDED_MODELS, base_license, cache_root, load_model, physical_cores, quant_spec, resolve_device, resolve_dtype,
                     resolve_precision)
from .quant import prepare_for_kbit_training, quant_summary
from .quantized_base import QUANTIZED_BASE, save_quantized_base
from .rank_schedule import PlateauTracker, grow_adapter_rank, parse_rank_schedule, stage_alpha
from .runlog import NullLog, RunLog, peak_memory_mb

__all__ = ["train", "TrainResult", "lr_lambda", "build_optimizer", "resolve_precision"]


@dataclass
class TrainResult:
    out_dir: Path
    adapter_dir: Path
    steps: int
    tokens: int
    wall_s: float  # the whole command: loading, data, evaluation and training
    train_s: float  # the optimisation loop alone
    tokens_per_s: float  # non-padding tokens per second of the loop
    peak_memory_mb: float
    final_loss: float
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # (question, base answer, adapter answer)


def _rank_schedule(cfg: RunConfig):
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


def _check_fsdp(cfg: RunConfig, ctx: DistContext, resume_from, schedule) -> None:
    if not ctx.enabled:
        raise LorakitError("train.fsdp shards the model over several processes: start with --nproc N or torchrun")
    if cfg.model.quantize != "none":
        raise LorakitError("train.fsdp with a quantized base is not supported; use model.quantize none")
    if schedule is not None:
        raise LorakitError("train.fsdp cannot be combined with train.rank_schedule")
    if resume_from is not None:
        raise LorakitError("resuming an FSDP run is not supported (its optimizer state is sharded); start a new run")


def _prepare_out_dir(out: Path, overwrite: bool, resume: str | None) -> None:
    if resume or not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise LorakitError(f"{out} already holds a run; pass --train.overwrite true to replace it, "
                           f"--train.resume latest to continue it, or choose another --train.out_dir")


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False), None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return torch.autocast(device.type, dtype=dtype), scaler


def _evaluate(lm: LoraModel, tok, prepared, cfg: RunConfig, device, base: bool) -> tuple[dict[str, float], list[str]]:
    """Eval loss/perplexity and (when the data has a scorer) exact match; ``base`` disables the adapter."""
    ctx = lm.disable_adapter() if base else contextlib.nullcontext()
    with ctx:
        loss = eval_loss(lm.model, prepared.val, cfg.data.max_len, cfg.train.batch_size, tok.pad_token_id, device)
        out = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
        answers: list[str] = []
        if prepared.scorer is not None and prepared.val_chats and cfg.train.eval_samples > 0:
            chats = prepared.val_chats[: cfg.train.eval_samples]
            refs = [r for _, r in chats]
            longest = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in refs)
            answers = generate_answers(lm.model, tok, [c for c, _ in chats], prepared.template,
                                       max_new_tokens=longest + 8)
            out["exact_match"] = exact_match(answers, refs, prepared.scorer)
    return out, answers


def _calibrated_quantize(model, cfg: RunConfig, prepared, spec, device, eora: bool) -> str:
    """Quantize the base calibrated on the first training examples: GPTQ rounding, and with
    ``eora`` the corrections an EoRA-initialised adapter starts from."""
    from .gptq import calibrated_quantize

    examples = prepared.train[: cfg.model.quant_calibration]
    rows = make_batches(examples, cfg.data.max_len, 1, True, 0, seed=cfg.train.seed)  # one packed row each: no padding
    rank = max([cfg.lora.r, *cfg.lora.rank_pattern.values()]) if eora else 0
    done = calibrated_quantize(model, spec, rows, device, rounding=cfg.model.quant_rounding, residual_rank=rank)
    what = " and ".join(w for w, on in (("GPTQ rounding", cfg.model.quant_rounding == "gptq"),
                                        (f"EoRA init (rank {rank})", eora)) if on)
    return (f"{what}: {done['layers']} layers calibrated on {len(examples)} training examples "
            f"({done['tokens']} tokens) in {done['seconds']:.0f} s")


def _data_summary(cfg: RunConfig, prepared) -> str:
    n = f"{len(prepared.train)} training / {len(prepared.val)} held-out examples"
    shape = f"template `{prepared.template}`, max_len {cfg.data.max_len}" + (", packed rows" if cfg.data.packing else "")
    if cfg.data.path is None:
        return (f"lorakit's built-in demo task (dates written many ways → `YYYY-MM-DD`, and a fixed identity "
                f"answer), generated by lorakit: {n}; {shape}.")
    files = ", ".join(f"`{Path(p).name}`" for p in cfg.data.path)
    held = f"; held out: {', '.join(f'`{Path(p).name}`' for p in cfg.data.eval_path)}" if cfg.data.eval_path else ""
    return f"{files} (format {cfg.data.format}){held}: {n}; {shape}."


def _describe_adapter(folder: Path, cfg: RunConfig, lm: LoraModel, tok, prepared, before, after, progress,
                      precision: str) -> None:
    """The final adapter folder gets the base's tokenizer and a model card (README.md)."""
    from ._version import __version__
    from .model_card import model_card, write_model_card

    base = lm.configs["default"].base_model_name_or_path or cfg.model.name
    embedded = EMBEDDED_MODELS.get(cfg.model.name)
    tok.save_pretrained(folder)
    write_model_card(folder, model_card(cfg, base, base_license(base), _data_summary(cfg, prepared), before, after,
                                       progress.step, progress.tokens, precision, __version__,
                                       embedded.note() if embedded else None))


def train(cfg: RunConfig, show_progress: bool = True, echo: Callable[[str], None] = print) -> TrainResult:
    t_cfg, out = cfg.train, Path(cfg.train.out_dir)
    t_begin = time.perf_counter()
    ctx = init_distributed(resolve_device(cfg.model.device))  # torchrun's process group, or a single process
    try:
        return _train(cfg, ctx, show_progress and ctx.is_main, echo if ctx.is_main else (lambda s: None), t_begin)
    finally:
        ctx.close()


def _train(cfg: RunConfig, ctx: DistContext, show_progress: bool, echo: Callable[[str], None],
           t_begin: float) -> TrainResult:
    t_cfg, out = cfg.train, Path(cfg.train.out_dir)
    _prepare_out_dir(out, t_cfg.overwrite, t_cfg.resume)
    ctx.barrier()  # every rank has checked the folder before rank 0 writes to it
    resume_from = find_checkpoint(out, t_cfg.resume) if t_cfg.resume else None
    if resume_from is not None and cfg.lora.init.startswith("pissa"):
        # Checkpoints hold PiSSA adapters converted for the original weights (rank 2r), which the
        # optimizer state (rank r, on the residual weights) does not match.
        raise LorakitError("resuming a run with lora.init=pissa is not supported; restart it, or use init=default")
    if t_cfg.tensorboard:
        require_extra("tensorboard", ("tensorboard",), "train.tensorboard")
    torch.set_num_threads(t_cfg.threads or max(1, physical_cores() // ctx.local_world))
    random.seed(t_cfg.seed)
    torch.manual_seed(t_cfg.seed)

    # ---- setup: everything is validated before the run folder is written ----------------
    m_cfg = cfg.model
    target = resolve_device(m_cfg.device)
    precision = resolve_precision(t_cfg.precision, target, m_cfg.quantize)
    # Under bf16 autocast the frozen base is kept in bf16 too: half the memory, no per-step casts.
    dtype = "bfloat16" if m_cfg.dtype == "auto" and precision == "bf16" and m_cfg.quantize == "none" else m_cfg.dtype
    # GPTQ rounding quantizes after the data is read (its rows calibrate it); a missing bitsandbytes is said first.
    # A resumed GPTQ run reloads the base it saved when it started (bit for bit, no recalibration).
    saved_base = out / QUANTIZED_BASE if m_cfg.quant_rounding == "gptq" and resume_from is not None else None
    saved_base = saved_base if saved_base is not None and saved_base.is_file() else None
    eora = cfg.lora.init == "eora" and resume_from is None  # a resumed run reads its adapter from the checkpoint
    calibrate = (m_cfg.quant_rounding == "gptq" and saved_base is None) or eora
    spec = quant_spec(m_cfg.quantize, m_cfg.double_quant, m_cfg.compute_dtype, target) if calibrate else None
    # GPTQ takes the float model to the device one decoder block at a time: it is loaded on the CPU,
    # in the dtype it would have had on the device.
    load_dtype = resolve_dtype(dtype, target) if calibrate else dtype
    model, tok = load_model(m_cfg.name, "cpu" if calibrate else m_cfg.device, load_dtype, m_cfg.trust_remote_code,
                            quantize="none" if calibrate else m_cfg.quantize,
                            double_quant=m_cfg.double_quant, compute_dtype=m_cfg.compute_dtype, quantized_base=saved_base)
    device = target if calibrate else next(model.parameters()).device
    echo(f"precision: {precision}" + (f", base weights {dtype}" if dtype != "auto" else "")
         + (" (auto: this CPU has native bf16 matmuls; --train.precision fp32 for full fp32)"
            if t_cfg.precision == "auto" and precision == "bf16" and device.type == "cpu" else ""))
    prepared = prepare_data(cfg.data, tok, t_cfg.seed, cache_root() / "data")
    if calibrate:
        echo(_calibrated_quantize(model, cfg, prepared, spec, device, eora))
    elif saved_base is not None:
        echo(f"GPTQ-rounded base restored from {saved_base}")
    if m_cfg.quantize != "none":
        prepare_for_kbit_training(model)
        echo(f"base quantized: {quant_summary(model)}")
    echo(f"data: {len(prepared.train)} train / {len(prepared.val)} validation examples, template {prepared.template}"
         + (" (tokenized data from cache)" if prepared.from_cache else "")
         + (f"; {prepared.stats['too_long']} longer than max_len={cfg.data.max_len} ({cfg.data.truncation})"
            if prepared.stats.get("too_long") else "")
         + (f"; dropped {prepared.stats['dropped_no_labels']} with no trainable token" if prepared.stats.get("dropped_no_labels") else ""))
    schedule = _rank_schedule(cfg)
    lora_cfg = cfg.lora if schedule is None else replace(
        cfg.lora, r=schedule.first, alpha=stage_alpha(cfg.lora.alpha, schedule.first, schedule.final, cfg.lora.use_rslora))
    if cfg.lora.init == "eora" and not eora:  # resumed: the adapter comes from the checkpoint
        lora_cfg = replace(lora_cfg, init="default")
    lm = get_lora_model(model, lora_cfg)
    if eora:
        drop_residuals(model)  # the corrections are in the adapter now
    plateau = PlateauTracker(t_cfg.rank_patience) if schedule is not None and schedule.steps is None else None
    if t_cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    echo(lm.trainable_report()[0])
    config_yaml = dump_yaml(cfg)
    ctx.check_same(config_yaml, "configs")
    ctx.broadcast_params([p for p in lm.parameters() if p.requires_grad])
    if t_cfg.fsdp:
        _check_fsdp(cfg, ctx, resume_from, schedule)
        echo(f"FSDP2: {ctx.shard_model(model)} decoder blocks sharded over {ctx.world} processes")
    if ctx.enabled:
        echo(f"distributed: {ctx.world} processes, global batch {ctx.world} × {t_cfg.grad_accum} × {t_cfg.batch_size} rows")

    batches_per_epoch = len(batch_plan(prepared.train, cfg.data.max_len, t_cfg.batch_size, cfg.data.packing, t_cfg.seed))
    step_micro = t_cfg.grad_accum * ctx.world  # micro-batches per optimizer step, all ranks together
    total_steps = t_cfg.max_steps or max(1, math.ceil(t_cfg.epochs * batches_per_epoch / step_micro))
    warmup = int(t_cfg.warmup * total_steps) if t_cfg.warmup < 1 else int(t_cfg.warmup)
    optimizer = build_optimizer(lm, t_cfg.lr, t_cfg.weight_decay, t_cfg.lora_plus_ratio, t_cfg.optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t_cfg.schedule, warmup, total_steps))
    autocast, scaler = _autocast(device, precision)
    progress = Progress(step=0, micro_batches=0, tokens=0, elapsed=0.0)
    if resume_from is not None:
        progress, state = load_trainer_state(resume_from)
        if int(state.get("world", 1)) != ctx.world:
            raise LorakitError(f"{resume_from} was written by a run on {int(state.get('world', 1))} process(es) and this one "
                               f"has {ctx.world}: the data order depends on it; resume with the same number of processes")
        lm.delete_adapter("default")
        lm.load_adapter(resume_from / "adapter", "default", is_trainable=True)
        optimizer = build_optimizer(lm, t_cfg.lr, t_cfg.weight_decay, t_cfg.lora_plus_ratio, t_cfg.optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t_cfg.schedule, warmup, total_steps))
        # Optimizer state after the scheduler exists: a new LambdaLR resets the groups' lr to step 0's.
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if plateau is not None and "plateau" in state:
            plateau.load_state_dict(state["plateau"])
        set_rng_state(state["rng"])
        echo(f"resuming from {resume_from} at step {progress.step}")
    if ctx.is_main:
        if t_cfg.overwrite and resume_from is None and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)
        if calibrate and m_cfg.quant_rounding == "gptq":  # the adapter is right over this base only, and only this run rebuilds it
            save_quantized_base(model, out / QUANTIZED_BASE)
            echo(f"saved the GPTQ-rounded base with the run: {out / QUANTIZED_BASE} "
                 f"({(out / QUANTIZED_BASE).stat().st_size / 2**20:.1f} MiB; inference with --quantize uses it)")
        log = RunLog(out, total_steps, progress.step, show_progress, t_cfg.plot, t_cfg.tensorboard,
                     resumed=resume_from is not None)
    else:
        log = NullLog()

    before, base_answers = (dict(log.base_metrics), [])  # a resumed run reads the base scores from metrics.jsonl
    if resume_from is None and (ctx.is_main or ctx.fsdp):
        before, base_answers = _evaluate(lm, tok, prepared, cfg, device, base=True)
        log.eval(0, before, label="base")
        if eora and prepared.val:
            corrected = eval_loss(lm.model, prepared.val, cfg.data.max_len, t_cfg.batch_size, tok.pad_token_id, device)
            echo(f"EoRA init: eval loss {corrected:.4f} with the adapter as it starts (the 4-bit base alone: "
                 f"{before['eval_loss']:.4f})")
    ctx.barrier()

    # adapter + AdamW's two moments (8-bit states are smaller: this errs on the safe side)
    checkpoint_bytes = 3 * sum(p.numel() * p.element_size() for p in lm.parameters() if p.requires_grad)

    def write_checkpoint() -> Path:
        # A sharded optimizer state lives on every rank; FSDP runs keep the adapter only (no resume).
        state = {"optimizer": {} if ctx.fsdp else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rng_state(), "world": ctx.world, "fsdp": ctx.fsdp}
        states = lm.adapter_states() if ctx.fsdp else None  # gathered on every rank
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        if plateau is not None:
            state["plateau"] = plateau.state_dict()
        path = None
        if ctx.is_main:  # every rank holds the same adapter and optimizer state
            path = save_checkpoint(out, progress, lambda d: lm.save_pretrained(d, states=states), state, config_yaml,
                                   t_cfg.keep_last, need_bytes=checkpoint_bytes)
        ctx.barrier()
        return path

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the current step, checkpoint, exit cleanly

    old_handlers = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old_handlers[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass

    # ---- the loop ------------------------------------------------------------------------
    def micro_batches():
        """Every micro-batch of the run in order; resumes skip those already consumed."""
        epoch, i = divmod(progress.micro_batches, batches_per_epoch)
        while True:
            plan = batch_plan(prepared.train, cfg.data.max_len, t_cfg.batch_size, cfg.data.packing, t_cfg.seed + epoch)
            for item in plan[i:]:
                yield collate(item, prepared.train, cfg.data.packing, tok.pad_token_id)
            epoch, i = epoch + 1, 0

    def grow(r: int, why: str) -> None:
        r0 = lm.configs["default"].r
        layers = grow_adapter_rank(lm, "default", r, schedule.final, cfg.lora.alpha, optimizer)
        lm.train()
        log.event(progress.step, f"rank {r0} -> {r} in {layers} layers ({why})", rank=r)

    stream = micro_batches()
    log.start_progress()
    lm.train()
    t_start = time.perf_counter() - progress.elapsed
    tokens_at_start, t_loop = progress.tokens, time.perf_counter()
    last_good = None
    loss_value = float("nan")
    try:
        while progress.step < total_steps and stop["signal"] is None:
            group: list[Batch] = [next(stream) for _ in range(step_micro)]
            n_labels = max(1, sum(b.n_labels for b in group))  # one mean over the whole optimizer step, all ranks
            step_loss = 0.0
            mine = ctx.shard(group)
            with use_packed_attention(model) if cfg.data.packing else contextlib.nullcontext():
                for i, batch in enumerate(mine):
                    ctx.gradient_sync(i == len(mine) - 1)  # FSDP: reduce-scatter once, on the last micro-batch
                    batch = batch.to(device)
                    with packed_positions(batch.position_ids):  # backward too: checkpointing recomputes attention
                        with autocast:
                            loss_sum, _ = causal_lm_loss_sum(model, batch.input_ids, batch.labels, batch.position_ids,
                                                             batch.attention_mask)
                        loss = loss_sum / n_labels
                        scaled = loss * ctx.loss_scale
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    step_loss += loss.item()
            progress.micro_batches += len(group)
            progress.tokens += sum(b.n_tokens for b in group)
            params = [p for g in optimizer.param_groups for p in g["params"]]
            ctx.reduce_grads(params)  # once per optimizer step: accumulation needs no extra all-reduce
            step_loss, stopping = ctx.sum_values(step_loss, 1.0 if stop["signal"] is not None else 0.0)
            if stopping and stop["signal"] is None:
                stop["signal"] = "another rank"  # every rank leaves the loop at the same step
            if not math.isfinite(step_loss):
                where = f"; the last good checkpoint is {last_good}" if last_good else ""
                raise LorakitError(f"the training loss became {step_loss} at step {progress.step + 1}{where}. "
                                   "Lower train.lr, keep train.clip on, or check the data")
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, t_cfg.clip if t_cfg.clip > 0 else float("inf")))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            progress.step += 1
            progress.elapsed = time.perf_counter() - t_start
            loss_value = step_loss
            tps = (progress.tokens - tokens_at_start) / max(1e-9, time.perf_counter() - t_loop)
            log.step(progress.step, loss_value, scheduler.get_last_lr()[0], float(grad_norm), progress.tokens, tps,
                     write=progress.step % t_cfg.log_every == 0 or progress.step == total_steps)
            if schedule is not None and schedule.steps is not None and schedule.rank_at(progress.step) > lm.configs["default"].r:
                grow(schedule.rank_at(progress.step), "scheduled")
            if t_cfg.eval_every and progress.step % t_cfg.eval_every == 0 and progress.step < total_steps:
                nxt = schedule.next_rank(lm.configs["default"].r) if plateau is not None else None
                stalled = 0.0
                if ctx.is_main or ctx.fsdp:  # a sharded model's forward needs every rank
                    scores = _evaluate(lm, tok, prepared, cfg, device, base=False)[0]
                    log.eval(progress.step, scores)
                    stalled = float(nxt is not None and plateau.update(scores["eval_loss"]))
                if ctx.sum_values(stalled)[0]:  # rank 0's decision, on every rank
                    grow(nxt, f"eval loss stalled for {t_cfg.rank_patience} evaluations")
            if t_cfg.save_every and progress.step % t_cfg.save_every == 0 and progress.step < total_steps:
                last_good = write_checkpoint()
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    # ---- the end: checkpoint, adapter, evaluation, summary --------------------------------
    tps = (progress.tokens - tokens_at_start) / max(1e-9, time.perf_counter() - t_loop)
    train_s = time.perf_counter() - t_loop
    interrupted = stop["signal"] is not None
    last_good = write_checkpoint()
    adapter_dir = out / "adapter"
    if not ctx.is_main:  # rank 0 writes the adapter and evaluates
        if ctx.fsdp and not interrupted:
            _evaluate(lm, tok, prepared, cfg, device, base=False)  # the sharded forward needs this rank
        return TrainResult(out, adapter_dir, progress.step, progress.tokens, time.perf_counter() - t_begin, train_s, tps,
                           peak_memory_mb(device), loss_value, interrupted=interrupted)
    if interrupted:
        log.close()
        echo(f"interrupted at step {progress.step}/{total_steps}; checkpoint {last_good}. "
             f"Continue with: lorakit train --config {out / 'config.yaml'} --train.resume latest")
        return TrainResult(out, last_good / "adapter", progress.step, progress.tokens, time.perf_counter() - t_begin,
                           train_s, tps, peak_memory_mb(device), loss_value, before, {}, True)
    with atomic_dir(adapter_dir, need_bytes=disk_size(last_good / "adapter")) as tmp:
        shutil.copytree(last_good / "adapter", tmp, dirs_exist_ok=True)
    log.close()  # the bar's time is the loop's, not the evaluation's
    after, answers = _evaluate(lm, tok, prepared, cfg, device, base=False)
    log.eval(progress.step, after)
    _describe_adapter(adapter_dir, cfg, lm, tok, prepared, before, after, progress, precision)
    samples = []
    if prepared.val_chats and answers:
        for (chat, ref), base_a, new_a in list(zip(prepared.val_chats, base_answers or [""] * len(answers), answers))[:4]:
            samples.append((chat[-1]["content"], base_a.strip(), new_a.strip()))
    return TrainResult(out, adapter_dir, progress.step, progress.tokens, time.perf_counter() - t_begin, train_s, tps,
                       peak_memory_mb(device), loss_value, before, after, False, samples)

