"""What a training run shows and writes: the progress bar, metrics.jsonl, loss.png, and the
trackers of ``train.report_to`` (``trackers``). Kept outside the loop so the loop stays readable."""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file
from ..config import BEFORE_LABELS
from .trackers import Tracker, numeric

__all__ = ["RunLog", "peak_memory_mb", "plot_losses", "PLOT_INTERVAL_S"]

# loss.png is redrawn at most this often while training, and when the loop ends or evaluates: one
# draw takes 0.10-0.24 s of the loop's time (a tiny model's 100 steps trained in 5 s with a draw
# every 5 steps, in 1 s without; the README demo drew 12 times in its 72 s of training).
PLOT_INTERVAL_S = 30.0


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class RunLog:
    def __init__(self, out: Path, total_steps: int, start_step: int, show_progress: bool, plot: bool,
                 resumed: bool, trackers: list[Tracker] | None = None) -> None:
        self.out, self.plot = out, plot
        self._plotted, self._plot_due = -float("inf"), False  # when loss.png was last drawn; points since
        self.metrics_path = out / "metrics.jsonl"
        self.train_points: list[tuple[int, float]] = []
        self.eval_points: list[tuple[int, float]] = []
        self.base_metrics: dict[str, float] = {}
        self._losses: list[float] = []  # train losses since the last written line
        self._extras: list[dict[str, float]] = []  # and the objective's numbers
        if resumed and self.metrics_path.exists():
            kept = []  # drop lines past the checkpoint we resume from: they will be logged again
            for line in self.metrics_path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("step", 0) <= start_step:
                    kept.append(line)
                    self._remember(rec)
            self.metrics_path.write_text("".join(k + "\n" for k in kept))
        elif self.metrics_path.exists():
            self.metrics_path.unlink()
        self.bar = None
        self._bar_args = (total_steps, start_step) if show_progress else None
        self.trackers = list(trackers or [])

    def start_progress(self) -> None:
        """Open the progress bar (after the first evaluation, so its rate and ETA are the loop's)."""
        if self._bar_args is not None and self.bar is None:
            from tqdm.auto import tqdm

            total, start = self._bar_args
            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def _remember(self, rec: dict[str, Any]) -> None:
        if "loss" in rec:
            self.train_points.append((rec["step"], rec["loss"]))
        if "eval_loss" in rec:
            self.eval_points.append((rec["step"], rec["eval_loss"]))
        if rec.get("model") in BEFORE_LABELS:
            self.base_metrics = {k: v for k, v in rec.items() if k not in ("step", "model")}

    def _write(self, rec: dict[str, Any]) -> None:
        self._remember(rec)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        values = numeric(rec)
        for tracker in list(self.trackers):
            self._call(tracker, "log", rec["step"], values)

    def _call(self, tracker: Tracker, method: str, *args: Any) -> None:
        """A tracker that fails (a lost connection, a full disk) is dropped with a warning; the run goes on."""
        try:
            getattr(tracker, method)(*args)
        except Exception as err:  # noqa: BLE001 - any tracker error: the run's own files are what counts
            warnings.warn(f"{type(tracker).__name__.strip('_')} stopped logging: {type(err).__name__}: {err}")
            if tracker in self.trackers:
                self.trackers.remove(tracker)

    def step(self, step: int, loss: float, lr: float, grad_norm: float, tokens: int, tokens_per_s: float, write: bool,
             extra: dict[str, float] | None = None) -> None:
        """One optimizer step; ``extra``: the objective's numbers (preference rewards), averaged like the loss."""
        if self.bar is not None:  # the postfix first: update() draws the bar with this step's numbers
            shown = {"acc": f"{extra['reward_acc']:.0f}%"} if extra and "reward_acc" in extra else {}
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", **shown, refresh=False)
            self.bar.update(step - self.bar.n)
        self._losses.append(loss)
        self._extras.append(extra or {})
        if write:
            mean = sum(self._losses) / len(self._losses)  # the interval's mean: smoother than one step's loss
            means = {k: round(sum(e[k] for e in self._extras) / len(self._extras), 6) for k in self._extras[-1]}
            self._losses, self._extras = [], []
            self._write({"step": step, "loss": mean, **means, "lr": lr, "grad_norm": grad_norm, "tokens": tokens,
                         "tokens_per_s": round(tokens_per_s, 1)})
            self._draw(now=False)

    def eval(self, step: int, metrics: dict[str, float], label: str = "adapter", final: bool = False) -> None:
        """An evaluation's scores; ``final``: the finished run's (the "after" of its table). Nothing
        to show (no held-out data): nothing written or printed."""
        if not metrics:
            return
        self._write({"step": step, "model": label, **({"final": True} if final else {}),
                     **{k: round(v, 6) for k, v in metrics.items()}})
        text = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        (self.bar.write if self.bar is not None else print)(f"eval @ step {step} ({label}): {text}")
        self._draw(now=True)

    def _draw(self, now: bool) -> None:
        """Redraw loss.png: ``now``, or when PLOT_INTERVAL_S has passed since the last draw (else
        the new points wait for the next draw, or for ``close``)."""
        if not self.plot:
            return
        if now or time.monotonic() - self._plotted >= PLOT_INTERVAL_S:
            plot_losses(self.out / "loss.png", self.train_points, self.eval_points)
            self._plotted, self._plot_due = time.monotonic(), False
        else:
            self._plot_due = True

    def event(self, step: int, text: str, **fields: Any) -> None:
        """A one-off event (e.g. a rank growth): printed and written to metrics.jsonl."""
        self._write({"step": step, "event": text, **fields})
        (self.bar.write if self.bar is not None else print)(f"step {step}: {text}")

    def close(self) -> None:
        """End the progress bar and draw the points loss.png does not show yet (the trackers stay
        open for the final evaluation)."""
        if self.bar is not None:
            self.bar.close()
        if self._plot_due:
            self._draw(now=True)

    def finish(self, summary: dict[str, dict[str, float]] | None = None, status: str = "finished") -> None:
        """Close the trackers, with the final table (model -> scores) when the run completed;
        ``status``: finished | interrupted | failed."""
        self.close()
        for tracker in list(self.trackers):
            self._call(tracker, "finish", summary, status)
        self.trackers = []


def plot_losses(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> None:
    """Train and eval loss against step, written atomically as a PNG (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_file(path, suffix=".png") as tmp:  # matplotlib reads the format from the name
            fig.savefig(tmp)
    finally:
        plt.close(fig)


class NullLog:
    """What ranks other than 0 log in a distributed run: nothing."""

    base_metrics: dict[str, float] = {}

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
