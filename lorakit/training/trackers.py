"""Experiment trackers a run also logs to (``train.report_to``): TensorBoard, Weights & Biases,
MLflow and Trackio. Each gets what metrics.jsonl gets — every numeric field of each line at its
step (train loss, lr, grad norm, tokens, the objective's rewards; the base's scores at step 0,
the adapter's at each evaluation) — plus the run config at the start and the final base-vs-
adapter table at the end.

All of them log locally unless told otherwise, so a run never needs a network or an account:
- tensorboard: ``out_dir/tensorboard`` (a resumed run purges the steps past its checkpoint);
- wandb: ``out_dir/wandb``, offline unless ``WANDB_MODE`` is set or ``WANDB_API_KEY`` is
  (``wandb sync out_dir/wandb/offline-run-*`` uploads an offline run later);
- mlflow: ``MLFLOW_TRACKING_URI`` if set, else a file store in ``out_dir/mlruns``
  (``mlflow ui --backend-store-uri out_dir/mlruns``);
- trackio: its local database (``TRACKIO_DIR``, default ~/.cache/huggingface/trackio;
  ``trackio show`` opens it).
The project (wandb/trackio project, MLflow experiment) is ``train.tracker_project``; the run's
name is its folder's. A resumed run starts a new tracker run from its checkpoint's step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from ..config import TRACKERS
from ..errors import require_extra

__all__ = ["TRACKERS", "TRACKER_PACKAGES", "check_trackers", "open_trackers", "Tracker", "numeric"]

# tracker -> (lorakit extra, modules it imports)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", ("tensorboard",)), "wandb": ("wandb", ("wandb",)),
                    "mlflow": ("mlflow", ("mlflow",)), "trackio": ("trackio", ("trackio",))}


def check_trackers(names: list[str]) -> None:
    """A missing tracker package is said before the run starts, with its install command."""
    for name in names:
        extra, modules = TRACKER_PACKAGES[name]
        require_extra(extra, modules, f"train.report_to {name}")


def numeric(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics.jsonl line, without its step."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def _table_rows(summary: dict[str, dict[str, float]]) -> tuple[list[str], list[list[Any]]]:
    """The final table as rows: one per score, one column per model (base, adapter)."""
    models = list(summary)
    keys = list(dict.fromkeys(k for scores in summary.values() for k in scores))
    return ["score", *models], [[k, *(summary[m].get(k) for m in models)] for k in keys]


class Tracker(Protocol):
    """One tracker's run: ``log`` each metrics line, ``finish`` with the final table."""

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, dict[str, float]] | None, status: str) -> None: ...


class _TensorBoard:
    def __init__(self, out: Path, config: dict[str, Any], yaml_text: str, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self.writer.add_text("config", "```yaml\n" + yaml_text + "```", start_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, summary, status):
        if summary:
            header, rows = _table_rows(summary)
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join("-" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in r)
                      + " |" for r in rows]
            self.writer.add_text("final evaluation", "\n".join(lines))
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, config: dict[str, Any], project: str, name: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, dir=str(out), config=config, mode=mode,
                              settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary, status):
        if summary:
            header, rows = _table_rows(summary)
            self.run.log({"final_evaluation": self.wandb.Table(columns=header, data=rows)})
            self.run.summary.update({f"final/{m}/{k}": v for m, scores in summary.items() for k, v in scores.items()})
        self.run.finish(exit_code=0 if status == "finished" else 1)


class _MLflow:
    def __init__(self, out: Path, config: dict[str, Any], yaml_text: str, project: str, name: str) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local store in the run folder; MLflow 3 wants an explicit opt-in for a file store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (out / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        experiment = self.client.get_experiment_by_name(project)
        exp_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, yaml_text, "config.yaml")

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), v, now, step) for k, v in values.items()])

    def finish(self, summary, status):
        if summary:
            self.client.log_dict(self.run_id, summary, "final_evaluation.json")
        self.client.set_terminated(self.run_id, "FINISHED" if status == "finished" else "KILLED")


class _Trackio:
    def __init__(self, config: dict[str, Any], project: str, name: str) -> None:
        import trackio

        self.run = trackio.init(project=project, name=name, config=config, auto_log_cpu=False, auto_log_gpu=False)
        self.last_step = 0

    def log(self, step: int, values: dict[str, float]) -> None:
        self.last_step = step
        self.run.log(values, step=step)

    def finish(self, summary, status):
        if summary:
            self.run.log({f"final/{m}/{k}": v for m, scores in summary.items() for k, v in scores.items()},
                         step=self.last_step)
        self.run.finish()


def open_trackers(names: list[str], out: Path, config: dict[str, Any], yaml_text: str, project: str,
                  start_step: int) -> list[Tracker]:
    """One started tracker per name (their packages were checked by ``check_trackers``)."""
    name = out.resolve().name
    made: dict[str, Any] = {
        "tensorboard": lambda: _TensorBoard(out, config, yaml_text, start_step),
        "wandb": lambda: _Wandb(out, config, project, name),
        "mlflow": lambda: _MLflow(out, config, yaml_text, project, name),
        "trackio": lambda: _Trackio(config, project, name),
    }
    return [made[n]() for n in names]
