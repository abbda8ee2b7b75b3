"""Run folders as the UI sees them: list, read their metrics and configs, and start, stop and
resume ``lorakit train`` processes (separate processes: a run survives the page being closed and
never blocks the UI). Runs started from the CLI into the same folder show up the same way."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import BEFORE_LABELS
from ..errors import LorakitError

__all__ = ["RunStatus", "RunManager", "read_metrics", "read_config", "config_table", "config_differences",
           "before_after"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
LOGS = ".ui-logs"  # ROOT/.ui-logs/NAME.log: the output of the runs the UI started (train wants an empty run folder)


def read_metrics(run: Path) -> list[dict]:
    """Every complete record of ``run/metrics.jsonl`` (a line being written is skipped)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_config(run: Path) -> dict[str, Any]:
    from ..config import load_yaml

    path = Path(run) / "config.yaml"
    try:
        return load_yaml(str(path)) if path.is_file() else {}
    except LorakitError:
        return {}


def config_table(configs: dict[str, dict]) -> list[tuple[str, list[Any], bool]]:
    """(section.key, [value per run], whether the runs differ on it) for every key of any run."""
    keys = sorted({f"{s}.{k}" for c in configs.values() for s, sec in c.items() if isinstance(sec, dict) for k in sec})
    rows = []
    for key in keys:
        section, name = key.split(".", 1)
        values = [(c.get(section) or {}).get(name) for c in configs.values()]
        rows.append((key, values, any(v != values[0] for v in values[1:])))
    return rows


def config_differences(configs: dict[str, dict]) -> list[tuple[str, list[Any]]]:
    """(section.key, [value per run]) for every key whose value is not the same in all runs."""
    return [(key, values) for key, values, differs in config_table(configs) if differs]


def before_after(metrics: list[dict]) -> tuple[dict, dict] | None:
    """(scores before training, scores of the finished run) from a run's metrics.jsonl records, or
    None while the run has no final evaluation (the same numbers as the CLI's before/after table)."""
    before = next((m for m in metrics if m.get("model") in BEFORE_LABELS), None)
    after = next((m for m in reversed(metrics) if m.get("final")), None)
    return None if before is None or after is None else (before, after)


@dataclass
class RunStatus:
    name: str
    state: str  # running | finished | stopped | failed | empty
    step: int
    max_steps: int | None
    loss: float | None
    eval_loss: float | None


class RunManager:
    """The run folders under ``root`` and the training processes this UI started."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def path(self, name: str) -> Path:
        if not _NAME.match(name or ""):
            raise LorakitError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (a folder inside {self.root})")
        return self.root / name

    def names(self) -> list[str]:
        runs = [p for p in self.root.iterdir() if p.is_dir() and ((p / "metrics.jsonl").exists() or (p / "config.yaml").exists())]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def _spawn(self, name: str, args: list[str]) -> None:
        (self.root / LOGS).mkdir(exist_ok=True)
        log = open(self._log(name), "ab")
        self.procs[name] = subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args], stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def start(self, name: str, flags: list[str]) -> Path:
        """``lorakit train --out ROOT/NAME FLAGS...`` in its own process."""
        folder = self.path(name)
        if self.running(name):
            raise LorakitError(f"run {name!r} is already training")
        if folder.exists() and any(folder.iterdir()):
            raise LorakitError(f"{folder} already holds a run: resume it, or choose another name")
        self._spawn(name, ["--out", str(folder), *flags])
        return folder

    def resume(self, name: str) -> None:
        """Continue from the run's latest checkpoint, with the config it recorded."""
        folder = self.path(name)
        if self.running(name):
            raise LorakitError(f"run {name!r} is already training")
        if not (folder / "config.yaml").is_file() or not (folder / "checkpoints").is_dir():
            raise LorakitError(f"{folder} has no checkpoint to resume from")
        self._spawn(name, ["--config", str(folder / "config.yaml"), "--out", str(folder), "--resume"])

    def stop(self, name: str) -> None:
        """Ctrl-C for the run: it saves a checkpoint, writes its adapter and exits."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise LorakitError(f"run {name!r} is not training in this UI")
        proc.send_signal(signal.SIGINT)

    def running(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def _log(self, name: str) -> Path:
        return self.root / LOGS / f"{self.path(name).name}.log"

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self._log(name)
        if not path.is_file():
            return ""
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
        return "\n".join(line for line in text[-chars:].splitlines() if line.strip())

    def status(self, name: str) -> RunStatus:
        folder = self.path(name)
        metrics = read_metrics(folder)
        max_steps = (read_config(folder).get("train") or {}).get("max_steps")
        steps = [m for m in metrics if "loss" in m]
        evals = [m for m in metrics if "eval_loss" in m and m.get("model") not in BEFORE_LABELS]
        step = steps[-1]["step"] if steps else 0
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            state = "running"
        elif proc is not None and proc.returncode not in (0, 130):
            state = "failed"
        elif (((folder / "adapter" / "adapter_config.json").is_file() or (folder / "model" / "config.json").is_file())
              and (max_steps is None or step >= max_steps)):  # a LoRA run's adapter, a full/freeze run's model
            state = "finished"
        elif (folder / "checkpoints").is_dir():
            state = "stopped"
        else:
            state = "empty"
        return RunStatus(name, state, step, max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
                         steps[-1]["loss"] if steps else None, evals[-1]["eval_loss"] if evals else None)
