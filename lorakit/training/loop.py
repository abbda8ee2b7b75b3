"""``lorakit train``: set up (``lorakit.training.setup``: everything is resolved and validated
before the run folder is written), run the loop, then finish — the final checkpoint and adapter,
the before/after evaluation and the summary.

The loop reads top to bottom: take the optimizer step's micro-batches, forward and backward each
(one mean over the step's label tokens, all ranks together), reduce, clip, step, log; then the
events between steps (a rank growth, an evaluation, a checkpoint). Logging and plotting live in
``runlog``, the optimizer and lr schedule in ``optim``, checkpoints in ``checkpoint``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..atomic import atomic_dir, disk_size
from ..base import cache_root, resolve_device
from ..config import RunConfig, dump_yaml, resolve_batch_tokens
from ..core.full_tuning import FullTuning
from ..core.lora_model import LoraModel
from ..core.sharded import full_tensor
from ..data.dataset import Prepared, prepare_data
from ..data.packing import Batch, collate, stream_plan
from ..errors import LorakitError
from ..ops.attention import packed_positions, use_packed_attention
from ..ops.gated_mlp import gated_mlps, lean_gated_mlps
from ..ops.recompute import activation_checkpointing
from ..ops.rms_norm import lean_rms_norms, llama_norms
from .checkpoint import Progress, rng_state, save_checkpoint
from .distributed import DistContext, init_distributed
from .evaluate import eval_loss, evaluate_adapter
from .objective import Objective, make_objective
from .model_card import data_summary, describe_adapter, describe_model
from .rank_schedule import PlateauTracker, grow_adapter_rank
from .runlog import NullLog, RunLog, peak_memory_mb
from .trackers import open_trackers
from .mfu import head_flops_per_label, matmul_peak_flops, mfu, train_flops_per_token
from .setup import (BaseSetup, Optimization, RunPlan, calibrate_base, check_run, data_line, epoch_plan, load_base,
                    load_states, make_adapter, make_optimization, open_run_folder, output_name, restore, with_init_adapter)

__all__ = ["train", "TrainResult"]


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
    mfu: float = 0.0  # model FLOPs utilisation of the loop (lorakit.training.mfu)
    peak_flops: float = 0.0  # the matmul peak it is measured against (FLOP/s, this run's precision)
    before_label: str = "base"  # what ``before`` scored: base, or start (train.init_adapter as it started)
    loop_labels: int = 0  # label positions the loop trained on (this process, since it started or resumed)


def _matmul_peak(base: BaseSetup) -> float:
    """The matmul FLOP/s of the precision the run computes in (bf16 when autocast is bf16)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(base.precision, torch.float32)
    return matmul_peak_flops(dtype, base.device)


@dataclass
class Run:
    """A run once set up: what the loop and the end read and update."""

    cfg: RunConfig
    ctx: DistContext
    plan: RunPlan
    base: BaseSetup
    prepared: Prepared
    lm: LoraModel | FullTuning
    opt: Optimization
    objective: Objective
    progress: Progress
    plateau: PlateauTracker | None
    log: Any  # RunLog on rank 0, NullLog elsewhere
    config_yaml: str
    echo: Callable[[str], None]
    before: dict[str, float] = field(default_factory=dict)
    base_answers: list[str] = field(default_factory=list)
    stop: Any = None  # the signal that asked the run to stop (or "another rank")
    last_good: Path | None = None
    loss: float = float("nan")
    t_loop: float = 0.0
    tokens_at_start: int = 0
    labels_in_loop: int = 0  # label positions this process's loop has trained on (the head runs there only)
    flops_per_token: float = 0.0
    flops_per_label: float = 0.0
    peak_flops: float = 0.0
    # the modules a step's lean contexts patch, found once: (gated MLPs, Llama norms, checkpointing on)
    lean: tuple[list, list, bool] | None = None

    def step_contexts(self) -> contextlib.ExitStack:
        """What a training step runs in: per-document attention for packed rows, the lean SwiGLU MLPs
        and RMSNorms (``lorakit.ops``)."""
        model = self.base.model
        if self.lean is None:
            self.lean = (gated_mlps(model), llama_norms(model), activation_checkpointing(model))
        mlps, norms, checkpointing = self.lean
        stack = contextlib.ExitStack()
        stack.enter_context(use_packed_attention(model))  # unpacked groups run padding-free too (_micro_batches)
        stack.enter_context(lean_gated_mlps(model, mlps, checkpointing))
        stack.enter_context(lean_rms_norms(model, norms, checkpointing))
        return stack

    def evaluate(self, base: bool = False) -> tuple[dict[str, float], list[str]]:
        t = self.cfg.train
        # A full/freeze model mixes fp32 trained and half-precision frozen weights: it runs under autocast.
        with self.opt.autocast if isinstance(self.lm, FullTuning) else contextlib.nullcontext():
            return evaluate_adapter(self.lm, self.base.tokenizer, self.prepared, self.cfg.data.max_len, t.batch_size,
                                    t.eval_samples, self.base.device, base, self.objective)

    @property
    def label(self) -> str:
        """What the trained model is called in metrics.jsonl and the log: adapter | tuned."""
        return "tuned" if isinstance(self.lm, FullTuning) else "adapter"

    def tokens_per_s(self) -> float:
        return (self.progress.tokens - self.tokens_at_start) / max(1e-9, time.perf_counter() - self.t_loop)


