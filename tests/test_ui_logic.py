"""The web UI's logic without a browser: the form is train's config, paths stay inside the given
folders, runs are listed and compared, and chat stops generating when its reader goes away."""

import json
import re
import time

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.ui.plan import form_fields, plan_run
from lorakit.ui.runs import RunManager, config_differences, read_metrics

from conftest import adding_data


def _form(**changes):
    values = {f.key: f.default if f.kind == "bool" else ("" if f.default is None else str(f.default)) for f in form_fields()}
    values.update({k.replace("__", "."): v for k, v in changes.items()})
    return values


def test_the_form_is_trains_config_with_its_help_and_its_messages(tmp_path):
    fields = {f.key: f for f in form_fields()}
    assert fields["lora.r"].help.startswith("Rank") and fields["data.packing"].kind == "bool"
    assert plan_run(_form()).error.startswith("data.path:")
    plan = plan_run(_form(data__path="d.jsonl", lora__r="8", train__max_steps="30", data__packing=False), "runs/x")
    assert plan.error is None and plan.flags == ["--data.path", "d.jsonl", "--data.packing", "false", "--lora.r", "8",
                                                 "--train.max_steps", "30"]
    assert plan.command == "lorakit train --out runs/x " + " ".join(plan.flags)
    c = plan.config
    assert (c.lora.r, c.train.max_steps, c.data.packing, c.train.out_dir, c.lora.alpha) == (8, 30, False, "runs/x", 32)
    assert "r: 8" in plan.yaml and "max_steps: 30" in plan.yaml
    # the same validation messages as the CLI
    assert "lora.r must be a positive integer" in plan_run(_form(data__path="d", lora__r="-3")).error
    assert plan_run(_form(data__path="d", lora__r="abc")).error == "lora.r: cannot read 'abc' as int"
    assert plan_run(_form(data__path="d", lora__target_modules="q_proj, v_proj")).config.lora.target_modules == ["q_proj", "v_proj"]


def test_paths_and_run_names_stay_inside_their_folders(tmp_path, tiny_model_dir):
    from lorakit.ui.handlers import UiContext

    (tmp_path / "data").mkdir()
    adding_data(tmp_path / "data")
    ctx = UiContext(str(tmp_path / "runs"), str(tmp_path / "data"), str(tiny_model_dir))
    assert ctx.data_path("train.jsonl") == (tmp_path / "data" / "train.jsonl").resolve()
    for bad in ("../secret.txt", "/etc/passwd", str(tmp_path)):
        with pytest.raises(LorakitError, match="only under"):
            ctx.data_path(bad)
    with pytest.raises(LorakitError, match="no such file"):
        ctx.data_path("missing.jsonl")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(LorakitError, match="run name"):
            ctx.runs.path(bad)


