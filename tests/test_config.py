"""The config plumbing on its own: the order in which YAML and flags merge, how each field type
is read from a command-line string, unknown keys with suggestions, and other tools' key names."""

import argparse

import pytest

from lorakit import LorakitError
from lorakit.cli.flags import add_run_flags, run_config
from lorakit.config import (DataConfig, LoraConfig, ModelConfig, TrainConfig, coerce_value, dump_yaml, load_yaml,
                            merge_nested, run_config_from_dict, translate_aliases)
from lorakit.data.demo import DEMO_OVERRIDES


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_run_flags(p)
    return p.parse_args(list(argv))


def test_layers_merge_defaults_then_demo_then_file_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  lr: 0.005\n  batch_size: 3\nlora:\n  r: 4\n")
    # no data: the demo's settings sit under the file, the file under the flags
    cfg, demo = run_config(_args("--config", str(yaml_file), "--train.batch_size", "7"))
    assert demo
    assert cfg.train.batch_size == 7  # flag over file
    assert cfg.train.lr == 0.005  # file over demo (the demo says 1e-3)
    assert cfg.train.max_steps == DEMO_OVERRIDES["train"]["max_steps"]  # demo over default
    assert cfg.data.max_len == DEMO_OVERRIDES["data"]["max_len"]
    assert cfg.lora.r == 4 and cfg.lora.alpha == 32.0  # the run default alpha stays
    # with data, no demo layer: the defaults show through
    cfg, demo = run_config(_args("--config", str(yaml_file), "--data", "x.jsonl"))
    assert not demo and cfg.train.max_steps == 0 and cfg.data.max_len == 1024 and cfg.data.path == ["x.jsonl"]
    # a dotted flag wins over its short spelling
    cfg, _ = run_config(_args("--data", "x.jsonl", "--device", "cpu", "--model.device", "cuda"))
    assert cfg.model.device == "cuda"
    cfg, _ = run_config(_args("--data", "x.jsonl", "--dtype", "bfloat16", "--template", "chatml", "--format", "alpaca"))
    assert (cfg.model.dtype, cfg.data.template, cfg.data.format) == ("bfloat16", "chatml", "alpaca")


def test_merge_nested_merges_sections_and_replaces_values():
    base = {"train": {"lr": 1.0, "seed": 1}, "lora": {"target_modules": ["q_proj"]}}
    over = {"train": {"lr": 2.0}, "lora": {"target_modules": ["v_proj"]}}
    merged = merge_nested(base, over)
    assert merged == {"train": {"lr": 2.0, "seed": 1}, "lora": {"target_modules": ["v_proj"]}}
    assert base["train"]["lr"] == 1.0  # the inputs are left as they were


@pytest.mark.parametrize("cls, key, raw, want", [
    (TrainConfig, "lr", "2e-4", 2e-4),  # float
    (TrainConfig, "batch_size", "8", 8),  # int
    (TrainConfig, "overwrite", "yes", True),  # bool, every spelling
    (TrainConfig, "overwrite", "False", False),
    (TrainConfig, "plot", "0", False),
    (ModelConfig, "name", "null", "null"),  # str stays a string
    (LoraConfig, "target_modules", "[q_proj, v_proj]", ["q_proj", "v_proj"]),  # list as YAML
    (LoraConfig, "target_modules", "all-linear", "all-linear"),  # Union[list, str]
    (LoraConfig, "rank_pattern", "{q_proj: 4}", {"q_proj": 4}),  # dict as YAML
    (LoraConfig, "layers_to_transform", "3", 3),
    (DataConfig, "eval_path", "none", None),  # Optional: none/null/~ mean unset
    (TrainConfig, "resume", "latest", "latest"),
    (TrainConfig, "epochs", 2, 2),  # not a string: taken as it is
])
def test_coerce_each_field_type(cls, key, raw, want):
    assert coerce_value(cls, key, raw) == want


@pytest.mark.parametrize("cls, key, raw, message", [
    (TrainConfig, "lr", "fast", "train.lr: cannot read 'fast' as float"),
    (TrainConfig, "batch_size", "2.5", "train.batch_size: cannot read '2.5' as int"),
    (TrainConfig, "overwrite", "maybe", "train.overwrite: cannot read 'maybe' as bool"),
    (TrainConfig, "learning_rat", "1", "unknown option 'learning_rat'"),
    (TrainConfig, "bach_size", "1", "did you mean 'batch_size'?"),
])
def test_coerce_errors_name_the_key(cls, key, raw, message):
    with pytest.raises(LorakitError, match=message.replace("?", r"\?")):
        coerce_value(cls, key, raw)