def train(cfg: RunConfig, show_progress: bool = True, echo: Callable[[str], None] = print) -> TrainResult:
    t_begin = time.perf_counter()
    cfg, line = resolve_batch_tokens(with_init_adapter(cfg))  # (lorakit train has resolved them already, and said so)
    if line:
        echo(line)
    ctx = init_distributed(resolve_device(cfg.model.device))  # torchrun's process group, or a single process
    try:
        run = _setup(cfg, ctx, show_progress and ctx.is_main, echo if ctx.is_main else (lambda s: None))
        try:
            with _stop_on_signals(run):
                _loop(run)
        except BaseException:
            run.log.finish(status="failed")  # the progress bar ends its line before the error is printed
            raise
        return _finish(run, t_begin)
    finally:
        ctx.close()


def _setup(cfg: RunConfig, ctx: DistContext, show_progress: bool, echo: Callable[[str], None]) -> Run:
    plan = check_run(cfg, ctx)
    base = load_base(cfg, plan, echo)
    objective = make_objective(cfg.train)
    prepared = prepare_data(cfg.data, base.tokenizer, cfg.train.seed, cache_root() / "data", pairs=objective.pairs)
    if plan.schedule is not None and plan.schedule.steps is None and not prepared.val:
        raise LorakitError("train.rank_schedule plateau grows the rank when the eval loss stalls, but this run has "
                           "no held-out examples: set data.val_size above 0 or data.eval_path")
    calibrate_base(cfg, base, prepared, echo)
    echo(data_line(cfg, prepared))
    lm = make_adapter(cfg, base, plan.schedule, echo)
    config_yaml = dump_yaml(cfg)
    ctx.check_same(config_yaml, "configs")
    ctx.broadcast_params([p for p in lm.parameters() if p.requires_grad])
    if cfg.train.fsdp:
        echo(f"FSDP2: {ctx.shard_model(base.model)} decoder blocks sharded over {ctx.world} processes")
    if ctx.enabled:
        echo(f"distributed: {ctx.world} processes, global batch {ctx.world} × {cfg.train.grad_accum} × "
             f"{cfg.train.batch_size} rows")
    schedule = plan.schedule
    # measured before the model runs, while nothing else holds the cores, and again after the loop
    peak = _matmul_peak(base)
    plateau = PlateauTracker(cfg.train.rank_patience) if schedule is not None and schedule.steps is None else None
    progress, state = restore(plan, lm, ctx.world) if plan.resume_from else (Progress(0, 0, 0, 0.0), None)
    opt = make_optimization(cfg, lm, prepared, base, ctx.world)  # over the adapter as it is now
    if state is not None:
        load_states(state, opt, plateau)
        echo(f"resuming from {plan.resume_from} at step {progress.step}")
    log: Any = NullLog()
    if ctx.is_main:
        open_run_folder(cfg, plan, base, config_yaml, echo)
        trackers = open_trackers(cfg.train.report_to, plan.out, cfg.to_dict(), config_yaml, cfg.train.tracker_project,
                                 progress.step)
        log = RunLog(plan.out, opt.total_steps, progress.step, show_progress, cfg.train.plot,
                     resumed=plan.resume_from is not None, trackers=trackers)
    run = Run(cfg, ctx, plan, base, prepared, lm, opt, objective, progress, plateau, log, config_yaml, echo,
              before=dict(log.base_metrics),  # a resumed run reads the base scores from metrics.jsonl
              flops_per_token=train_flops_per_token(base.model), flops_per_label=head_flops_per_label(base.model),
              peak_flops=peak)
    if plan.resume_from is None and (ctx.is_main or ctx.fsdp):
        _evaluate_base(run)
    ctx.barrier()
    return run