def test_runs_are_listed_and_their_configs_compared(tmp_path):
    runs = RunManager(tmp_path)
    for name, r in (("a", 8), ("b", 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(f"lora:\n  r: {r}\n  alpha: 32\ntrain:\n  max_steps: 10\n")
        (tmp_path / name / "metrics.jsonl").write_text('{"step": 5, "loss": 1.5}\n{"step": 10, "lo')  # a line being written
    (tmp_path / "not-a-run").mkdir()
    assert sorted(runs.names()) == ["a", "b"]
    st = runs.status("a")
    assert (st.state, st.step, st.max_steps, st.loss) == ("empty", 5, 10, 1.5)
    from lorakit.ui.runs import read_config

    assert config_differences({n: read_config(tmp_path / n) for n in ("a", "b")}) == [("lora.r", [8, 16])]
    # a finished run's before/after table, as the CLI prints it; none for a run without its final evaluation
    from lorakit.ui.handlers import UiContext, compare, result_table

    (tmp_path / "b" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 0, "model": "base", "eval_loss": 2.5, "exact_match": 0.0}, {"step": 5, "loss": 1.2},
        {"step": 5, "model": "adapter", "eval_loss": 1.1}, {"step": 10, "loss": 0.4},
        {"step": 10, "model": "adapter", "final": True, "eval_loss": 0.5, "exact_match": 87.5}]) + "\n")
    table = result_table(read_metrics(tmp_path / "b"))
    assert table.values.tolist() == [["eval loss", "2.5000", "0.5000"], ["exact match", "0.0%", "87.5%"]]
    assert list(table.columns) == ["held-out", "base", "adapter (step 10)"] and len(result_table(read_metrics(tmp_path / "a"))) == 0
    ctx = UiContext(str(tmp_path), str(tmp_path / "data"), "unused")
    (tmp_path / "b" / "model").mkdir()
    (tmp_path / "b" / "model" / "config.json").write_text("{}")  # a full/freeze run's model: chat can use it
    assert ctx.models() == ["unused", str(tmp_path / "b" / "model")] and ctx.adapters() == {}
    curves, scores, html = compare(ctx, ["a", "b"])
    assert sorted(set(curves["run"])) == ["a · train", "b · eval", "b · train"] and len(curves) == 1 + 5
    assert scores.values.tolist()[0] == ["b", "eval loss", "2.5000", "0.5000"]
    differing = re.findall(r"<tr class='lk-differs'><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td>", html)
    assert differing == [("lora.r", "8", "16")] and html.count("<tr class='lk-same'>") == 2  # alpha, max_steps
    assert "lk-same" not in compare(ctx, ["a", "b"], only_differences=True)[2]
    from lorakit.ui.handlers import loss_figure

    ax = loss_figure(curves).axes[0]
    assert sorted(line.get_label() for line in ax.lines) == ["a · train", "b · eval", "b · train"]
    b_eval = next(line for line in ax.lines if line.get_label() == "b · eval")
    assert b_eval.get_linestyle() == "--" and list(b_eval.get_xdata()) == [0, 5, 10]
    with pytest.raises(LorakitError, match="already holds a run"):
        runs.start("a", [])
    with pytest.raises(LorakitError, match="not training"):
        runs.stop("a")
    with pytest.raises(LorakitError, match="no checkpoint"):
        runs.resume("a")


def test_chat_answers_side_by_side_and_stops_when_the_reader_goes_away(tiny_model_dir, two_adapters):
    from lorakit.inference.engine import load_engine
    from lorakit.inference.generation import Sampling
    from lorakit.ui.chat import MIX, ChatHub

    hub = ChatHub()
    adapters = {n: str(p) for n, p in two_adapters.items()}
    q = "normalize the date March 5"
    *_, last = hub.answers(str(tiny_model_dir), adapters, q, 12, mix=("alpha", "beta", 0.5))
    ref = load_engine(str(tiny_model_dir), [f"{n}={p}" for n, p in adapters.items()], device="cpu")
    for col, adapter in (("base", None), ("alpha", "alpha"), ("beta", "beta")):
        assert last[col] == ref.chat([{"role": "user", "content": q}], adapter, Sampling(max_new_tokens=12)).text, col
    assert set(last) == {"base", "alpha", "beta", MIX} and last["alpha"] != last["base"]
    long_q = next(x for x in ("who are you", "hello world", q, "I am a user")
                  if ref.chat([{"role": "user", "content": x}], "alpha", Sampling(max_new_tokens=200)).finish_reason == "length")
    steps = []
    hook = hub.engine.model.register_forward_pre_hook(lambda *_: (steps.append(1), time.sleep(0.02)))
    try:
        stream = hub.answers(str(tiny_model_dir), {"alpha": adapters["alpha"]}, long_q, 200)
        next(stream), next(stream)
        seen = len(steps)
        stream.close()  # the browser went away: the rows stop before their next step
        assert len(steps) <= seen + 2 and len(steps) < 50, (seen, len(steps))
    finally:
        hook.remove()
    with pytest.raises(LorakitError, match="ask something"):
        next(hub.answers(str(tiny_model_dir), {}, "  ", 8))
    assert torch.is_grad_enabled()


def test_an_address_other_machines_reach_needs_a_login(capsys):
    from lorakit.cli import main

    assert main(["ui", "--host", "0.0.0.0"]) == 2
    assert "--auth USER:PASSWORD" in capsys.readouterr().err
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "--auth must be USER:PASSWORD" in capsys.readouterr().err
