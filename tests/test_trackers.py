"""train.report_to: a tiny run logs to TensorBoard, W&B, MLflow and Trackio offline, and what each
stored — the train losses, the base's and the adapter's eval loss, the config, the final table —
reads back equal to metrics.jsonl."""

import json
import os
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest

from conftest import adding_data, tiny_train_cmd
from lorakit import LorakitError
from lorakit.config import run_config_from_dict

for module in ("tensorboard", "wandb", "mlflow", "trackio"):
    pytest.importorskip(module)


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, tmp_path_factory):
    """One `lorakit train` logging to all four trackers; its run folder, metrics.jsonl and trackio's folder."""
    tmp = tmp_path_factory.mktemp("tracked")
    cmd, run = tiny_train_cmd(tiny_model_dir, tmp, "--train.max_steps", "6", "--train.log_every", "2",
                              "--train.report_to", "tensorboard,wandb,mlflow,trackio", "--train.tracker_project", "tiny")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    env.update(TRACKIO_DIR=str(tmp / "trackio"), WANDB_CONFIG_DIR=str(tmp / "wandb-config"),
               WANDB_CACHE_DIR=str(tmp / "wandb-cache"), WANDB_DATA_DIR=str(tmp / "wandb-data"),
               HF_HUB_OFFLINE="1", LORAKIT_CACHE=str(tmp / "cache"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return run, lines, tmp / "trackio"


def _expected(lines):
    """(train loss by step, base eval loss, adapter eval loss and its step) from metrics.jsonl."""
    losses = {r["step"]: r["loss"] for r in lines if "loss" in r}
    base = next(r for r in lines if r.get("model") == "base")
    adapter = [r for r in lines if r.get("model") == "adapter"][-1]
    assert sorted(losses) == [2, 4, 6] and base["step"] == 0
    return losses, base["eval_loss"], adapter


def test_tensorboard_holds_the_metrics_config_and_final_table(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, lines, _ = tracked_run
    losses, base_loss, adapter = _expected(lines)
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    assert {e.step: e.value for e in ea.Scalars("loss")} == pytest.approx(losses, rel=1e-6)
    evals = {e.step: e.value for e in ea.Scalars("eval_loss")}
    assert evals == pytest.approx({0: base_loss, adapter["step"]: adapter["eval_loss"]}, rel=1e-6)
    texts = {tag: ea.Tensors(tag)[0].tensor_proto.string_val[0].decode() for tag in ea.Tags()["tensors"]}
    assert "max_steps: 6" in texts["config/text_summary"] and "tracker_project: tiny" in texts["config/text_summary"]
    table = texts["final evaluation/text_summary"]
    assert "| score | base | adapter |" in table and "eval_loss" in table


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file (LevelDB log framing: 32 KiB blocks of checksummed chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, buf, pos, block = path.read_bytes(), [], b"", 7, 32768
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        space = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if space >= 7 else (0, 0, 0)
        if kind == 0:  # the zero padding at a block's end
            pos += space
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_run_holds_the_metrics_config_and_summary(tracked_run):
    run, lines, _ = tracked_run
    losses, base_loss, adapter = _expected(lines)
    (log,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    history = [{_key(i): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    got = {h["_step"]: h["loss"] for h in history if "loss" in h}
    assert got == pytest.approx(losses, rel=1e-6)
    assert {h["_step"]: h["eval_loss"] for h in history if "eval_loss" in h} == pytest.approx(
        {0: base_loss, adapter["step"]: adapter["eval_loss"]}, rel=1e-6)
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {_key(i): json.loads(i.value_json) for i in meta.config.update}
    assert meta.project == "tiny" and meta.display_name == "run"
    assert config["train"]["max_steps"] == 6 and config["train"]["report_to"] == ["tensorboard", "wandb", "mlflow", "trackio"]
    summary = {_key(i): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}
    assert summary["final/adapter/eval_loss"] == pytest.approx(adapter["eval_loss"], rel=1e-6)
    assert summary["final/base/eval_loss"] == pytest.approx(base_loss, rel=1e-6)


def test_mlflow_file_store_holds_the_metrics_params_and_final_table(tracked_run):
    from mlflow.tracking import MlflowClient

    run, lines, _ = tracked_run
    losses, base_loss, adapter = _expected(lines)
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient((run / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("tiny")
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "run" and mlrun.info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "loss")} == pytest.approx(losses)
    evals = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "eval_loss")}
    assert evals == pytest.approx({0: base_loss, adapter["step"]: adapter["eval_loss"]}, rel=1e-6)
    assert mlrun.data.params["train.max_steps"] == "6" and mlrun.data.params["data.max_len"] == "48"
    folder = Path(client.download_artifacts(mlrun.info.run_id, "final_evaluation.json", str(run / "dl")))
    table = json.loads(folder.read_text())
    assert table["adapter"]["eval_loss"] == pytest.approx(adapter["eval_loss"], rel=1e-6)


def test_trackio_database_holds_the_metrics_and_config(tracked_run):
    run, lines, trackio_dir = tracked_run
    losses, base_loss, adapter = _expected(lines)
    db = sqlite3.connect(trackio_dir / "tiny.db")
    rows = [(step, json.loads(m)) for step, m in db.execute(
        "select step, metrics from metrics where run_name = 'run' order by id")]
    assert {s: m["loss"] for s, m in rows if "loss" in m} == pytest.approx(losses, rel=1e-6)
    assert {s: m["eval_loss"] for s, m in rows if "eval_loss" in m} == pytest.approx(
        {0: base_loss, adapter["step"]: adapter["eval_loss"]}, rel=1e-6)
    assert rows[-1][1]["final/adapter/eval_loss"] == pytest.approx(adapter["eval_loss"], rel=1e-6)
    (config,) = [json.loads(c) for (c,) in db.execute("select config from configs where run_name = 'run'")]
    assert config["train"]["max_steps"] == 6 and config["data"]["max_len"] == 48


def test_report_to_names_and_aliases():
    t = run_config_from_dict({"train": {"report_to": "tensorboard, mlflow"}}).train
    assert t.report_to == ["tensorboard", "mlflow"]
    assert run_config_from_dict({"train": {"report_to": "none"}}).train.report_to == []
    assert run_config_from_dict({"report_to": ["wandb"]}).train.report_to == ["wandb"]  # TrainingArguments' key
    assert run_config_from_dict({"train": {"tensorboard": True}}).train.report_to == ["tensorboard"]  # lorakit 0.1's
    with pytest.raises(LorakitError, match="unknown tracker 'comet_ml'; lorakit logs to"):
        run_config_from_dict({"train": {"report_to": ["comet_ml"]}})


def test_a_missing_tracker_package_is_said_before_the_run(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    from lorakit.training.loop import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = run_config_from_dict({"model": {"name": str(tiny_model_dir)}, "data": {"path": str(adding_data(tmp_path))},
                                "train": {"out_dir": str(tmp_path / "run"), "report_to": ["wandb"]}})
    with pytest.raises(LorakitError, match=r"train.report_to wandb needs wandb \(lorakit's 'wandb' extra\); install it "
                                           r"with: pip install 'lorakit\[wandb\]'"):
        train(cfg, show_progress=False, echo=lambda s: None)
    assert not (tmp_path / "run").exists()