def _evaluate_base(run: Run) -> None:
    """The scores of the model the run starts from (the base, or train.init_adapter's adapter), the
    "before" of the final table."""
    run.before, run.base_answers = run.evaluate(base=True)
    run.log.eval(0, run.before, label=run.cfg.train.before_label)
    if run.base.eora and run.prepared.val:
        corrected = eval_loss(run.lm.model, run.prepared.val, run.cfg.data.max_len, run.cfg.train.batch_size,
                              run.base.tokenizer.pad_token_id, run.base.device)
        run.echo(f"EoRA init: eval loss {corrected:.4f} with the adapter as it starts (the 4-bit base alone: "
                 f"{run.before['eval_loss']:.4f})")


@contextlib.contextmanager
def _stop_on_signals(run: Run) -> Iterator[None]:
    """Ctrl-C / SIGTERM: finish the current step, checkpoint, exit cleanly."""
    def on_signal(signum, _frame):
        run.stop = signum

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, on_signal)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _streamed_batches(run: Run) -> Iterator[Batch]:
    """data.streaming: micro-batches a buffer at a time, the stream read again when it runs out; a
    resumed run reads past those already consumed (the same order: it depends only on the seed)."""
    cfg, t_cfg, pad = run.cfg, run.cfg.train, run.base.tokenizer.pad_token_id
    skip = run.progress.micro_batches
    for epoch in itertools.count():
        n = 0
        for item, chunk in stream_plan(run.prepared.stream(), cfg.data.max_len, t_cfg.batch_size, cfg.data.packing,
                                       t_cfg.seed + epoch, cfg.data.stream_buffer,
                                       cfg.micro_tokens(run.ctx.world), run.prepared.pairs, padding_free=True):
            n += 1
            if skip:
                skip -= 1
                continue
            yield collate(item, chunk, cfg.data.packing, pad, cfg.data.max_len, padding_free=True)
        if n == 0:
            raise LorakitError("the data stream has no example with a token to train on (after templating and "
                               "truncation); check data.format / data.columns and data.max_len")


def _micro_batches(run: Run) -> Iterator[Batch]:
    """Every micro-batch of the run in order; a resumed run skips those already consumed."""
    if run.prepared.stream is not None:
        yield from _streamed_batches(run)
        return
    cfg, t_cfg, per_epoch = run.cfg, run.cfg.train, run.opt.batches_per_epoch
    epoch, i = divmod(run.progress.micro_batches, per_epoch)
    while True:
        for item in epoch_plan(cfg, run.prepared, t_cfg.seed + epoch, run.ctx.world)[i:]:
            yield collate(item, run.prepared.train, cfg.data.packing, run.base.tokenizer.pad_token_id, cfg.data.max_len,
                          padding_free=True)
        epoch, i = epoch + 1, 0


def _loop(run: Run) -> None:
    progress, opt, t_cfg = run.progress, run.opt, run.cfg.train
    stream = _micro_batches(run)
    run.log.start_progress()
    run.lm.train()
    t_start = time.perf_counter() - progress.elapsed
    run.tokens_at_start, run.t_loop = progress.tokens, time.perf_counter()
    while progress.step < opt.total_steps and run.stop is None:
        group = [next(stream) for _ in range(opt.step_micro)]
        loss, grad_norm, stats = _optimizer_step(run, group)
        progress.step += 1
        progress.elapsed = time.perf_counter() - t_start
        run.loss = loss
        run.log.step(progress.step, loss, opt.scheduler.get_last_lr()[0], grad_norm, progress.tokens,
                     run.tokens_per_s(), write=progress.step % t_cfg.log_every == 0 or progress.step == opt.total_steps,
                     extra=stats)
        _between_steps(run)