@pytest.mark.parametrize("data, message", [
    ({"trian": {}}, "unknown section 'trian'; did you mean 'train'?"),
    ({"train": {"lrr": 1.0}}, "train: unknown key 'lrr'; did you mean 'lr'?"),
    ({"lora": {"rank": 8}}, "lora: unknown key 'rank'"),
    ({"train": {"batch_size": 0}}, "train.batch_size and train.grad_accum must be at least 1"),
    ("just text", "expected a mapping"),
])
def test_unknown_or_bad_keys_are_named(data, message):
    with pytest.raises(LorakitError, match=message.replace("?", r"\?")):
        run_config_from_dict(data, "run.yaml")


def test_hugging_face_training_arguments_names_are_read_with_a_note(tmp_path):
    yaml_file = tmp_path / "hf.yaml"
    yaml_file.write_text(
        "learning_rate: 3.0e-4\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 8\n"
        "num_train_epochs: 2\nmax_grad_norm: 0.3\nlr_scheduler_type: constant_with_warmup\noutput_dir: runs/hf\n"
        "save_total_limit: 3\nlogging_steps: 10\nsave_steps: 50\nwarmup_ratio: 0.1\nweight_decay: 0.01\n"
        "gradient_checkpointing: true\noptim: adamw_torch\nbf16: true\nmax_steps: -1\nseed: 7\n"
        "do_train: true\nsave_strategy: steps\n"
        "lora:\n  lora_alpha: 64\n  lora_dropout: 0.05\n")
    data, notes = translate_aliases(load_yaml(str(yaml_file)), str(yaml_file))
    cfg = run_config_from_dict(data)
    t = cfg.train
    assert (t.lr, t.batch_size, t.grad_accum, t.epochs, t.clip, t.schedule) == (3e-4, 2, 8, 2, 0.3, "constant")
    assert (t.out_dir, t.keep_last, t.log_every, t.save_every, t.warmup, t.weight_decay) == ("runs/hf", 3, 10, 50, 0.1, 0.01)
    assert (t.grad_checkpointing, t.optimizer, t.precision, t.max_steps, t.seed) == (True, "adamw", "bf16", 0, 7)
    assert (cfg.lora.alpha, cfg.lora.dropout) == (64, 0.05)
    assert f"{yaml_file}: learning_rate read as train.lr (TrainingArguments's name)" in notes
    assert f"{yaml_file}: lora.lora_alpha read as lora.alpha (PEFT's LoraConfig's name)" in notes
    assert f"{yaml_file}: do_train has no meaning in lorakit; ignored" in notes
    assert len(notes) == 21  # one line per key moved or ignored
    # the same file through `lorakit train --config`: the notes are printed, the values used
    cfg2, _ = run_config(_args("--config", str(yaml_file), "--data", "x.jsonl"))
    assert cfg2.train == t


def test_axolotl_names_and_conflicts():
    data, notes = translate_aliases({"base_model": "m", "sequence_len": 512, "micro_batch_size": 2, "lora_r": 8,
                                     "lora_target_linear": True, "load_in_4bit": True, "num_epochs": 3})
    cfg = run_config_from_dict(data)
    assert (cfg.model.name, cfg.data.max_len, cfg.train.batch_size, cfg.lora.r) == ("m", 512, 2, 8)
    assert (cfg.lora.target_modules, cfg.model.quantize, cfg.train.epochs) == ("all-linear", "nf4", 3)
    with pytest.raises(LorakitError, match="learning_rate .* and train.lr give different values"):
        translate_aliases({"learning_rate": 1e-4, "train": {"lr": 2e-4}})
    with pytest.raises(LorakitError, match="lr_scheduler_type 'polynomial' has no lorakit equivalent"):
        translate_aliases({"lr_scheduler_type": "polynomial"})
    # the same value twice is fine; an unknown name stays an unknown key
    assert translate_aliases({"learning_rate": 1e-4, "train": {"lr": 1e-4}})[0] == {"train": {"lr": 1e-4}}
    with pytest.raises(LorakitError, match="unknown section 'learnin_rate'"):
        run_config_from_dict({"learnin_rate": 1e-4})


def test_the_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = run_config_from_dict({"lora": {"r": 4, "rank_pattern": {"q_proj": 8}}, "train": {"lr": 1e-3},
                                "data": {"path": ["a.jsonl", "b.jsonl"]}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg))
    assert run_config_from_dict(load_yaml(str(path))) == cfg
