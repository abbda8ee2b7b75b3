"""``lorakit eval``: it reproduces a run's own before/after scores, matches short answers exactly
and by containment, scores every record of a given file, and measures forgetting as the ratio
of general-text perplexities."""

import json
import math

import pytest

from conftest import adding_data
from lorakit.cli.main import main
from lorakit.config import run_config_from_dict
from lorakit.training.assess import match_scores, normalise
from lorakit.training.loop import train


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    """A 20-step run on "add i and i" rows (4 held out), and its result."""
    tmp = tmp_path_factory.mktemp("eval-run")
    cfg = run_config_from_dict({
        "model": {"name": str(tiny_model_dir)},
        "data": {"path": str(adding_data(tmp)), "max_len": 48, "val_size": 4},
        "lora": {"r": 4, "alpha": 8},
        "train": {"out_dir": str(tmp / "run"), "lr": 3e-3, "max_steps": 20, "batch_size": 2, "threads": 1,
                  "plot": False},
    })
    return tmp / "run", train(cfg, show_progress=False, echo=lambda s: None)


def _eval(tmp_path, *args):
    out = tmp_path / "eval.json"
    assert main(["eval", *map(str, args), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_eval_reproduces_the_runs_before_and_after_and_measures_forgetting(tiny_run, tmp_path, capsys):
    run, res = tiny_run
    report = _eval(tmp_path, run, "--samples", "3", "--show", "2")
    base, adapter = report["models"]
    assert (base["name"], adapter["name"]) == ("base", "run") and report["adapters"] == {"run": str(run / "adapter")}
    # the run's own validation split, scored by the code the run used: the same numbers
    assert base["scores"]["eval_loss"] == pytest.approx(res.before["eval_loss"], rel=1e-5)
    assert adapter["scores"]["eval_loss"] == pytest.approx(res.after["eval_loss"], rel=1e-5)
    assert adapter["scores"]["eval_loss"] < base["scores"]["eval_loss"]
    # the 3 held-out prompts (short answers: "2i") answered greedily by each model
    assert len(report["prompts"]) == len(report["references"]) == 3 == len(base["answers"]) == len(adapter["answers"])
    assert all(p.startswith("add ") for p in report["prompts"])
    for m in report["models"]:
        assert m["scores"]["exact_match"] == pytest.approx(
            100 * sum(a.strip() == r for a, r in zip(m["answers"], report["references"])) / 3)
    # forgetting: the adapter's perplexity on the base's own answers to everyday prompts, against the base's
    g_base, g_adapter = base["scores"]["general_ppl"], adapter["scores"]["general_ppl"]
    assert g_base == pytest.approx(math.exp(base["scores"]["general_loss"]))
    assert adapter["scores"]["forgetting"] == pytest.approx(g_adapter / g_base - 1)
    assert g_adapter != pytest.approx(g_base, rel=1e-4)  # the adapter changes how the model scores that text
    assert "everyday prompts" in report["general"]
    shown = capsys.readouterr().out
    assert "forgetting" in shown and shown.count("Q: 'add ") == 2 and "reference:" in shown


def test_a_given_file_is_scored_whole_and_a_text_file_is_the_general_text(tiny_run, tmp_path):
    run, _ = tiny_run
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"add {i} and {i}", "output": str(2 * i)}) + "\n"
                            for i in range(30, 37)))
    text = tmp_path / "general.txt"
    text.write_text("the date is March 3\n\nwho are you? I am Kit\n\n\n")
    report = _eval(tmp_path, f"mine={run}", "--data", data, "--general", text, "--samples", "0")
    assert "7 examples" in report["data"] and "(2 texts)" in report["general"]
    assert [m["name"] for m in report["models"]] == ["base", "mine"] and report["prompts"] == []
    assert "exact_match" not in report["models"][0]["scores"] and "general_ppl" in report["models"][1]["scores"]


def test_match_scores_exact_and_contains():
    answers = ["2021-03-04", " The date is 2021-03-04.", "March 4", "I am Kit."]
    refs = ["2021-03-04", "2021-03-04", "2021-03-04", "i am kit"]
    scores = match_scores(answers, refs)
    assert scores == {"exact_match": 25.0, "contains": 75.0}
    assert match_scores(answers, refs, scorer=lambda a, r: a.strip().lower().startswith(r[:4]))["exact_match"] == 50.0
    assert normalise("  I am   KIT!  ") == "i am kit" and match_scores([], []) == {}


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not an adapter folder (no adapter_config.json)" in capsys.readouterr().err
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert main(["eval", str(tmp_path)]) == 2
    assert f"--model {tmp_path / 'model'}" in capsys.readouterr().err
    assert main(["eval", "--samples", "-1"]) == 2