def _optimizer_step(run: Run, group: list[Batch]) -> tuple[float, float, dict[str, float]]:
    """One optimizer step over ``group`` (this step's micro-batches of every rank): the step's mean
    loss, the gradient norm before clipping, and the objective's logged means (preference rewards)."""
    ctx, opt, progress = run.ctx, run.opt, run.progress
    totals = run.objective.totals(group)  # one mean over the whole optimizer step, all ranks
    step_loss, sums = 0.0, {}
    mine = ctx.shard(group)
    with run.step_contexts():
        for i, batch in enumerate(mine):
            ctx.gradient_sync(i == len(mine) - 1)  # FSDP: reduce-scatter once, on the last micro-batch
            batch = batch.to(run.base.device)
            with packed_positions(batch.position_ids):  # backward too: checkpointing recomputes attention
                with opt.autocast:
                    loss, stats = run.objective.loss(run.lm, batch, totals)
                scaled = loss * ctx.loss_scale
                (opt.scaler.scale(scaled) if opt.scaler is not None else scaled).backward()
            step_loss += loss.item()
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
    progress.micro_batches += len(group)
    progress.tokens += sum(b.n_tokens for b in group)
    run.labels_in_loop += sum(b.n_labels for b in group)
    params = [p for g in opt.optimizer.param_groups for p in g["params"]]
    ctx.reduce_grads(params)  # once per optimizer step: accumulation needs no extra all-reduce
    step_loss, stopping, *values = ctx.sum_values(step_loss, 1.0 if run.stop is not None else 0.0, *sums.values())
    stats = {k: v / totals.pairs * (100.0 if k == "reward_acc" else 1.0) for k, v in zip(sums, values)}
    if stopping and run.stop is None:
        run.stop = "another rank"  # every rank leaves the loop at the same step
    if not math.isfinite(step_loss):
        where = f"; the last good checkpoint is {run.last_good}" if run.last_good else ""
        raise LorakitError(f"the training loss became {step_loss} at step {progress.step + 1}{where}. "
                           "Lower train.lr, keep train.clip on, or check the data")
    if opt.scaler is not None:
        opt.scaler.unscale_(opt.optimizer)
    clip = run.cfg.train.clip
    grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
    if opt.scaler is not None:
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
    else:
        opt.optimizer.step()
    opt.optimizer.zero_grad(set_to_none=True)
    opt.scheduler.step()
    return step_loss, float(grad_norm), stats


def _between_steps(run: Run) -> None:
    """What happens after a step: a scheduled rank growth, an evaluation (which may grow a stalled
    rank), a checkpoint."""
    step, t_cfg, schedule, total = run.progress.step, run.cfg.train, run.plan.schedule, run.opt.total_steps
    if schedule is not None and schedule.steps is not None and schedule.rank_at(step) > run.lm.configs["default"].r:
        _grow(run, schedule.rank_at(step), "scheduled")
    if t_cfg.eval_every and step % t_cfg.eval_every == 0 and step < total:
        nxt = schedule.next_rank(run.lm.configs["default"].r) if run.plateau is not None else None
        stalled = 0.0
        if run.ctx.is_main or run.ctx.fsdp:  # a sharded model's forward needs every rank
            scores = run.evaluate()[0]
            run.log.eval(step, scores, label=run.label)
            stalled = float(nxt is not None and run.plateau.update(scores["eval_loss"]))
        if run.ctx.sum_values(stalled)[0]:  # rank 0's decision, on every rank
            _grow(run, nxt, f"eval loss stalled for {t_cfg.rank_patience} evaluations")
    if t_cfg.save_every and step % t_cfg.save_every == 0 and step < total:
        run.last_good = _write_checkpoint(run)


def _grow(run: Run, r: int, why: str) -> None:
    r0 = run.lm.configs["default"].r
    layers = grow_adapter_rank(run.lm, "default", r, run.plan.schedule.final, run.cfg.lora.alpha, run.opt.optimizer)
    run.lm.train()
    run.log.event(run.progress.step, f"rank {r0} -> {r} in {layers} layers ({why})", rank=r)


def _write_checkpoint(run: Run) -> Path | None:
    ctx, opt = run.ctx, run.opt
    # A sharded optimizer state lives on every rank; FSDP runs keep the adapter only (no resume).
    state = {"optimizer": {} if ctx.fsdp else opt.optimizer.state_dict(), "scheduler": opt.scheduler.state_dict(),
             "rng": rng_state(), "world": ctx.world, "fsdp": ctx.fsdp}
    states = run.lm.adapter_states() if ctx.fsdp else None  # gathered on every rank
    if opt.scaler is not None:
        state["scaler"] = opt.scaler.state_dict()
    if run.plateau is not None:
        state["plateau"] = run.plateau.state_dict()
    # adapter + AdamW's two moments (8-bit states are smaller: this errs on the safe side)
    need = 3 * sum(p.numel() * p.element_size() for p in run.lm.parameters() if p.requires_grad)
    path = None
    if ctx.is_main:  # every rank holds the same adapter and optimizer state
        path = save_checkpoint(run.plan.out, run.progress, lambda d: _save_trained(run.lm, d, states), state,
                               run.config_yaml, run.cfg.train.keep_last, need_bytes=need, part=output_name(run.lm))
    ctx.barrier()
    return path


def _save_trained(lm: LoraModel | FullTuning, folder: Path, states: dict | None) -> None:
    """What trains, into a checkpoint: the adapter 'default' (not train.init_adapter's frozen copy)."""
    if isinstance(lm, FullTuning):
        lm.save_pretrained(folder, states=states)
    else:
        lm.save_pretrained(folder, adapters=["default"], states=states)


def _write_output(run: Run, folder: Path) -> None:
    """The finished run's adapter (the last checkpoint's), or a full/freeze run's whole model."""
    if isinstance(run.lm, FullTuning):
        need = sum(4 * t.numel() for t in run.base.model.state_dict().values())
        with atomic_dir(folder, need_bytes=need) as tmp:
            run.lm.save_model(tmp)
        return
    with atomic_dir(folder, need_bytes=disk_size(run.last_good / folder.name)) as tmp:
        shutil.copytree(run.last_good / folder.name, tmp, dirs_exist_ok=True)


def _finish(run: Run, t_begin: float) -> TrainResult:
    """The final checkpoint; on rank 0 the adapter folder, the final evaluation and its card."""
    tps, train_s = run.tokens_per_s(), time.perf_counter() - run.t_loop
    # the better of two measurements (a shared machine's speed drifts): MFU is not flattered by a slow start
    run.peak_flops = max(run.peak_flops, _matmul_peak(run.base))
    interrupted = run.stop is not None
    run.last_good = _write_checkpoint(run)
    out, progress, device = run.plan.out, run.progress, run.base.device
    part = output_name(run.lm)
    adapter_dir = out / part

    def result(**kw) -> TrainResult:
        return TrainResult(out, kw.pop("adapter", adapter_dir), progress.step, progress.tokens,
                           time.perf_counter() - t_begin, train_s, tps, peak_memory_mb(device), run.loss, **kw,
                           mfu=mfu(tps, run.flops_per_token, run.peak_flops, run.labels_in_loop / max(train_s, 1e-9),
                                   run.flops_per_label), peak_flops=run.peak_flops,
                           before_label=run.cfg.train.before_label, loop_labels=run.labels_in_loop)

    if not run.ctx.is_main:  # rank 0 writes the adapter and evaluates
        if run.ctx.fsdp and not interrupted:
            run.evaluate()  # the sharded forward needs this rank
        return result(interrupted=interrupted)
    if interrupted:
        run.log.finish(status="interrupted")
        run.echo(f"interrupted at step {progress.step}/{run.opt.total_steps}; checkpoint {run.last_good}. "
                 f"Continue with: lorakit train --config {out / 'config.yaml'} --train.resume latest")
        return result(adapter=run.last_good / part, before=run.before, interrupted=True)
    _write_output(run, adapter_dir)
    run.log.close()  # the bar's time is the loop's, not the evaluation's
    after, answers = run.evaluate()
    run.log.eval(progress.step, after, label=run.label, final=True)
    p = run.prepared
    described = dict(cfg=run.cfg, tokenizer=run.base.tokenizer, before=run.before, after=after, steps=progress.step,
                     data=data_summary(run.cfg, None if p.stream else len(p.train), len(p.val), p.template), tokens=progress.tokens,
                     precision=run.base.precision)
    if isinstance(run.lm, FullTuning):
        describe_model(adapter_dir, base=run.cfg.model.name, trained=run.lm.trainable_report()[0], **described)
    else:
        describe_adapter(adapter_dir, base=run.lm.configs["default"].base_model_name_or_path or run.cfg.model.name,
                         **described)
    samples = []
    if p.val_chats and answers:
        base_answers = run.base_answers or [""] * len(answers)
        for (chat, _), base_a, new_a in list(zip(p.val_chats, base_answers, answers))[:4]:
            samples.append((chat[-1]["content"], base_a.strip(), new_a.strip()))
    run.log.finish({run.cfg.train.before_label: run.before, run.label: after})
    return result(before=run.before, after=after, samples=samples)
